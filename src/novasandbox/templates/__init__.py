"""Templates: what a sandbox boots from (a guest kernel, a root file system with our agent).

A template is a TOML file. The ones shipped in this package sit beside this module;
users add their own from directories named in ``NOVASANDBOX_TEMPLATE_PATH`` (separated
by ``:``) or passed to ``TemplateManager(template_dirs=...)``; a user template with a
shipped template's name replaces it.

Built artifacts are cached under the cache directory, keyed by a digest of their inputs:

    kernels/<kernel digest>/vmlinux            (shared by every template with that config)
    bases/<base digest>.tar                    (mmdebstrap output)
    templates/<name>/<image digest>/rootfs.ext4 + manifest.json
    layers/<digest>/rootfs.ext4 or disk.qcow2 + layer.json   (a layered template's)
    definitions/<name>.toml                    (``TemplateBuilder``'s, and imported ones)
    templates/<name>/<image digest>/snapshots/<key>/   (``template build``: default shape)
    templates/<name>/<image digest>/shapes/<key>/      (saved by the first cold boot of
                                                        another machine shape; bounded)

so building again when nothing changed does nothing. Nothing in the cache names a
path by where the cache is: manifests name files relative to the cache (an image's) or
to their own folder (a snapshot's), and every qcow2 image names its backing file
relative to itself; so a cache can be copied or moved (another ``NOVASANDBOX_CACHE_DIR``,
user or host), and a template exported and imported (``templates/archive.py``).

Nothing is removed behind a template's back except its older images (a rebuild
supersedes them); ``TemplateManager.prune_plan``/``prune`` remove the kernels, bases and
images that no defined template uses, keeping anything a caller says is in use (a live
sandbox's disk chain, a user snapshot's files) or that a process holds open.

Besides the package list, a template may carry ``[image] customize``: shell commands run
as root in a chroot of the new root file system once its packages are installed (part
of the base), and a top-level ``[env]`` table: the default environment of every command
run in its sandboxes (written into the image for the guest agent, so it holds for cold
boots and restored snapshots alike; a sandbox's ``env`` and a call's ``env`` override
it, name by name), and a top-level ``user``: the guest account commands, files and
terminals act as when a call names none (``root`` if the template says nothing; the
``python`` template makes and names ``user``).
"""

from __future__ import annotations

import builtins
import json
import os
import re
import secrets
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import TemplateError, TemplateNotBuilt, TemplateNotFound, check_int
from ..paths import cache_dir
from .definition import (
    BUILTIN_DIR,
    GUEST_DIR,
    GUEST_FILES,
    IMAGE_RECIPE,
    KERNEL_RECIPE,
    MAX_PARENTS,
    NAME,
    Step,
    Template,
    parse_definition,
)

LAYER_DISK = "disk.qcow2"
TEMPLATE_DEFAULTS = "template.json"
"""Written beside the agent in the image: ``Template.guest_defaults()``."""

SHAPE_SNAPSHOTS = 4
"""How many snapshots of other machine shapes (vCPUs, memory, network device) a template
image keeps; the least recently used one is evicted when a new shape is saved."""
STALE_PARTIAL_S = 3600.0
"""A half-written shape snapshot older than this was left by a process that died."""

_NAME = NAME
_DIGEST = re.compile(r"^[0-9a-f]{16}$")
_BASE = re.compile(r"^[0-9a-f]{16}\.tar$")


@dataclass(frozen=True, slots=True)
class BuiltTemplate:
    """A template whose artifacts are in the cache and ready to boot."""

    template: Template
    kernel: Path
    rootfs: Path
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.template.name


