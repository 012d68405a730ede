"""A layered template's build steps, each run in a build VM and kept as a layer.

A template that starts from another template or a container image, or that has steps
(``templates/definition.py``), is a chain of disk images: its root (a suite's or a
container image's root file system with our agent, or the parent's whole image), one
qcow2 layer per step, and last a layer with the template's defaults for the guest agent
(``template.json``: environment, user, working directory). Each layer lives in
``<cache>/layers/<digest>/disk.qcow2``, its digest made of its step and everything
before it, so a change to a late step keeps the earlier layers, and building again
with nothing changed runs nothing.

A step runs as root in a VM booted cold from the layer before it (the sandbox's
overlay then holds exactly what the step wrote), with a network only where it needs
one: ``apt`` reaches Debian's mirrors (and the template's ``[build] allow``), ``run``
the template's ``[build] allow`` (the public internet if it says nothing); ``pip`` and
``copy`` have none: the host's pip downloads the wheels for the guest's Python (so a
build works wherever ``pip download`` does, from the same index) and they are installed
offline. The guest's root file system is then frozen, the VM paused (QEMU flushes the
overlay), and the overlay is copied into place under a temporary name, its backing file
named relative to it (``qemu-img rebase -u``), so the cache can move.

Nothing half-built is ever marked as built: a layer appears only once complete, and
the template's manifest (what ``TemplateManager.built`` looks for) is written last.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import io
import json
import logging
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import NovaSandboxError, TemplateBuildError
from .network import NetworkMode
from .sandbox import AsyncSandbox
from .templates import (
    TEMPLATE_DEFAULTS,
    BuiltTemplate,
    Step,
    Template,
    TemplateManager,
    image_format,
)
from .templates.build import BuildReporter, LogReporter, profile_script
from .vm.qemu_argv import QEMU_IMG

log = logging.getLogger("novasandbox.layers")

APT_MIRRORS = ("deb.debian.org", "security.debian.org")
"""What an ``apt`` step may reach besides the template's ``[build] allow`` (ports 80
and 443): the mirrors a Debian root's sources name."""
BUILD_MEMORY_MIB = 1024
"""Memory of a build VM (pip and apt need more than a sandbox's default)."""
TAIL_LINES = 40
"""Lines of a failing step's output its error carries."""
WHEELS = "/tmp/novasandbox-wheels"
COPY_TAR = "/tmp/novasandbox-copy.tar"

GUEST_TAGS = """
import json, sys
try:
    from pip._vendor.packaging.tags import sys_tags
except ImportError:
    sys.exit(3)
tags = list(sys_tags())
seen = lambda xs: list(dict.fromkeys(xs))
print(json.dumps({
    "version": "%d.%d" % sys.version_info[:2],
    "implementation": tags[0].interpreter[:2],
    "abis": seen(t.abi for t in tags),
    "platforms": seen(t.platform for t in tags if t.platform != "any"),
    "prefix": sys.prefix,
}))
"""
"""Run by the guest's python3: what wheels it installs (``pip download``'s target)."""


def build_layers(
    manager: TemplateManager,
    tpl: Template,
    *,
    reporter: BuildReporter | None = None,
    no_cache: bool = False,
    provider: str | None = None,
) -> BuiltTemplate:
    """Run the template's steps that have no layer yet (every one with ``no_cache``),
    then write its manifest. Its root must be built. Blocking; runs its own event loop
    on a worker thread."""
    rep = reporter or LogReporter()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = _build_layers(manager, tpl, rep, no_cache, provider)
        return pool.submit(asyncio.run, job).result()


