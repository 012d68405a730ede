"""Every code block of the READMEs runs, for real, as a reader would run it.

Fenced blocks of ``README.md`` and ``benchmarks/README.md`` (``DOCS``) are extracted; each
is one test, named ``<file>:<line of its opening fence>``:

- ```` ```python ````: written to a file and run as a script by this test's interpreter
  (the venv's Python) in a subprocess, with the library's warnings on stderr. Each block
  runs on its own, so it must import what it uses (a reader copies one block), unless it
  is marked ``continues``.
- ```` ```sh ```` / ```` ```bash ````: run with ``bash -euo pipefail``.
- ```` ```console ````: the lines starting with ``$ `` (and their ``\\`` continuation
  lines) are run as a ``sh`` block; the other lines are output, shown to the reader and
  not compared (use ``expect`` to check output).
- ```` ```text ```` (and ``toml``, ``json``, ``diff``): not code (usage synopses,
  diagrams, file contents): not run. A fence without a language fails the test: tag it.

Every block runs in a fresh temporary directory that stands for the repository's root,
in a session of its own: what it leaves running (a server it started with ``&``) gets
SIGTERM when it ends, then SIGKILL if it does not stop. Its output goes to files, so a
process left in the background cannot keep the block from ending. In the directory,
its top-level entries (``scripts``, ``examples``, ``benchmarks``, ``src``, ...) are
symlinks to this checkout's, and ``.venv/bin/python`` and ``.venv/bin/novasandbox`` are
this test's interpreter and the CLI of the code under test (``python -m
novasandbox.cli``); ``.venv/bin`` is first on ``PATH``, so ``novasandbox`` works too. The
state directory is the test session's private one (``NOVASANDBOX_STATE_DIR``). After each
block nothing it started may be left: no VMM, no sandbox state, no user snapshot, no
empty control group, and no sandbox killed by the library's exit handler (a block kills
what it creates); anything left is cleaned up and fails the block.

Markers: HTML comments (invisible when rendered) on the lines right above the opening
fence, one per line, ``<!-- readme: KEY -->`` or ``<!-- readme: KEY: VALUE -->``:

``setup: SHELL``
    Run with ``bash -euo pipefail`` in the block's directory before the block (several
    run in order). Processes it leaves in the background (a server) are killed after the
    block: e.g. ``<!-- readme: setup: truncate -s 64M data.ext4 && mkfs.ext4 -q data.ext4 -->``.
``stub: PATH...``
    These paths (relative to the repository's root) are replaced, in the block's
    directory, by scripts that only say they were skipped: for commands CI has already
    run before this test (``./scripts/setup.sh``) or that run this test
    (``./scripts/test.sh``). The rest of the block runs.
``needs: root``
    Skipped, saying so, when the test does not run as root (CI runs as root).
``needs: netns``
    The block gets a network namespace of its own in ``NOVASANDBOX_NETNS`` (root), so
    TAPs, forwarding and NAT rules it makes never touch the host's networking; no TAP may
    be left in it afterwards.
``env: KEY=VALUE``
    An environment variable for the block.
``expect: REGEX``
    The block's stdout must match (``re.search``, multiline).
``exit: N``
    The exit status the block must end with (default 0).
``timeout: SECONDS``
    Default 300.
``continues``
    (python) Run after the previous ``python`` block of the same file, in one script, so
    it uses that block's names; the setup, env and needs of both apply.
``skip: REASON``
    Not run, reported as skipped with REASON. Only for blocks that cannot be run here at
    all; usage synopses are ```` ```text ````, not skipped code. At most ``MAX_SKIPS``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from novasandbox.gc import kill_sandbox
from novasandbox.host import tap
from novasandbox.records import list_sandboxes
from novasandbox.snapshots import delete_snapshot, list_snapshots

from .conftest import assert_no_leftovers, qemu_processes_under

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "benchmarks/README.md")
RUN_LANGS = {"python", "sh", "bash", "console"}
TEXT_LANGS = {"text", "toml", "json", "diff"}
KEYS = {"setup", "stub", "needs", "env", "expect", "exit", "timeout", "continues", "skip"}
NEEDS = {"root", "netns"}
MAX_SKIPS = 2
DEFAULT_TIMEOUT = 300.0
STOP_GRACE = 30.0
"""Seconds what a block left running gets after SIGTERM before SIGKILL."""
EXIT_HANDLER_KILL = "left running at exit"
"""What the library logs when its exit handler kills a sandbox the program left running."""
PYTHON_RUNNER = """\
import logging, runpy, sys
handler = logging.StreamHandler()
handler.setLevel(logging.WARNING)
logging.getLogger("novasandbox").addHandler(handler)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
"""Runs a python block as a script, with the library's warnings on stderr (so that a
sandbox killed by its exit handler shows)."""

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>`{3,}|~{3,})\s*(?P<lang>[^\s`]*)")
_MARKER = re.compile(r"^\s*<!--\s*readme:\s*(?P<key>[a-z-]+)\s*(?::\s*(?P<value>.*?))?\s*-->\s*$")


