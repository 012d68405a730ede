"""Building a template's artifacts: the guest kernel, the base root file system, the image.

* kernel: Debian's ``linux-source-6.1`` tarball, ``make tinyconfig``, our fragment merged
  on top (``kernel.config``), then ``make vmlinux``. Every option of the fragment is
  checked to have survived ``olddefconfig``.
* base: ``mmdebstrap`` of the template's suite/variant/packages into a tarball (no
  Recommends; documentation, man pages and locales excluded), then the template's
  ``customize`` commands, each run by ``/bin/sh -c`` as root in a chroot of the new root.
* image: the base plus our guest agent and the template's defaults for it
  (``/opt/novasandbox/template.json``; its ``env`` also as
  ``/etc/profile.d/novasandbox.sh`` so login shells get it), packed into ext4 with
  ``mke2fs -d`` (no loop devices, no mounts). The image is made read-only: sandboxes
  only ever see it as the backing file of their own copy-on-write overlay.

Each artifact is written under a temporary name and renamed into place when complete,
so an interrupted build never leaves a half artifact that looks finished.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import HostToolMissing, TemplateBuildError
from . import (
    GUEST_DIR,
    GUEST_FILES,
    TEMPLATE_DEFAULTS,
    BuiltTemplate,
    Template,
    TemplateManager,
    oci,
)

log = logging.getLogger("novasandbox.templates")

# (program or file, Debian package that provides it)
KERNEL_TOOLS = [
    ("make", "make"),
    ("gcc", "gcc"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("xz", "xz-utils"),
    ("tar", "tar"),
    ("perl", "perl"),
    ("/usr/include/libelf.h", "libelf-dev"),
    ("/usr/include/openssl/ssl.h", "libssl-dev"),
]
IMAGE_TOOLS = [("mmdebstrap", "mmdebstrap"), ("mke2fs", "e2fsprogs"), ("tar", "tar")]


class BuildReporter(Protocol):
    """Receives progress of a build (the CLI draws it with rich; the default logs it)."""

    def step(self, name: str, description: str) -> None: ...
    def advance(self, name: str, detail: str) -> None: ...
    def done(self, name: str, detail: str) -> None: ...


class LogReporter:
    def step(self, name: str, description: str) -> None:
        log.info("%s: %s", name, description)

    def advance(self, name: str, detail: str) -> None:
        log.debug("%s: %s", name, detail)

    def done(self, name: str, detail: str) -> None:
        log.info("%s: %s", name, detail)


def missing_tools(tools: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (tool, package) pairs not present on this host."""
    out = []
    for tool, package in tools:
        present = Path(tool).exists() if tool.startswith("/") else shutil.which(tool) is not None
        if not present:
            out.append((tool, package))
    return out


def require_tools(tools: Sequence[tuple[str, str]]) -> None:
    missing = missing_tools(tools)
    if len(missing) == 1:
        raise HostToolMissing(*missing[0])
    if missing:
        names = ", ".join(t for t, _ in missing)
        packages = " ".join(sorted({p for _, p in missing}))
        err = HostToolMissing(names, packages)
        raise err


def kernel_source_tarball(package: str) -> Path:
    version = package.removeprefix("linux-source-")
    path = Path(f"/usr/src/linux-source-{version}.tar.xz")
    if not path.is_file():
        raise HostToolMissing(str(path), package)
    return path