class TemplateManager:
    """Finds template definitions and their built artifacts; builds and removes them."""

    def __init__(
        self,
        cache: Path | None = None,
        template_dirs: Sequence[str | os.PathLike[str]] = (),
        *,
        shape_snapshots: int = SHAPE_SNAPSHOTS,
    ) -> None:
        check_int("shape_snapshots", shape_snapshots, 0, 64)
        self.cache = Path(cache) if cache is not None else cache_dir()
        self.shape_snapshots = shape_snapshots
        """How many other machine shapes of a template keep a snapshot (0: none are
        saved; creates of those shapes then always boot cold)."""
        env_dirs = [d for d in os.environ.get("NOVASANDBOX_TEMPLATE_PATH", "").split(":") if d]
        self.template_dirs = [
            BUILTIN_DIR,
            self.definitions_dir,
            *map(Path, env_dirs),
            *map(Path, template_dirs),
        ]

    # --- definitions

    @property
    def definitions_dir(self) -> Path:
        """Where ``TemplateBuilder.build`` saves the definitions it makes (in the cache,
        so they move with it)."""
        return self.cache / "definitions"

    def _definitions(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for directory in self.template_dirs:
            if directory.is_dir():
                for path in sorted(directory.glob("*.toml")):
                    found[path.stem] = path
        return found

    def list(self) -> builtins.list[Template]:
        return [self.get(name) for name in sorted(self._definitions())]

    def get(self, name: str) -> Template:
        """The definition named ``name``, its parents (``from``) resolved."""
        return self._get(name, ())

    def _get(self, name: str, children: tuple[str, ...]) -> Template:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise TemplateNotFound(f"invalid template name {name!r}")
        path = self._definitions().get(name)
        if path is None:
            known = ", ".join(sorted(self._definitions())) or "none"
            raise TemplateNotFound(f"unknown template {name!r} (known: {known})")
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise TemplateError(f"cannot read template {path}: {exc}") from exc
        tpl = self._resolve(data, path, children)
        if tpl.name != name:
            raise TemplateError(f"{path} declares name {tpl.name!r}, expected {name!r}")
        return tpl

    def from_dict(self, data: dict[str, Any], source: Path) -> Template:
        """The template a TOML file's table describes (what ``TemplateBuilder`` makes),
        its ``from`` resolved among the templates defined here; relative paths in it are
        relative to ``source``'s folder."""
        return self._resolve(data, source, ())

    def _resolve(self, data: dict[str, Any], path: Path, children: tuple[str, ...]) -> Template:
        name = data.get("name")
        parent = None
        if "from" in data:
            parent_name = data["from"]
            if not isinstance(parent_name, str):
                raise TemplateError(f"invalid template {path}: from: must be a template name")
            if parent_name == name or parent_name in children:
                chain = " -> ".join((*children, str(name), parent_name))
                raise TemplateError(f"invalid template {path}: from: a loop ({chain})")
            if len(children) >= MAX_PARENTS:
                raise TemplateError(
                    f"invalid template {path}: from: more than {MAX_PARENTS} templates deep"
                )
            try:
                parent = self._get(parent_name, (*children, str(name)))
            except TemplateNotFound as exc:
                raise TemplateError(f"invalid template {path}: from: {exc.message}") from None
        return parse_definition(data, path, parent)

    def save_definition(self, tpl: Template) -> Path:
        """Write ``tpl``'s TOML into ``definitions_dir`` (atomically) and return its
        path; ``get`` then finds it by name."""
        self.definitions_dir.mkdir(parents=True, exist_ok=True)
        path = self.definitions_dir / f"{tpl.name}.toml"
        partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        partial.write_text(tpl.to_toml())
        partial.replace(path)
        return path

    # --- artifacts

    def kernel_path(self, tpl: Template) -> Path:
        return self.cache / "kernels" / tpl.kernel_digest / "vmlinux"

    def base_path(self, tpl: Template) -> Path:
        return self.cache / "bases" / f"{tpl.base_digest}.tar"

    def image_dir(self, tpl: Template) -> Path:
        return self.cache / "templates" / tpl.name / tpl.image_digest

    def layer_file(self, digest: str) -> Path:
        """A step's layer (``layers.py``): a qcow2 image over the layer before it."""
        return self.layers_dir / digest / LAYER_DISK

    def root_image(self, tpl: Template) -> Path:
        """The image a layered template's first step starts from: its parent's image,
        or its own root file system (a suite's or a container image's, with the agent)."""
        if tpl.parent is not None:
            return self.image_file(tpl.parent)
        if tpl.layered:
            return self.layers_dir / tpl.root_digest / "rootfs.ext4"
        return self.image_dir(tpl) / "rootfs.ext4"

    def image_file(self, tpl: Template) -> Path:
        """The image a sandbox of the template boots from (through an overlay)."""
        if tpl.layered:
            return self.layer_file(tpl.layer_digests[-1])
        return self.image_dir(tpl) / "rootfs.ext4"

    def disk_chain(self, tpl: Template) -> builtins.list[Path]:
        """Every image under a sandbox of the template, bottom first."""
        if not tpl.layered:
            return [self.image_file(tpl)]
        below = self.disk_chain(tpl.parent) if tpl.parent is not None else [self.root_image(tpl)]
        return below + [self.layer_file(d) for d in tpl.layer_digests]

    def built(self, name: str | Template) -> BuiltTemplate | None:
        """The built artifacts of the template as it is defined now, or None."""
        tpl = self.get(name) if isinstance(name, str) else name
        manifest_file = self.image_dir(tpl) / "manifest.json"
        kernel = self.kernel_path(tpl)
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, ValueError):
            return None
        if not (kernel.is_file() and all(p.is_file() for p in self.disk_chain(tpl))):
            return None
        return BuiltTemplate(tpl, kernel, self.image_file(tpl), manifest)

    # --- snapshots of other machine shapes

    def shapes_dir(self, tpl: Template) -> Path:
        return self.image_dir(tpl) / "shapes"

    def evict_shape_snapshots(self, tpl: Template, keep: Path | None = None) -> tuple[Path, ...]:
        """Remove the least recently used shape snapshots beyond ``shape_snapshots`` (never
        ``keep``), and half-written ones that a dead process left. Each goes away at once
        (renamed, then deleted), so a lookup never sees half of one. Returns the removed."""
        base = self.shapes_dir(tpl)
        try:
            entries = tuple(base.iterdir())
        except OSError:
            return ()
        now = time.time()
        ready: list[tuple[float, Path]] = []
        doomed: list[Path] = []
        for entry in entries:
            try:
                mtime = entry.stat().st_mtime
            except OSError:
                continue
            if entry.name.startswith("."):
                if now - mtime > STALE_PARTIAL_S:
                    doomed.append(entry)
            elif entry != keep:
                ready.append((mtime, entry))
        room = self.shape_snapshots - (1 if keep is not None else 0)
        ready.sort(reverse=True)
        doomed += [entry for _, entry in ready[max(room, 0) :]]
        removed: tuple[Path, ...] = ()
        for entry in doomed:
            trash = base / f".evicted-{secrets.token_hex(4)}"
            try:
                entry.rename(trash)
            except OSError:
                continue  # another process removed it first
            shutil.rmtree(trash, ignore_errors=True)
            removed += (entry,)
        return removed

    def remove_shape_snapshots(self, tpl: Template) -> None:
        """Remove every shape snapshot of the template's current image."""
        shutil.rmtree(self.shapes_dir(tpl), ignore_errors=True)

    def require_built(self, name: str | Template) -> BuiltTemplate:
        built = self.built(name)
        if built is None:
            name = name if isinstance(name, str) else name.name
            raise TemplateNotBuilt(
                f"template {name!r} is not built (or changed since it was); "
                f"run: novasandbox template build {name}"
            )
        return built

    def cache_entries(self) -> builtins.list[CacheEntry]:
        """Every kernel, base and image in the cache, with its disk usage. Names that
        are not artifacts (builds in progress, partial files, dot-names) are left out."""
        entries: builtins.list[CacheEntry] = []
        seen: set[tuple[int, int]] = set()
        kernels, bases, images, layers = (
            self.cache / d for d in ("kernels", "bases", "templates", "layers")
        )
        for path in sorted(kernels.iterdir()) if kernels.is_dir() else []:
            if _DIGEST.fullmatch(path.name) and path.is_dir():
                entries.append(CacheEntry("kernel", path, disk_usage(path, seen)))
        for path in sorted(bases.iterdir()) if bases.is_dir() else []:
            if _BASE.fullmatch(path.name) and path.is_file():
                entries.append(CacheEntry("base", path, disk_usage(path, seen)))
        for tdir in sorted(images.iterdir()) if images.is_dir() else []:
            if not (_NAME.fullmatch(tdir.name) and tdir.is_dir()):
                continue
            for path in sorted(tdir.iterdir()):
                if _DIGEST.fullmatch(path.name) and path.is_dir():
                    entries.append(
                        CacheEntry("image", path, disk_usage(path, seen), template=tdir.name)
                    )
        for path in sorted(layers.iterdir()) if layers.is_dir() else []:
            if _DIGEST.fullmatch(path.name) and path.is_dir():
                entries.append(CacheEntry("layer", path, disk_usage(path, seen)))
        return entries

    def cache_usage(self) -> dict[str, int]:
        """Bytes the cache uses on disk, in all and per kind: ``kernels``, ``bases``,
        ``templates`` (images), ``snapshots`` (the templates' snapshots, under their
        images) and ``other`` (builds in progress, partial files)."""
        seen: set[tuple[int, int]] = set()
        usage = {
            "kernels": 0,
            "bases": 0,
            "templates": 0,
            "layers": 0,
            "snapshots": 0,
            "other": 0,
        }
        images = self.cache / "templates"
        for snaps in sorted(images.glob("*/*/snapshots")):
            usage["snapshots"] += disk_usage(snaps, seen)
        for kind in ("kernels", "bases", "templates", "layers"):
            usage[kind] += disk_usage(self.cache / kind, seen)
        usage["other"] = disk_usage(self.cache, seen)
        usage["total"] = sum(usage.values())
        return usage

    def wanted(self, *, building: bool = False) -> set[Path]:
        """What the templates defined now keep: each one's current image, and while
        that image exists (or, with ``building``, while some build is running) the
        kernel and base it was made from. After ``template rm`` a template keeps
        nothing, so its base (and a kernel no other template has) can go. A definition
        that cannot be read raises ``TemplateError``: the cache's use is then unknown."""
        paths: set[Path] = set()
        for tpl in self.list():
            image = self.image_dir(tpl)
            paths.add(image)
            if building or image.is_dir():
                paths |= {self.kernel_path(tpl).parent, self.base_path(tpl)}
                paths |= {p.parent for p in self.disk_chain(tpl) if _within(p, self.layers_dir)}
                if tpl.parent is not None:  # the parent's image, which its chain starts on
                    paths.add(self.image_dir(tpl.parent))
        return {p.resolve() for p in paths}

    def prune_plan(self, in_use: Iterable[Path] = ()) -> PrunePlan:
        """The kernels, bases and images that no defined template keeps (``wanted``),
        split into those that can go and those ``in_use`` keeps: a path within an
        entry, or the entry itself (what live sandboxes and snapshots are layered on,
        files that processes hold). An ``in_use`` path in the cache but in no entry (a
        partial file, a build folder) means a build is running: then every defined
        template keeps its kernel and base."""
        entries = self.cache_entries()
        busy = [Path(os.path.realpath(p)) for p in in_use]
        cache = self.cache.resolve()
        reals = [e.path.resolve() for e in entries]
        building = any(_within(p, cache) and not any(_within(p, r) for r in reals) for p in busy)
        wanted = self.wanted(building=building)
        defined = set(self._definitions())
        remove: builtins.list[CacheEntry] = []
        keep: builtins.list[CacheEntry] = []
        for entry, real in zip(entries, reals, strict=True):
            if real in wanted:
                continue
            holders = sorted(p for p in busy if _within(p, real))
            if holders:
                keep.append(_with_reason(entry, f"in use: {holders[0]}"))
            elif entry.kind != "image":
                remove.append(_with_reason(entry, "no built template uses it"))
            elif entry.template in defined:
                remove.append(_with_reason(entry, f"superseded: {entry.template!r} has changed"))
            else:
                remove.append(_with_reason(entry, f"template {entry.template!r} is not defined"))
        return PrunePlan(tuple(remove), tuple(keep))

    def prune(self, plan: PrunePlan) -> int:
        """Remove what ``plan`` lists (then template folders left empty); returns the
        bytes freed. An entry that is gone already is skipped."""
        freed = 0
        for entry in plan.remove:
            if not _within(entry.path, self.cache) or entry.path == self.cache:
                raise TemplateError(f"{entry.path} is not in the cache {self.cache}")
            if not entry.path.exists():
                continue
            try:
                _remove_tree(entry.path)
            except OSError as exc:
                raise TemplateError(f"cannot remove {entry.path}: {exc}") from exc
            freed += entry.size_bytes
            parent = entry.path.parent
            if entry.kind == "image" and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
        return freed

    def dependents(self, name: str) -> builtins.list[str]:
        """The built templates whose image starts on ``name``'s (``from``, at any depth)."""
        tpl = self.get(name)
        mine = self.image_file(tpl)
        out = []
        for other in self.list():
            if other.name != name and mine in self.disk_chain(other) and self.built(other):
                out.append(other.name)
        return out

    def remove(self, name: str, *, force: bool = False, definition: bool = True) -> bool:
        """Remove every built image of a template, with its snapshots (those of other
        machine shapes included), the layers of its steps that no other built template
        uses, and its definition if ``TemplateBuilder`` saved it in the cache (a TOML
        file of the user's is theirs). Kernels and bases are shared and kept (``prune``
        removes those nothing uses). A template that built templates start from is kept
        (``TemplateError``) unless ``force``: theirs would be broken."""
        tpl = self.get(name)
        users = self.dependents(name)
        if users and not force:
            raise TemplateError(
                f"template {name!r} is the root of built templates ({', '.join(users)}): "
                "remove them first, or force it"
            )
        target = self.cache / "templates" / tpl.name
        kept: set[Path] = set()
        for other in self.list():
            if other.name != name and self.built(other) is not None:
                kept |= {p.parent for p in self.disk_chain(other)}
        removed = False
        for layer in self.disk_chain(tpl):
            folder = layer.parent
            if _within(folder, self.layers_dir) and folder not in kept and folder.exists():
                _remove_tree(folder)
                removed = True
        if target.exists():
            for image in target.glob("*/rootfs.ext4"):
                image.chmod(0o644)
            shutil.rmtree(target)
            removed = True
        saved = self.definitions_dir / f"{name}.toml"
        if definition and tpl.source == saved:
            saved.unlink(missing_ok=True)
            removed = True
        return removed

    @property
    def layers_dir(self) -> Path:
        return self.cache / "layers"