class ReadmeError(Exception):
    """A Markdown file breaks the rules above (bad marker, untagged fence)."""


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    code: str
    markers: list[tuple[str, str]] = field(default_factory=list)
    previous: Block | None = None
    """The block a ``continues`` block runs after."""

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    def values(self, key: str) -> list[str]:
        return [v for k, v in self.markers if k == key]

    def one(self, key: str) -> str | None:
        found = self.values(key)
        return found[-1] if found else None

    @property
    def chain(self) -> list[Block]:
        """This block and those it continues, first first."""
        blocks: list[Block] = []
        block: Block | None = self
        while block is not None:
            blocks.insert(0, block)
            block = block.previous
        return blocks


def parse(doc: str, text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the markers right above each."""
    lines = text.splitlines()
    blocks: list[Block] = []
    last_python: Block | None = None
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, indent, ticks, lang = i, m["indent"], m["ticks"], m["lang"].lower()
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(ticks) and lines[i].strip().strip(ticks[0]) == ""
        ):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise ReadmeError(f"{doc}:{start + 1}: the block is never closed")
        i += 1
        if not lang:
            raise ReadmeError(
                f"{doc}:{start + 1}: a fence without a language; tag it (```text if it is not code)"
            )
        if lang not in RUN_LANGS | TEXT_LANGS:
            raise ReadmeError(f"{doc}:{start + 1}: unknown block language {lang!r}")
        markers = _markers_above(doc, lines, start)
        if lang not in RUN_LANGS:
            if markers:
                raise ReadmeError(f"{doc}:{start + 1}: readme markers on a {lang} block")
            continue
        block = Block(doc, start + 1, lang, "\n".join(body) + "\n", markers)
        if block.one("continues") is not None:
            if lang != "python" or last_python is None:
                raise ReadmeError(f"{block.id}: 'continues' needs a python block before it")
            block.previous = last_python
        if lang == "python":
            last_python = block
        blocks.append(block)
    return blocks


def _markers_above(doc: str, lines: list[str], fence: int) -> list[tuple[str, str]]:
    markers: list[tuple[str, str]] = []
    j = fence - 1
    while j >= 0 and lines[j].lstrip().startswith("<!--"):
        m = _MARKER.match(lines[j])
        if m is None:
            if "readme:" in lines[j]:
                raise ReadmeError(f"{doc}:{j + 1}: malformed readme marker {lines[j].strip()!r}")
            j -= 1
            continue
        key, value = m["key"], m["value"] or ""
        where = f"{doc}:{j + 1}"
        if key not in KEYS:
            raise ReadmeError(f"{where}: unknown readme marker {key!r} (known: {sorted(KEYS)})")
        if key == "needs" and value not in NEEDS:
            raise ReadmeError(f"{where}: 'needs' takes one of {sorted(NEEDS)}, not {value!r}")
        if key in ("exit", "timeout") and not re.fullmatch(r"\d+(\.\d+)?", value):
            raise ReadmeError(f"{where}: {key!r} takes a number, not {value!r}")
        if key == "env" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", value):
            raise ReadmeError(f"{where}: 'env' takes KEY=VALUE, not {value!r}")
        if key in ("skip", "setup", "stub", "expect") and not value.strip():
            raise ReadmeError(f"{where}: {key!r} needs a value (skip: the reason)")
        if key == "continues" and value:
            raise ReadmeError(f"{where}: 'continues' takes no value")
        markers.insert(0, (key, value))
        j -= 1
    return markers


def console_commands(code: str) -> str:
    """The commands of a console transcript: ``$ `` lines and their continuations."""
    out: list[str] = []
    continued = False
    for line in code.splitlines():
        if continued:
            out.append(line)
        elif line.startswith("$ "):
            out.append(line[2:])
        else:
            continue
        continued = line.rstrip().endswith("\\")
    return "\n".join(out) + "\n"


def collect() -> tuple[list[Block], list[str]]:
    """The blocks of every doc, and the rule breaks that kept a doc out."""
    blocks: list[Block] = []
    problems: list[str] = []
    for doc in DOCS:
        path = ROOT / doc
        if path.is_file():
            try:
                blocks += parse(doc, path.read_text())
            except ReadmeError as exc:
                problems.append(str(exc))
    return blocks, problems


BLOCKS, PROBLEMS = collect()


# --- the place a block runs in


def _shim(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _materialize(workdir: Path, rel: Path) -> None:
    """Turn the symlinked directories on the way to ``rel`` into real directories whose
    entries link to the checkout's, so ``rel`` can be replaced without touching it."""
    here = workdir
    for part in rel.parts[:-1]:
        here = here / part
        if here.is_symlink():
            target = here.resolve()
            here.unlink()
            here.mkdir()
            for entry in target.iterdir():
                (here / entry.name).symlink_to(entry)


def prepare_workdir(workdir: Path, block: Block) -> None:
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv") and not entry.name.startswith(".pytest"):
            (workdir / entry.name).symlink_to(entry)
    bin_dir = workdir / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = shlex.quote(sys.executable)
    _shim(bin_dir / "python", f'exec {python} "$@"')
    _shim(bin_dir / "novasandbox", f'exec {python} -m novasandbox.cli "$@"')
    for b in block.chain:
        for value in b.values("stub"):
            for rel in shlex.split(value):
                rel_path = Path(rel)
                if rel_path.is_absolute() or ".." in rel_path.parts:
                    raise ReadmeError(f"{block.id}: stub paths are relative: {rel!r}")
                _materialize(workdir, rel_path)
                target = workdir / rel_path
                if target.is_symlink() or target.exists():
                    target.unlink()
                target.parent.mkdir(parents=True, exist_ok=True)
                _shim(target, f"echo 'readme test: {rel} not run here (CI ran it already)'")


class Netns:
    """A network namespace for one block (see ``needs: netns``)."""

    def __init__(self) -> None:
        self.name = f"nsrd{os.getpid() % 100000}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        # nsenter, not ``ip -n``: that also remounts /sys in a mount namespace of its own,
        # which fails where / is not a mount point (a chroot, as on a fresh machine's CI)
        subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.name}", "ip", "link", "set", "lo", "up"],
            check=True,
            capture_output=True,
        )

    def leftover_taps(self) -> list[str]:
        old = os.environ.get("NOVASANDBOX_NETNS")
        os.environ["NOVASANDBOX_NETNS"] = self.name
        try:
            return [t.name for t in tap.existing()]
        finally:
            if old is None:
                os.environ.pop("NOVASANDBOX_NETNS", None)
            else:
                os.environ["NOVASANDBOX_NETNS"] = old

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        lease_dir = tap.RUN_DIR / self.name
        for entry in lease_dir.glob("*") if lease_dir.is_dir() else []:
            entry.unlink()
        if lease_dir.is_dir():
            lease_dir.rmdir()


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def clean_up_leftovers(state_root: Path) -> list[str]:
    """Kill and remove what a block left behind; say what it was."""
    left: list[str] = []
    for info in list_sandboxes(state_root):
        left.append(f"sandbox {info.id} ({info.state})")
        try:
            kill_sandbox(info.id, root=state_root)
        except Exception as exc:  # keep cleaning
            left.append(f"(could not kill {info.id}: {exc})")
    for snap in list_snapshots(include_ephemeral=True):
        left.append(f"snapshot {snap.id} ({snap.kind})")
        try:
            delete_snapshot(snap)
        except Exception:
            pass
    pids = qemu_processes_under(state_root)
    if pids:
        left.append(f"QEMU processes {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return left


def _run_setup(block: Block, workdir: Path, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    started = []
    for n, command in enumerate(v for b in block.chain for v in b.values("setup")):
        log = workdir / f".readme-setup-{n}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", command],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # what it leaves in the background dies with it
            )
        started.append(proc)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{block.id}: setup {command!r} did not finish") from None
        if proc.returncode != 0:
            raise AssertionError(
                f"{block.id}: setup {command!r} failed ({proc.returncode}):\n"
                + log.read_text(errors="replace")
            )
    return started