def _run(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    what: str,
    on_line: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Run a build step, streaming its output lines; on failure raise with its last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        env=env,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail.append(line)
        if on_line is not None:
            on_line(line)
    if proc.wait() != 0:
        raise TemplateBuildError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def _fragment_options(text: str) -> list[str]:
    """The fragment's lines as they must appear in the final .config: ``CONFIG_X=y``
    lines and ``# CONFIG_X is not set`` ones."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") or re.fullmatch(r"# CONFIG_\w+ is not set", line):
            out.append(line)
    return out


def build_kernel(tpl: Template, dest: Path, reporter: BuildReporter) -> None:
    """Compile the guest kernel into ``dest`` (a vmlinux)."""
    require_tools(KERNEL_TOOLS)
    tarball = kernel_source_tarball(tpl.kernel_source_package)
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kbuild-", dir=dest.parent) as tmp:
        work = Path(tmp)
        reporter.step("kernel", f"unpacking {tarball.name}")
        _run(["tar", "-xf", str(tarball), "-C", str(work)], what="unpacking the kernel source")
        src = next(p for p in work.iterdir() if p.is_dir())
        fragment = work / "novasandbox.config"
        fragment.write_text(tpl.kernel_config)
        reporter.advance("kernel", "configuring (tinyconfig + novasandbox fragment)")
        _run(["make", "-s", "tinyconfig"], cwd=src, what="make tinyconfig")
        _run(
            ["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)],
            cwd=src,
            what="merging the kernel config fragment",
        )
        _run(["make", "-s", "olddefconfig"], cwd=src, what="make olddefconfig")
        final = set((src / ".config").read_text().splitlines())
        dropped = [opt for opt in _fragment_options(tpl.kernel_config) if opt not in final]
        if dropped:
            raise TemplateBuildError(
                "kernel options of the fragment did not survive olddefconfig "
                f"(missing dependencies?): {', '.join(dropped)}"
            )
        jobs = str(os.cpu_count() or 1)
        count = 0

        def on_line(line: str) -> None:
            nonlocal count
            if line.lstrip().startswith(("CC ", "LD ", "AR ", "AS ")):
                count += 1
                reporter.advance("kernel", f"[{count}] {line.strip()}")

        reporter.step("kernel", f"compiling vmlinux with {jobs} jobs")
        _run(
            ["make", f"-j{jobs}", "vmlinux"], cwd=src, what="compiling the kernel", on_line=on_line
        )
        release = (src / "include" / "config" / "kernel.release").read_text().strip()
        partial = dest.with_suffix(".partial")
        shutil.copyfile(src / "vmlinux", partial)
        shutil.copyfile(src / ".config", dest.parent / "config")
        (dest.parent / "manifest.json").write_text(
            json.dumps(
                {
                    "kernel_release": release,
                    "source": str(tarball),
                    "digest": tpl.kernel_digest,
                    "build_seconds": round(time.monotonic() - t0, 1),
                },
                indent=2,
            )
        )
        partial.rename(dest)
    reporter.done("kernel", f"vmlinux {release} in {time.monotonic() - t0:.0f} s")


def mmdebstrap_argv(tpl: Template, dest: Path) -> list[str]:
    """The mmdebstrap command that makes the template's base tarball ``dest``."""
    argv = ["mmdebstrap", f"--variant={tpl.variant}", "--mode=root"]
    if tpl.packages:
        argv.append("--include=" + ",".join(tpl.packages))
    for excluded in (
        "/usr/share/doc/*",
        "/usr/share/man/*",
        "/usr/share/info/*",
        "/usr/share/locale/*",
    ):
        argv.append(f"--dpkgopt=path-exclude={excluded}")
    argv.append("--dpkgopt=path-include=/usr/share/doc/*/copyright")
    for command in tpl.customize:
        # mmdebstrap runs a hook with the shell, the new root as $1
        argv.append(f'--customize-hook=chroot "$1" /bin/sh -c {shlex.quote(command)}')
    return [*argv, tpl.suite, str(dest)]


def build_base(tpl: Template, dest: Path, reporter: BuildReporter) -> None:
    """mmdebstrap the template's root file system into a tarball."""
    require_tools(IMAGE_TOOLS)
    if os.geteuid() != 0:
        raise TemplateBuildError("building a root file system needs root (mmdebstrap, ownership)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".partial.tar")
    t0 = time.monotonic()
    reporter.step("rootfs", f"mmdebstrap {tpl.suite} ({tpl.variant}) + {' '.join(tpl.packages)}")
    argv = mmdebstrap_argv(tpl, partial)

    def on_line(line: str) -> None:
        reporter.advance("rootfs", line.strip()[:100])

    try:
        _run(argv, what="mmdebstrap", on_line=on_line)
        partial.rename(dest)
    finally:
        partial.unlink(missing_ok=True)
    reporter.done("rootfs", f"base root file system in {time.monotonic() - t0:.0f} s")


def profile_script(env: Mapping[str, str]) -> str:
    """``/etc/profile.d`` lines for login shells (``bash -l``), which /etc/profile starts
    with a PATH of its own: the agent's commands get back the PATH the agent gave them
    (the template's, the sandbox's or the call's, in ``NOVASANDBOX_PATH``); other login
    shells (``su -``, ``sudo -i``) get the template's environment where theirs lacks it."""
    lines = [
        "# Written by NovaSandbox: the template's default environment.",
        'if [ -n "${NOVASANDBOX_PATH-}" ]; then',
        '    PATH="$NOVASANDBOX_PATH"',
        "    unset NOVASANDBOX_PATH",
    ]
    if "PATH" in env:
        lines += ["else", f"    PATH={shlex.quote(env['PATH'])}"]
    lines += ["fi", "export PATH"]
    lines += [
        f'export {key}="${{{key}-{_double_quoted(value)}}}"'
        for key, value in sorted(env.items())
        if key != "PATH"
    ]
    return "\n".join(lines) + "\n"


def _double_quoted(value: str) -> str:
    """``value`` as it may stand inside ``"..."`` in a POSIX shell."""
    return "".join("\\" + c if c in '"\\$`' else c for c in value)


def quicken_profile(path: Path) -> None:
    """Debian's /etc/profile asks ``$(id -u)`` whether the shell runs as root: a process
    for every login shell, so for every command string (about 100 ms under emulation).
    bash knows it already (``$EUID``); other shells still ask ``id``."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    quick = text.replace('"$(id -u)"', '"${EUID:-$(id -u)}"')
    if quick != text:
        path.write_text(quick)


def install_guest(root: Path, tpl: Template) -> None:
    """Put our agent (PID 1), the template's defaults for it and basic identity files
    into an unpacked root file system. A layered template's root gets no defaults: its
    last layer has them (``layers.py``)."""
    target = root / "opt" / "novasandbox"
    target.mkdir(parents=True, exist_ok=True)
    for name in GUEST_FILES:
        shutil.copyfile(GUEST_DIR / name, target / name)
    layered = tpl.layered
    (target / TEMPLATE_DEFAULTS).write_text("{}" if layered else tpl.guest_defaults())
    profile_d = root / "etc" / "profile.d"
    profile_d.mkdir(parents=True, exist_ok=True)
    (profile_d / "novasandbox.sh").write_text(profile_script({} if layered else tpl.env))
    quicken_profile(root / "etc" / "profile")
    (target / "init").chmod(0o755)
    (target / "agent.py").chmod(0o755)
    (root / "etc" / "hostname").write_text("sandbox\n")
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost sandbox\n::1\tlocalhost\n")
    for junk in ("var/lib/apt/lists", "var/cache/apt"):
        path = root / junk
        if path.is_dir():
            for child in path.iterdir():
                if child.is_file():
                    child.unlink()


def build_image(
    tpl: Template,
    base: Path,
    dest_dir: Path,
    kernel: Path,
    reporter: BuildReporter,
    *,
    fill: Callable[[Path], None] | None = None,
) -> None:
    """Unpack the base (or let ``fill`` make the root file system), add the agent, make
    the ext4 image and its manifest (for a layered template: its root layer, which its
    steps start from)."""
    require_tools(IMAGE_TOOLS)
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    reporter.step("image", f"ext4 image ({tpl.disk_size_mib} MiB) with the guest agent")
    with tempfile.TemporaryDirectory(prefix=".build-", dir=dest_dir.parent) as tmp:
        work = Path(tmp)
        root = work / "root"
        if fill is not None:
            fill(root)
        else:
            root.mkdir()
            _run(["tar", "-xf", str(base), "-C", str(root)], what="unpacking the base")
        install_guest(root, tpl)
        if fill is None and os.geteuid() == 0 and (root / "usr/bin/python3").exists():
            # Byte-compile the agent with the guest's own Python, so no sandbox pays for it.
            _run(
                [
                    "chroot",
                    str(root),
                    "/usr/bin/python3",
                    "-m",
                    "compileall",
                    "-q",
                    "/opt/novasandbox",
                ],
                what="compiling the agent",
            )
        out = work / "out"
        out.mkdir()
        image = out / "rootfs.ext4"
        _run(
            [
                "mke2fs",
                "-q",
                "-F",
                "-t",
                "ext4",
                "-L",
                "nsroot",
                "-m",
                "0",
                "-d",
                str(root),
                str(image),
                f"{tpl.disk_size_mib}M",
            ],
            what="mke2fs",
        )
        image.chmod(0o444)
        (out / "manifest.json").write_text(
            json.dumps(
                {
                    "template": tpl.name,
                    "digest": tpl.digest,
                    "image_digest": tpl.image_digest,
                    "kernel_digest": tpl.kernel_digest,
                    "kernel": f"kernels/{kernel.parent.name}/{kernel.name}",  # in the cache
                    "base_digest": tpl.base_digest,
                    "packages": list(tpl.packages),
                    "customize": list(tpl.customize),
                    "env": dict(tpl.env),
                    "suite": tpl.suite,
                    "disk_size_mib": tpl.disk_size_mib,
                    "built_at": time.time(),
                },
                indent=2,
            )
        )
        if dest_dir.exists():
            shutil.rmtree(dest_dir)
        out.rename(dest_dir)
    if tpl.layered:
        return
    # Older images of this template are superseded (running sandboxes keep theirs open).
    for old in dest_dir.parent.iterdir():
        if old != dest_dir and old.is_dir() and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    reporter.done("image", f"rootfs.ext4 in {time.monotonic() - t0:.1f} s")


def build_template(
    manager: TemplateManager,
    tpl: Template,
    *,
    reporter: BuildReporter | None = None,
    force: bool = False,
) -> None:
    rep: BuildReporter = reporter or LogReporter()
    missing = missing_tools(KERNEL_TOOLS + IMAGE_TOOLS)
    if missing:
        require_tools(missing)
    kernel = manager.kernel_path(tpl)
    if force or not kernel.is_file():
        build_kernel(tpl, kernel, rep)
    else:
        rep.done("kernel", f"cached ({tpl.kernel_digest})")
    base = manager.base_path(tpl)
    if force or not base.is_file():
        build_base(tpl, base, rep)
    else:
        rep.done("rootfs", f"cached ({tpl.base_digest})")
    root = manager.root_image(tpl)
    if force or not root.is_file():
        build_image(tpl, base, root.parent, kernel, rep)
    else:
        rep.done("image", f"cached ({tpl.root_digest})")


def build_artifacts(
    manager: TemplateManager, name: str, *, reporter: Any = None, force: bool = False
) -> BuiltTemplate:
    """Build whatever of the template's kernel, base and image is missing from the cache
    (all of it with ``force``); a no-op when all is there. Its snapshots are made by
    ``novasandbox.warmup``; a layered template's steps by ``novasandbox.layers``."""
    tpl = manager.get(name)
    if tpl.layered:
        raise TemplateBuildError(f"template {name!r} is built in layers (novasandbox.warmup)")
    if force or manager.built(tpl) is None:
        build_template(manager, tpl, reporter=reporter or LogReporter(), force=force)
    return manager.require_built(name)


def build_root(
    manager: TemplateManager, tpl: Template, *, reporter: Any = None, force: bool = False
) -> None:
    """A layered template's kernel and root layer (a suite's root file system, or a
    container image's, with the agent), unless they are in the cache (and unless
    ``force``)."""
    if tpl.parent is not None:
        raise TemplateBuildError(f"template {tpl.name!r} starts from {tpl.parent.name!r}")
    rep = reporter or LogReporter()
    if tpl.oci is None:
        if force or not manager.root_image(tpl).is_file() or not manager.kernel_path(tpl).is_file():
            build_template(manager, tpl, reporter=rep, force=force)
        return
    kernel = manager.kernel_path(tpl)
    if force or not kernel.is_file():
        require_tools(KERNEL_TOOLS)
        build_kernel(tpl, kernel, rep)
    root = manager.root_image(tpl)
    if force or not root.is_file():
        build_image(tpl, Path(), root.parent, kernel, rep, fill=lambda d: unpack_oci(tpl, d, rep))
    else:
        rep.done("image", f"cached ({tpl.root_digest})")


def unpack_oci(tpl: Template, root: Path, rep: BuildReporter) -> None:
    """Fill ``root`` with the template's container image: its layers applied, and
    ``/usr/bin/python3`` made to point at its Python (the agent's interpreter) if it
    has one elsewhere. Nothing of the image runs on the host."""
    assert tpl.oci is not None
    t0 = time.monotonic()
    rep.step("container image", f"unpacking {tpl.oci.name}")
    image = oci.load_image(tpl.oci, tpl.oci_tag)
    if image.digest != tpl.oci_digest:
        raise TemplateBuildError(f"container image {tpl.oci} changed while it was read")
    stats = oci.unpack(image, root)
    python = oci.python_in_rootfs(root, image.env.get("PATH"))
    if python is None:
        raise TemplateBuildError(
            f"container image {tpl.oci} has no python3 (on its PATH): NovaSandbox's guest "
            "agent is a Python 3 program; start from an image with Python (python:3.12-slim, "
            "debian with python3 installed) or from a Debian template"
        )
    usr_bin = root / "usr" / "bin"
    if python != "/usr/bin/python3" and not (usr_bin / "python3").is_symlink():
        usr_bin.mkdir(parents=True, exist_ok=True)
        (usr_bin / "python3").unlink(missing_ok=True)
        (usr_bin / "python3").symlink_to(python)
    rep.done(
        "container image",
        f"{len(image.layers)} layers, {stats.files} files, {stats.bytes / 1e6:.0f} MB "
        f"({stats.whiteouts} whiteouts) in {time.monotonic() - t0:.1f} s",
    )