# --- the cache as a whole: what it holds, what is in use, what can go


CacheKind = Literal["kernel", "base", "image", "layer"]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One artifact of the cache: ``kernels/<digest>``, ``bases/<digest>.tar`` or
    ``templates/<name>/<image digest>`` (with the template snapshots under it)."""

    kind: CacheKind
    path: Path
    size_bytes: int
    """Its disk usage (``du``: allocated blocks, each hard-linked file once)."""
    template: str | None = None
    """For an image: the template directory it is in."""
    reason: str = ""
    """Why prune keeps it, or why it would go."""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "bytes": self.size_bytes,
            "template": self.template,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """What ``prune`` would remove and which unused entries it keeps (in use)."""

    remove: tuple[CacheEntry, ...]
    keep: tuple[CacheEntry, ...]

    @property
    def size_bytes(self) -> int:
        return sum(e.size_bytes for e in self.remove)

    def to_json(self) -> dict[str, Any]:
        return {
            "remove": [e.to_json() for e in self.remove],
            "keep": [e.to_json() for e in self.keep],
            "bytes": self.size_bytes,
        }


def disk_usage(path: Path, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes allocated to ``path`` and everything under it, like ``du -s``: symlinks are
    not followed and a file with several hard links counts once (per ``seen``)."""
    seen = set() if seen is None else seen
    total = 0
    stack = [path]
    while stack:
        here = stack.pop()
        try:
            st = here.lstat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
        if here.is_dir() and not here.is_symlink():
            try:
                stack.extend(here.iterdir())
            except OSError:
                pass
    return total