def run_block(block: Block, state_root: Path) -> subprocess.CompletedProcess[str]:
    needs = {v for b in block.chain for v in b.values("needs")}
    if needs & {"root", "netns"} and os.geteuid() != 0:
        pytest.skip(f"{block.id} needs root ({', '.join(sorted(needs))})")
    with tempfile.TemporaryDirectory(prefix="readme-") as tmp:
        workdir = Path(tmp)
        prepare_workdir(workdir, block)
        env = dict(os.environ)
        env["PATH"] = f"{workdir / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env["NOVASANDBOX_STATE_DIR"] = str(state_root)
        env.pop("NOVASANDBOX_NETNS", None)
        for b in block.chain:
            for pair in b.values("env"):
                key, _, value = pair.partition("=")
                env[key] = value
        netns = Netns() if "netns" in needs else None
        if netns is not None:
            env["NOVASANDBOX_NETNS"] = netns.name
        background: list[subprocess.Popen[bytes]] = []
        try:
            background = _run_setup(block, workdir, env)
            if block.lang == "python":
                script = workdir / "readme_block.py"
                script.write_text("\n".join(b.code for b in block.chain))
                argv = [sys.executable, "-c", PYTHON_RUNNER, str(script)]
            else:
                code = console_commands(block.code) if block.lang == "console" else block.code
                script = workdir / "readme_block.sh"
                script.write_text(code)
                argv = ["bash", "-euo", "pipefail", str(script)]
            timeout = float(block.one("timeout") or DEFAULT_TIMEOUT)
            return _run_in_session(block, argv, workdir, env, timeout)
        finally:
            for proc in background:
                _killpg(proc)
            if netns is not None:
                try:
                    taps = netns.leftover_taps()
                finally:
                    netns.close()
                assert taps == [], f"{block.id} left TAP devices {taps}"