async def _build_layers(
    manager: TemplateManager,
    tpl: Template,
    rep: BuildReporter,
    no_cache: bool,
    provider: str | None,
) -> BuiltTemplate:
    kernel = manager.kernel_path(tpl)
    below = manager.root_image(tpl)
    if not below.is_file():
        raise TemplateBuildError(f"{tpl.name}: its root image {below} is not built")
    digests = tpl.layer_digests
    total = len(tpl.steps) + 1
    for index, (step, digest) in enumerate(zip((*tpl.steps, None), digests, strict=True), 1):
        name = f"step {index}/{total}"
        what = step.describe() if step is not None else "defaults: env, user, workdir"
        layer = manager.layer_file(digest)
        if layer.is_file() and not no_cache:
            rep.done(name, f"{what} (cached {digest})")
            below = layer
            continue
        rep.step(name, what)
        t0 = time.monotonic()
        await _make_layer(manager, tpl, step, below, kernel, layer, rep, name, provider)
        rep.done(name, f"{what} ({time.monotonic() - t0:.0f} s, {_size(layer) / 1e6:.1f} MB)")
        below = layer
    write_manifest(manager, tpl)
    return manager.require_built(tpl)


def _size(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def write_manifest(manager: TemplateManager, tpl: Template) -> None:
    """Mark a layered template built: its manifest, with its chain relative to the
    cache. Its older images (and their snapshots) go; layers stay until unused."""
    dest = manager.image_dir(tpl)
    dest.parent.mkdir(parents=True, exist_ok=True)
    chain = manager.disk_chain(tpl)
    manifest = {
        "template": tpl.name,
        "digest": tpl.digest,
        "image_digest": tpl.image_digest,
        "kernel_digest": tpl.kernel_digest,
        "parent": tpl.parent.name if tpl.parent is not None else None,
        "oci": str(tpl.oci) if tpl.oci is not None else None,
        "chain": [str(p.relative_to(manager.cache)) for p in chain],
        "steps": [s.describe() for s in tpl.steps],
        "env": dict(tpl.env),
        "user": tpl.user,
        "workdir": tpl.workdir,
        "start_cmd": tpl.start_cmd,
        "disk_size_mib": tpl.disk_size_mib,
        "built_at": time.time(),
    }
    dest.mkdir(exist_ok=True)
    partial = dest / f".manifest.{secrets.token_hex(4)}"
    partial.write_text(json.dumps(manifest, indent=2))
    partial.replace(dest / "manifest.json")
    for old in dest.parent.iterdir():
        if old != dest and old.is_dir() and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- one layer


def _network(tpl: Template, step: Step | None) -> tuple[str, tuple[str, ...] | None]:
    """The network of a step's VM: none, or "nat" with its allow list."""
    if step is None or step.kind in ("pip", "copy"):
        return NetworkMode.NONE, None
    if step.kind == "apt":
        mirrors = tuple(f"{host}:{port}" for host in APT_MIRRORS for port in (80, 443))
        return NetworkMode.NAT, (*mirrors, *(tpl.build_allow or ()))
    return NetworkMode.NAT, tpl.build_allow


async def _make_layer(
    manager: TemplateManager,
    tpl: Template,
    step: Step | None,
    below: Path,
    kernel: Path,
    dest: Path,
    rep: BuildReporter,
    name: str,
    provider: str | None,
) -> None:
    partial = dest.parent.with_name(f".{dest.parent.name}.partial-{secrets.token_hex(4)}")
    partial.mkdir(parents=True)
    try:
        network, allow = _network(tpl, step)
        async with _build_vm(manager, tpl, below, kernel, network, allow, provider) as sb:
            out = _Output(rep, name)
            if step is None:
                await _write_defaults(sb, tpl, out)
            elif step.kind == "apt":
                await _apt(sb, tpl, step, out)
            elif step.kind == "pip":
                await _pip(sb, tpl, step, out)
            elif step.kind == "copy":
                await _copy(sb, tpl, step, out)
            else:
                await _run(sb, tpl, step.args[0], step.describe(), out)
            await _capture_overlay(sb, partial / dest.name)
        rel = os.path.relpath(below, dest.parent)
        _qemu_img(["rebase", "-u", "-F", image_format(below), "-b", rel, str(partial / dest.name)])
        (partial / dest.name).chmod(0o444)
        (partial / "layer.json").write_text(
            json.dumps(
                {
                    "template": tpl.name,
                    "step": step.describe() if step else "defaults",
                    "below": rel,
                    "created_at": time.time(),
                },
                indent=2,
            )
        )
        if dest.parent.exists():  # --no-cache: the old layer goes (open files stay)
            shutil.rmtree(dest.parent)
        partial.rename(dest.parent)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _qemu_img(args: list[str]) -> None:
    done = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise TemplateBuildError(f"qemu-img {args[0]} failed: {done.stderr.strip()}")


@asynccontextmanager
async def _build_vm(
    manager: TemplateManager,
    tpl: Template,
    image: Path,
    kernel: Path,
    network: str,
    allow: tuple[str, ...] | None,
    provider: str | None,
) -> AsyncIterator[AsyncSandbox]:
    """A VM booted cold from ``image`` for one step; killed (and its state removed)
    when the step is done, whatever happens."""
    built = BuiltTemplate(tpl, kernel, image, {})
    sb = await AsyncSandbox._create_local(
        tpl.name,
        vcpus=min(2, os.cpu_count() or 1),
        memory_mib=max(BUILD_MEMORY_MIB, tpl.memory_mib),
        timeout=None,
        templates=manager,
        network=network,
        allow=allow,
        provider=provider,
        _image=built,
    )
    try:
        yield sb
    finally:
        await sb.kill()


async def _capture_overlay(sb: AsyncSandbox, dest: Path) -> None:
    """Trim the guest's root file system (what a step wrote and deleted, apt's lists,
    pip's wheels, leaves the layer: the overlay drops discarded clusters), freeze it
    (everything written reaches the disk, the file system left clean), pause the VM
    (QEMU flushes the overlay), copy it."""
    vm, agent = sb._vm, sb._agent
    if vm is None or agent is None:
        raise TemplateBuildError("the build VM is not running")
    with contextlib.suppress(NovaSandboxError):  # an image without fstrim: a bigger layer
        # sync first: ext4 frees what was deleted when its transaction commits
        trim = await sb.commands.run(
            ["/bin/sh", "-c", "sync && fstrim -v /"], user="root", timeout=300
        )
        log.debug("fstrim in the build VM: %s %s", trim.stdout.strip(), trim.stderr.strip())
    await agent.call("freeze", drop_caches=False, timeout=120)
    await vm.pause()
    # sparse: the clusters the trim dropped are holes in the overlay, and stay holes
    copied = await asyncio.create_subprocess_exec(
        "cp", "--sparse=always", str(sb.paths.overlay), str(dest)
    )
    if await copied.wait() != 0:
        raise TemplateBuildError(f"cannot copy the build VM's disk {sb.paths.overlay}")


class _Output:
    """A step's output: each line to the reporter, the last ones kept for its error."""

    def __init__(self, rep: BuildReporter, name: str) -> None:
        self.rep, self.name = rep, name
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._partial = ""

    def __call__(self, chunk: Any) -> None:
        text = chunk if isinstance(chunk, str) else bytes(chunk).decode(errors="replace")
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()[-4096:]
        for line in lines:
            self.line(line)

    def line(self, line: str) -> None:
        line = line.rstrip("\r")[-1000:]
        self.tail.append(line)
        show = getattr(self.rep, "output", None)
        if show is not None:
            show(self.name, line)
        else:
            self.rep.advance(self.name, line[:100])

    def flush(self) -> None:
        if self._partial:
            self.line(self._partial)
            self._partial = ""

    def text(self) -> str:
        self.flush()
        return "\n".join(self.tail)


async def _run(
    sb: AsyncSandbox,
    tpl: Template,
    command: str,
    what: str,
    out: _Output,
    env: dict[str, str] | None = None,
) -> str:
    """Run a shell command as root in the build VM, its output streamed; a failure is
    ``TemplateBuildError`` naming the step, the exit code and the last lines."""
    # in the workdir once it exists (the defaults' layer makes it, owned by the user:
    # made here it would be root's), else in /root
    cwd = shlex.quote(tpl.workdir or "/root")
    script = f"{{ [ -d {cwd} ] && cd {cwd}; }} || cd /root; {command}"
    result = await sb.commands.run(
        ["/bin/sh", "-c", script],
        user="root",
        env={**tpl.env, **(env or {})},
        timeout=tpl.step_timeout,
        on_stdout=out,
        on_stderr=out,
        max_output=1 << 20,
    )
    tail = out.text()
    if result.exit_code != 0:
        raise TemplateBuildError(
            f"template {tpl.name}: {what} failed (exit {result.exit_code}):\n{tail}",
            step=what,
            exit_code=result.exit_code,
            output=tail,
        )
    return result.stdout


async def _apt(sb: AsyncSandbox, tpl: Template, step: Step, out: _Output) -> None:
    packages = " ".join(shlex.quote(p) for p in step.args)
    script = (
        "set -e; apt-get update -q; "
        f"apt-get install -y -q --no-install-recommends {packages}; "
        "apt-get clean; rm -rf /var/lib/apt/lists/*"
    )
    await _run(sb, tpl, script, step.describe(), out, env={"DEBIAN_FRONTEND": "noninteractive"})


async def _pip(sb: AsyncSandbox, tpl: Template, step: Step, out: _Output) -> None:
    what = step.describe()
    probe = await sb.commands.run(
        ["python3", "-c", GUEST_TAGS], user="root", env=dict(tpl.env), timeout=120
    )
    if probe.exit_code != 0:
        raise TemplateBuildError(
            f"template {tpl.name}: {what}: the image has no python3 with pip "
            f"(`python3 -m pip` on the template's PATH): {probe.stderr.strip()[-300:]}",
            step=what,
            exit_code=probe.exit_code,
            output=probe.stderr[-2000:],
        )
    try:
        tags = json.loads(probe.stdout)
        version, impl = str(tags["version"]), str(tags["implementation"])
        abis, platforms, prefix = list(tags["abis"]), list(tags["platforms"]), str(tags["prefix"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TemplateBuildError(
            f"{what}: unreadable answer from the guest's python3: {exc}"
        ) from None
    with tempfile.TemporaryDirectory(prefix="novasandbox-wheels-") as tmp:
        argv = [sys.executable, "-m", "pip", "download", "--dest", tmp, "--only-binary=:all:"]
        argv += ["--python-version", version, "--implementation", impl, "--progress-bar", "off"]
        for abi in abis[:64]:
            argv += ["--abi", abi]
        for platform in platforms[:64]:
            argv += ["--platform", platform]
        await _host_command([*argv, *step.args], tpl, what, out)
        wheels = sorted(Path(tmp).iterdir())
        out.line(f"installing {len(wheels)} wheels in the guest")
        for wheel in wheels:
            with wheel.open("rb") as f:
                await sb.files.write(f"{WHEELS}/{wheel.name}", f, user="root", timeout=600)
        requirements = " ".join(shlex.quote(r) for r in step.args)
        owner = (
            '[ "$p" = /usr ] || chown -R --reference="$p" "$p"'
            if prefix not in ("/usr", "/usr/local")
            else "true"
        )
        script = (
            f"python3 -m pip install --no-index --find-links {WHEELS} --no-cache-dir "
            f"--disable-pip-version-check --progress-bar off {requirements}; s=$?; "
            f"rm -rf {WHEELS}; p={shlex.quote(prefix)}; {owner}; exit $s"
        )
        await _run(sb, tpl, script, what, out, env={"PIP_BREAK_SYSTEM_PACKAGES": "1"})


async def _host_command(argv: list[str], tpl: Template, what: str, out: _Output) -> None:
    """Run a host program for a step (the host's pip), its output streamed."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(tpl.step_timeout):
            async for raw in proc.stdout:
                out.line(raw.decode(errors="replace").rstrip("\n"))
            code = await proc.wait()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if code != 0:
        tail = out.text()
        raise TemplateBuildError(
            f"template {tpl.name}: {what} failed on the host (pip download, exit {code}; pip "
            f"steps install wheels for the guest's Python):\n{tail}",
            step=what,
            exit_code=code,
            output=tail,
        )


async def _guest_ids(sb: AsyncSandbox, tpl: Template, owner: str, what: str) -> tuple[int, int]:
    """The numeric uid and gid of ``USER[:GROUP]`` in the guest."""
    user, _, group = owner.partition(":")
    script = f"id -u {shlex.quote(user)} && "
    script += (
        f"getent group {shlex.quote(group)} | cut -d: -f3"
        if group
        else f"id -g {shlex.quote(user)}"
    )
    if user.isdigit() and (not group or group.isdigit()):
        return int(user), int(group or user)
    result = await sb.commands.run(["/bin/sh", "-c", script], user="root", timeout=60)
    words = result.stdout.split()
    if result.exit_code != 0 or len(words) != 2 or not all(w.isdigit() for w in words):
        raise TemplateBuildError(
            f"template {tpl.name}: {what}: the guest has no account {owner!r}", step=what
        )
    return int(words[0]), int(words[1])


def copy_archive(step: Step, uid: int, gid: int) -> tuple[bytes, str, str]:
    """A tar of what a copy step copies, owned by ``uid:gid``, with the step's mode;
    and the guest directory to extract it in and the entry it makes there (the
    destination itself: a directory's contents, or one file)."""
    assert step.src is not None
    buf = io.BytesIO()
    dest = PurePosixPath(step.dest)
    src = step.src

    def fix(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid, info.gid, info.uname, info.gname = uid, gid, "", ""
        if step.mode is not None and not info.issym():
            info.mode = step.mode
        return info

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if src.is_dir() and not src.is_symlink():
            for child in sorted(src.iterdir()):
                tar.add(child, arcname=child.name, filter=fix)
            return buf.getvalue(), str(dest), "."
        into_dir = step.dest.endswith("/")
        name = src.name if into_dir else dest.name
        tar.add(src, arcname=name, filter=fix)
        return buf.getvalue(), str(dest) if into_dir else str(dest.parent), name


async def _copy(sb: AsyncSandbox, tpl: Template, step: Step, out: _Output) -> None:
    what = step.describe()
    assert step.src is not None
    if not (step.src.exists() or step.src.is_symlink()):  # a pinned definition's
        raise TemplateBuildError(
            f"template {tpl.name}: {what}: {step.src} is not on this host (the definition "
            "pins its content: import the built template, or put the files there)",
            step=what,
        )
    uid, gid = await _guest_ids(sb, tpl, step.owner, what)
    data, directory, _ = await asyncio.to_thread(copy_archive, step, uid, gid)
    await sb.files.write(COPY_TAR, data, user="root", timeout=600)
    d = shlex.quote(directory)
    made = f"chown {uid}:{gid} {d}" + (f" && chmod {step.mode:o} {d}" if step.mode else "")
    script = (
        f"if [ ! -e {d} ]; then mkdir -p {d} && {made}; fi && "
        f"tar -xpf {COPY_TAR} --same-owner -C {d}; s=$?; rm -f {COPY_TAR}; exit $s"
    )
    out.line(f"{len(data)} bytes into {step.dest}")
    await _run(sb, tpl, script, what, out)


async def _write_defaults(sb: AsyncSandbox, tpl: Template, out: _Output) -> None:
    """The last layer: the template's defaults for the guest agent and login shells; its
    user must exist and its working directory is made (theirs) if missing."""
    what = "defaults"
    await _guest_ids(sb, tpl, tpl.user, f"{what}: user")
    await sb.files.write(
        f"/opt/novasandbox/{TEMPLATE_DEFAULTS}", tpl.guest_defaults(), user="root", mode=0o644
    )
    await sb.files.write(
        "/etc/profile.d/novasandbox.sh", profile_script(tpl.env), user="root", mode=0o644
    )
    # the agent byte-compiled by the guest's own Python (a container image's root is never
    # run on the host; a Debian root's was compiled when it was made: nothing to do)
    script = "/usr/bin/python3 -m compileall -q /opt/novasandbox >/dev/null 2>&1 || true"
    if tpl.workdir is not None:
        w = shlex.quote(tpl.workdir)
        script += f"; [ -d {w} ] || {{ mkdir -p {w} && chown {shlex.quote(tpl.user)}: {w}; }}"
    await _run(sb, tpl, script, what, out)
    out.line(f"user {tpl.user}, workdir {tpl.workdir or '(home)'}, {len(tpl.env)} variables")