QCOW2_MAGIC = b"QFI\xfb"
MAX_CHAIN = 16


def qcow2_backing_name(path: Path) -> str | None:
    """The backing name a qcow2 image's header holds, as written; None: not qcow2, no
    backing file, unreadable; ``"\\0"`` for a name longer than qcow2's own limit (1 KiB),
    which is never read, whatever the file says."""
    try:
        with path.open("rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != QCOW2_MAGIC:
                return None
            offset = int.from_bytes(header[8:16], "big")
            size = int.from_bytes(header[16:20], "big")
            if offset == 0 or size == 0:
                return None
            if size > 1023:
                return "\0"  # not a name qcow2 writes
            f.seek(offset)
            return f.read(size).decode("utf-8", errors="replace")
    except OSError:
        return None


def qcow2_backing(path: Path) -> Path | None:
    """The backing file named in a qcow2 image's header (relative names are relative to
    the image's folder), or None: not qcow2, no backing file, unreadable, or a name that
    is not a file's (``json:``, a protocol, a NUL)."""
    name = qcow2_backing_name(path)
    if name is None or name.startswith(("json:", "nbd:", "http:", "https:")) or "\x00" in name:
        return None
    backing = Path(name)
    return backing if backing.is_absolute() else path.parent / backing


def image_format(path: Path) -> str:
    """``qcow2`` for a qcow2 image (by its magic), else ``raw``."""
    try:
        with path.open("rb") as f:
            return "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"
    except OSError:
        return "raw"


def backing_chain(path: Path) -> list[Path]:
    """``path`` and the images under it (each qcow2's backing file, in order), at most
    ``MAX_CHAIN`` deep; a loop ends the chain."""
    chain = [path]
    while len(chain) < MAX_CHAIN:
        nxt = qcow2_backing(chain[-1])
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    return chain


def name_backing_relative(
    image: Path, backing: Path, home: Path, qemu_img: str = "qemu-img"
) -> None:
    """Rewrite the qcow2 ``image``'s header to name ``backing`` relative to ``home``, the
    folder ``image`` will live in (it may still be elsewhere under a temporary name), so
    that a cache can be copied or moved: ``qemu-img rebase -u`` (the header only; the
    data is untouched). Its permissions are kept. ``TemplateError`` if qemu-img fails."""
    rel = os.path.relpath(backing, home)
    mode = image.stat().st_mode & 0o777
    image.chmod(mode | 0o200)
    try:
        argv = [qemu_img, "rebase", "-u", "-F", image_format(backing), "-b", rel, str(image)]
        done = subprocess.run(argv, capture_output=True, text=True)
    except OSError as exc:
        raise TemplateError(f"cannot run {qemu_img}: {exc}") from exc
    finally:
        image.chmod(mode)
    if done.returncode != 0:
        raise TemplateError(f"qemu-img rebase of {image} failed: {done.stderr.strip()}")


def paths_held_by_processes(under: Path, proc: Path = Path("/proc")) -> set[Path]:
    """Paths under ``under`` that some process holds: an open file, its working
    directory, or an argument of its command line (QEMU's ``-kernel``). Processes this
    user cannot inspect are not seen (as root: all of them)."""
    root = str(under.resolve())
    prefix = root.rstrip("/") + "/"
    found: set[Path] = set()

    def note(text: str) -> None:
        text = text.removesuffix(" (deleted)")
        if text == root or text.startswith(prefix):
            found.add(Path(text))

    try:
        pids = [p for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            note(os.readlink(pid / "cwd"))
        except OSError:
            pass
        try:
            for arg in (pid / "cmdline").read_bytes().split(b"\0"):
                for part in arg.decode(errors="replace").split(","):
                    note(part.partition("=")[2] if "=" in part else part)
        except OSError:
            pass
        try:
            fds = list((pid / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                note(os.readlink(fd))
            except OSError:
                pass
    return found


def _remove_tree(path: Path) -> None:
    def writable(func: Any, name: str, exc_info: Any) -> None:
        # a folder made read-only: make it writable (we own it) and try again once
        os.chmod(os.path.dirname(name) or ".", 0o755)
        func(name)

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, onerror=writable)
    else:
        path.unlink(missing_ok=True)


def _with_reason(entry: CacheEntry, reason: str) -> CacheEntry:
    return CacheEntry(entry.kind, entry.path, entry.size_bytes, entry.template, reason)


def _within(path: Path, entry: Path) -> bool:
    return path == entry or entry in path.parents


__all__ = [
    "BUILTIN_DIR",
    "GUEST_DIR",
    "GUEST_FILES",
    "IMAGE_RECIPE",
    "KERNEL_RECIPE",
    "LAYER_DISK",
    "TEMPLATE_DEFAULTS",
    "BuiltTemplate",
    "CacheEntry",
    "PrunePlan",
    "Step",
    "Template",
    "TemplateManager",
    "backing_chain",
    "disk_usage",
    "image_format",
    "name_backing_relative",
    "paths_held_by_processes",
    "qcow2_backing",
    "qcow2_backing_name",
]