def _stop_session(pgid: int) -> None:
    """SIGTERM what is left of a block's process group (a server it started with ``&``),
    then SIGKILL what has not ended after ``STOP_GRACE`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _run_in_session(
    block: Block, argv: list[str], workdir: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a block in a session of its own, its output in files (not pipes, which a
    process it leaves in the background would hold open), and stop what it left."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            argv, cwd=workdir, env=env, stdout=out, stderr=err, start_new_session=True
        )
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_session(proc.pid)
            proc.wait()
            out.seek(0)
            text = out.read().decode(errors="replace")
            raise AssertionError(f"{block.id} ran past {timeout:.0f} s:\n{_tail(text)}") from None
        finally:
            _stop_session(proc.pid)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            argv, status, out.read().decode(errors="replace"), err.read().decode(errors="replace")
        )


def judge(block: Block, done: subprocess.CompletedProcess[str], left: list[str]) -> list[str]:
    """What is wrong with a block's run (nothing: it passed)."""
    output = f"--- stdout\n{_tail(done.stdout)}\n--- stderr\n{_tail(done.stderr)}"
    problems = []
    want = int(block.one("exit") or 0)
    if done.returncode != want:
        problems.append(f"exited {done.returncode}, not {want}")
    if left:
        problems.append(f"left behind: {', '.join(left)}")
    if EXIT_HANDLER_KILL in done.stderr:
        problems.append("left a sandbox running for the library's exit handler to kill")
    for pattern in block.values("expect"):
        if not re.search(pattern, done.stdout, re.MULTILINE):
            problems.append(f"stdout does not match {pattern!r}")
    return [f"{block.id}: {p}\n{output}" for p in problems]


def run_and_judge(block: Block, state_root: Path) -> list[str]:
    try:
        done = run_block(block, state_root)
    finally:
        left = clean_up_leftovers(state_root)
    return judge(block, done, left)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block: Block, state_root: Path) -> None:
    reason = block.one("skip")
    if reason is not None:
        pytest.skip(f"{block.id}: {reason}")
    problems = run_and_judge(block, state_root)
    assert problems == [], "\n".join(problems)
    assert_no_leftovers(state_root)


def test_the_readmes_follow_the_marker_rules() -> None:
    assert PROBLEMS == []


def test_the_readmes_have_blocks_and_few_explained_skips() -> None:
    assert {b.doc for b in BLOCKS} >= {"README.md"}
    assert sum(1 for b in BLOCKS if b.lang == "python") >= 3
    assert sum(1 for b in BLOCKS if b.lang != "python") >= 2
    skipped = [(b.id, b.one("skip")) for b in BLOCKS if b.one("skip") is not None]
    assert len(skipped) <= MAX_SKIPS, f"too many skipped blocks: {skipped}"
    assert all(reason and reason.strip() for _, reason in skipped)


# --- the harness itself (no VM)

SAMPLE = """\
# t

```text
novasandbox run -- CMD
```

<!-- an ordinary comment -->
<!-- readme: setup: touch a -->
<!-- readme: env: A=1 -->
```python
import os
x = 1
```

<!-- readme: continues -->
<!-- readme: expect: ^2$ -->
```python
print(x + 1)
```

- a list
  ```console
  $ echo one \\
      two
  one two
  $ true
  ```
"""


def test_parser_reads_markers_chains_and_transcripts() -> None:
    blocks = parse("T.md", SAMPLE)
    assert [(b.line, b.lang) for b in blocks] == [(10, "python"), (17, "python"), (22, "console")]
    first, second, console = blocks
    assert first.markers == [("setup", "touch a"), ("env", "A=1")]
    assert second.previous is first and second.chain == [first, second]
    assert second.values("expect") == ["^2$"] and second.one("continues") == ""
    assert console_commands(console.code) == "echo one \\\n    two\ntrue\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("```\nls\n```\n", "without a language"),
        ("```rust\nfn main() {}\n```\n", "unknown block language"),
        ("<!-- readme: skip -->\n```sh\nls\n```\n", "needs a value"),
        ("<!-- readme: needs: gpu -->\n```sh\nls\n```\n", "'needs' takes"),
        ("<!-- readme: sudo -->\n```sh\nls\n```\n", "unknown readme marker"),
        ("<!-- readme: continues -->\n```python\npass\n```\n", "needs a python block"),
        ("<!-- readme: setup: ls -->\n```text\nx\n```\n", "markers on a text block"),
        ("```sh\nls\n", "never closed"),
    ],
    ids=[
        "untagged",
        "unknown-lang",
        "empty-skip",
        "bad-needs",
        "bad-key",
        "orphan",
        "text",
        "open",
    ],
)
def test_parser_refuses_what_would_hide_a_block(text: str, message: str) -> None:
    with pytest.raises(ReadmeError, match=message):
        parse("T.md", text)


@pytest.mark.parametrize(
    ("lang", "code", "markers", "wanted"),
    [
        ("sh", "echo out; exit 3\n", [], "exited 3, not 0"),
        ("sh", "exit 3\n", [("exit", "3")], None),
        ("console", "$ echo one\none\n", [("expect", "^two$")], "does not match '^two$'"),
        ("sh", "test -f made && echo ok\n", [("setup", "touch made")], None),
        ("sh", "./scripts/setup.sh\n", [("stub", "./scripts/setup.sh")], None),
        (
            "python",
            "from novasandbox import Sandbox\nsb = Sandbox.create('python')\n",
            [],
            "exit handler",
        ),
        (
            "python",
            "from novasandbox import Sandbox\n"
            "with Sandbox.create('python') as sb:\n    sb.snapshot()\n",
            [],
            "left behind: snapshot",
        ),
    ],
    ids=["status", "exit-marker", "expect", "setup", "stub", "exit-handler", "snapshot-left"],
)
def test_the_harness_fails_what_it_should(
    state_root: Path, lang: str, code: str, markers: list[tuple[str, str]], wanted: str | None
) -> None:
    problems = run_and_judge(Block("T.md", 1, lang, code, markers), state_root)
    if wanted is None:
        assert problems == []
    else:
        assert len(problems) == 1 and wanted in problems[0], problems
    assert_no_leftovers(state_root)
