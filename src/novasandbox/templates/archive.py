"""A built template in one file: ``novasandbox template export NAME FILE`` and
``novasandbox template import FILE``.

The archive is a tar file (POSIX pax), compressed or not by its name: ``.tar.zst`` or
``.tzst`` with zstd (the ``zstd`` program; recommended: the root image is mostly zeros),
``.tar.gz`` or ``.tgz`` with gzip, anything else plain. Import tells them apart by their
first bytes. Its first entry is ``novasandbox-template.json``::

    {"format": "novasandbox-template", "version": 1, "template": NAME,
     "templates": [{"name", "digest", "image_digest", "kernel_digest"}, ...],  # NAME first,
                                                                              # then its parents
     "engines": [{"accel", "version"}],     # what its snapshots were made with
     "files": [{"path", "size", "sha256", "mode"}, ...]}

then every file it lists, in that order, each at its path in the template cache: the
definitions (``definitions/<name>.toml``, NAME's and its parents'), the kernel, the image
chain (the root image and every layer, a parent template's image and manifest included)
and NAME's template snapshots (those its definition restores; not the snapshots of other
machine shapes, which a host makes for itself). Every path in the cache is relative
(manifests, qcow2 backing names), so the files work wherever the cache is.

Import reads the whole archive into a hidden folder of the cache and checks everything
before anything is put in place: the format, every path (exactly the files that the
definitions it carries say a built template has: nothing absolute, no ``..``, no link,
no other kind of entry), sizes and counts (bounded), every file's sha256, every qcow2
image's backing file (relative, and one of the archive's files), that this host's
NovaSandbox computes the same digests from the definitions (the guest agent is part of
an image's digest: the same version on both hosts), and that this host runs the same
QEMU version and accelerator as the snapshots were made with. Then each folder is
renamed into place (a template's manifest last: it is what marks it built) and the
definitions that this host does not have are written to the cache's ``definitions/``.
On any failure nothing is left behind.

What this host already has is kept when it is the same (bytes and definition). A
definition of the same name that differs, or a built file with other bytes (two builds
of an image are never byte-identical, and a layer is a diff of the exact image below
it), is a ``TemplateArchiveConflict`` unless ``force``: then the archive's replace them,
and every snapshot and layer of this cache made over a replaced file goes with it (their
templates are then not built here until ``template build``). Other QEMU or accelerator:
``TemplateArchiveIncompatible`` unless ``snapshots=False`` (the image is imported without
its snapshots; ``template build NAME`` then makes them here, without rebuilding it).

An archive is trusted like an image: its digests catch damage, not a forger, and QEMU
loads its snapshots' memory images as they are (under its confinement). Import only
archives you trust. A definition in an archive is pinned (``Template.to_toml(pinned=
True)``): it carries the digest of what each ``copy`` step copies and of its container
image (``digest``, ``oci_digest``), so it reads as the same template on a host that has
the layers but not those files (building its steps again there needs them).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..errors import (
    HostToolMissing,
    TemplateArchiveConflict,
    TemplateArchiveError,
    TemplateArchiveIncompatible,
    TemplateError,
    TemplateNotFound,
)
from ..snapshots import DISK, MANIFEST, MEMORY, Engine, Snapshot, current_template_snapshot
from . import (
    LAYER_DISK,
    QCOW2_MAGIC,
    Template,
    TemplateManager,
    backing_chain,
    qcow2_backing,
    qcow2_backing_name,
)

ARCHIVE_MANIFEST = "novasandbox-template.json"
FORMAT = "novasandbox-template"
VERSION = 1
MAX_FILES = 4096
"""Files one archive may hold."""
MAX_FILE_BYTES = 256 << 30
"""The largest file (a root image is its disk size, sparse on disk, whole in the tar)."""
MAX_TOTAL_BYTES = 1 << 40
MAX_MANIFEST_BYTES = 4 << 20
_CHUNK = 1 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"
_FILE_NAMES = frozenset({MANIFEST, MEMORY, DISK, LAYER_DISK, "rootfs.ext4", "layer.json"})


@dataclass(frozen=True, slots=True)
class ArchiveFile:
    path: str
    """Where it goes, relative to the cache (POSIX)."""
    size: int
    sha256: str
    mode: int


@dataclass(frozen=True, slots=True)
class ExportResult:
    template: str
    path: Path
    files: int
    bytes_in: int
    """The files' sizes, all together."""
    size_bytes: int
    """The archive's size."""
    snapshots: int


@dataclass(frozen=True, slots=True)
class ImportResult:
    template: str
    templates: tuple[str, ...]
    """The template and its parents, each now usable here."""
    written: tuple[str, ...]
    """The files written (paths in the cache); the others were here already."""
    definitions: tuple[str, ...]
    """The definitions written to the cache's ``definitions/``."""
    snapshots: int
    """The template snapshots imported (0 with ``snapshots=False``)."""
    removed: tuple[str, ...] = field(default=())
    """What ``force`` removed: this cache's snapshots and layers made over a replaced
    file."""


# --------------------------------------------------------------------------- export


def _chain(manager: TemplateManager, tpl: Template) -> list[Template]:
    """``tpl`` and its parents, ``tpl`` first."""
    out = [tpl]
    while out[-1].parent is not None:
        parent = out[-1].parent
        assert parent is not None
        out.append(parent)
    return out


def _unit_files(folder: Path) -> list[Path]:
    """The files of an artifact's folder that travel: its plain files, not dot-names
    (an overlay seed, a partial write)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise TemplateError(f"cannot read {folder}: {exc}") from exc
    return [p for p in entries if not p.name.startswith(".") and p.is_file() and not p.is_symlink()]


def export_files(manager: TemplateManager, name: str) -> tuple[list[Template], list[Path]]:
    """What ``export_archive`` puts in an archive of the built template ``name``: the
    template and its parents, and the cache's files (the definitions excepted)."""
    tpl = manager.get(name)
    chain = _chain(manager, tpl)
    built = manager.require_built(tpl)
    files: list[Path] = _unit_files(built.kernel.parent)
    units: list[Path] = []
    for t in reversed(chain):  # bottom first
        if t.layered:
            if t.parent is None:
                units.append(manager.root_image(t).parent)
            units += [manager.layer_file(d).parent for d in t.layer_digests]
        units.append(manager.image_dir(t))
    for unit in units:
        files += _unit_files(unit)
    snaps = manager.image_dir(tpl) / "snapshots"
    for folder in sorted(snaps.iterdir()) if snaps.is_dir() else []:
        if not folder.name.startswith(".") and current_template_snapshot(tpl, folder):
            files += _unit_files(folder)
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    for f in unique:
        backing = qcow2_backing_name(f)
        if backing is not None and Path(backing).is_absolute():
            raise TemplateArchiveError(
                f"{f} names its backing file by an absolute path (made before the cache "
                f"could move): run `novasandbox template build --force {name}` first"
            )
    return chain, unique


def export_archive(
    manager: TemplateManager, name: str, dest: str | os.PathLike[str]
) -> ExportResult:
    """Write the built template ``name`` (with its parents' images, its kernel and its
    snapshots) into the archive ``dest`` (compressed by its name: see the module),
    written under a temporary name and renamed into place."""
    dest = Path(dest)
    chain, files = export_files(manager, name)
    tpl = chain[0]
    cache = manager.cache
    listed: list[ArchiveFile] = []
    data: list[tuple[ArchiveFile, bytes | Path]] = []
    for t in chain:
        text = t.to_toml(pinned=True).encode()  # copies' and images' digests in it
        entry = ArchiveFile(
            f"definitions/{t.name}.toml", len(text), hashlib.sha256(text).hexdigest(), 0o644
        )
        listed.append(entry)
        data.append((entry, text))
    engines: list[dict[str, str]] = []
    snapshots = 0
    for path in files:
        rel = path.relative_to(cache).as_posix()
        st = path.stat()
        entry = ArchiveFile(rel, st.st_size, _sha256_file(path), st.st_mode & 0o777)
        listed.append(entry)
        data.append((entry, path))
        if path.name == MANIFEST and path.parent.parent.name == "snapshots":
            snap = Snapshot.load(path.parent)
            snapshots += 1
            engine = {"accel": snap.accel, "version": snap.qemu_version}
            if engine not in engines:
                engines.append(engine)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "template": tpl.name,
        "created_at": time.time(),
        "templates": [
            {
                "name": t.name,
                "digest": t.digest,
                "image_digest": t.image_digest,
                "kernel_digest": t.kernel_digest,
            }
            for t in chain
        ],
        "engines": engines,
        "files": [
            {"path": f.path, "size": f.size, "sha256": f.sha256, "mode": f.mode} for f in listed
        ],
    }
    head = json.dumps(manifest, indent=2).encode()
    partial = dest.with_name(f".{dest.name}.partial-{secrets.token_hex(4)}")
    try:
        with (
            _compressed_writer(partial, _compression(dest)) as out,
            tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar,
        ):
            _add(tar, ARCHIVE_MANIFEST, len(head), 0o644, _bytes_reader(head))
            for entry, source in data:
                if isinstance(source, bytes):
                    _add(tar, entry.path, entry.size, entry.mode, _bytes_reader(source))
                else:
                    with source.open("rb") as f:
                        _add(tar, entry.path, entry.size, entry.mode, f)
        partial.replace(dest)
    except OSError as exc:
        raise TemplateArchiveError(f"cannot write {dest}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return ExportResult(
        tpl.name,
        dest,
        len(listed),
        sum(f.size for f in listed),
        dest.stat().st_size,
        snapshots,
    )


def _add(tar: tarfile.TarFile, name: str, size: int, mode: int, f: IO[bytes]) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = mode
    info.mtime = int(time.time())
    info.uname = info.gname = ""
    tar.addfile(info, f)


def _bytes_reader(data: bytes) -> IO[bytes]:
    return io.BytesIO(data)


def _compression(dest: Path) -> str:
    name = dest.name
    if name.endswith((".tar.zst", ".tzst", ".zst")):
        return "zstd"
    if name.endswith((".tar.gz", ".tgz", ".gz")):
        return "gzip"
    return "none"


@contextlib.contextmanager
def _compressed_writer(path: Path, how: str) -> Iterator[IO[bytes]]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as raw:
        if how == "none":
            yield raw
        elif how == "gzip":
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3) as gz:
                yield gz  # type: ignore[misc]
        else:
            if shutil.which("zstd") is None:
                raise HostToolMissing("zstd", "zstd")
            proc = subprocess.Popen(
                ["zstd", "-q", "-3", "-T0", "-c"],
                stdin=subprocess.PIPE,
                stdout=raw,
                stderr=subprocess.PIPE,
            )
            assert proc.stdin is not None and proc.stderr is not None
            try:
                yield proc.stdin
                proc.stdin.close()
                err = proc.stderr.read().decode(errors="replace")
                if proc.wait() != 0:
                    raise TemplateArchiveError(f"zstd failed: {err.strip()[-500:]}")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stderr.close()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- import

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_ZEROS = bytes(_CHUNK)
_ORDER = ("kernels", "layers", "templates", "definitions")
"""The order things are put in place: what a template needs before what marks it built
(its manifest, in ``templates/``), and its definition last."""


def _bad(message: str) -> TemplateArchiveError:
    return TemplateArchiveError(f"invalid template archive: {message}")


@dataclass(frozen=True, slots=True)
class _Head:
    template: str
    templates: list[dict[str, str]]
    engines: list[Engine]
    files: list[ArchiveFile]


def _parse_head(raw: bytes) -> _Head:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise _bad(f"{ARCHIVE_MANIFEST} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _bad(f"{ARCHIVE_MANIFEST} is not a {FORMAT} manifest")
    if data.get("version") != VERSION:
        raise _bad(f"version {data.get('version')!r} (this NovaSandbox reads {VERSION})")
    templates = data.get("templates")
    if not isinstance(templates, list) or not 1 <= len(templates) <= 16:
        raise _bad("templates: must be a list of 1 to 16")
    for t in templates:
        if not (
            isinstance(t, dict)
            and isinstance(t.get("name"), str)
            and _PART.fullmatch(t["name"])
            and all(isinstance(t.get(k), str) for k in ("digest", "image_digest", "kernel_digest"))
        ):
            raise _bad(f"templates: invalid entry {str(t)[:200]!r}")
    if data.get("template") != templates[0]["name"]:
        raise _bad("template: must be the first of templates")
    engines = data.get("engines")
    if not isinstance(engines, list) or len(engines) > 16:
        raise _bad("engines: must be a list")
    parsed_engines = []
    for e in engines:
        if not (isinstance(e, dict) and isinstance(e.get("accel"), str)):
            raise _bad(f"engines: invalid entry {str(e)[:200]!r}")
        if not isinstance(e.get("version"), str):
            raise _bad(f"engines: invalid entry {str(e)[:200]!r}")
        parsed_engines.append(Engine(e["accel"], e["version"]))
    files = data.get("files")
    if not isinstance(files, list) or not 1 <= len(files) <= MAX_FILES:
        raise _bad(f"files: must be a list of 1 to {MAX_FILES}")
    out: list[ArchiveFile] = []
    seen: set[str] = set()
    total = 0
    for f in files:
        if not isinstance(f, dict):
            raise _bad("files: each must be an object")
        path, size, digest, mode = f.get("path"), f.get("size"), f.get("sha256"), f.get("mode")
        if not isinstance(path, str) or not _safe_path(path):
            raise _bad(f"refusing the path {str(path)[:200]!r}")
        if path in seen:
            raise _bad(f"{path} is listed twice")
        seen.add(path)
        if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
            raise _bad(f"{path}: invalid size {size!r}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise _bad(f"{path}: invalid sha256 {digest!r}")
        if type(mode) is not int or not 0 <= mode <= 0o777:
            raise _bad(f"{path}: invalid mode {mode!r}")
        total += size
        out.append(ArchiveFile(path, size, digest, mode))
    if total > MAX_TOTAL_BYTES:
        raise _bad(f"{total} bytes in all (at most {MAX_TOTAL_BYTES})")
    return _Head(str(data["template"]), templates, parsed_engines, out)


def _safe_path(path: str) -> bool:
    """A relative POSIX path of plain names: no ``/`` first, no ``.``/``..``, no empty
    part, no dot-name, nothing but letters, digits and ``._-``."""
    parts = path.split("/")
    return 2 <= len(parts) <= 6 and all(_PART.fullmatch(p) for p in parts)


def _expected(manager: TemplateManager, chain: list[Template]) -> tuple[set[str], str]:
    """The folders (relative to the cache) whose files an archive of ``chain[0]`` may
    hold, and the folder its snapshots are in."""
    cache = manager.cache
    tpl = chain[0]
    folders = {manager.kernel_path(tpl).parent}
    for t in chain:
        folders.add(manager.image_dir(t))
        if t.layered:
            if t.parent is None:
                folders.add(manager.root_image(t).parent)
            folders |= {manager.layer_file(d).parent for d in t.layer_digests}
    rel = {f.relative_to(cache).as_posix() for f in folders}
    return rel, (manager.image_dir(tpl) / "snapshots").relative_to(cache).as_posix()


def import_archive(
    manager: TemplateManager,
    source: str | os.PathLike[str],
    *,
    engine: Engine,
    force: bool = False,
    snapshots: bool = True,
) -> ImportResult:
    """Put the template in the archive ``source`` (``export_archive``'s) into
    ``manager``'s cache, checked first (see the module): ``engine`` is this host's (its
    snapshots must have been made by it, unless ``snapshots`` is False: then they are
    left out). ``TemplateArchiveError`` (or its ``Conflict``/``Incompatible``) when
    it cannot be imported; then nothing changed."""
    source = Path(source)
    cache = manager.cache
    try:
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(os.path.realpath(cache / f".import-{secrets.token_hex(6)}"))
        staging.mkdir()
    except OSError as exc:
        raise TemplateArchiveError(f"cannot write into the cache {cache}: {exc}") from exc
    try:
        return _import(manager, source, staging, engine, force, snapshots)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _import(
    manager: TemplateManager,
    source: Path,
    staging: Path,
    engine: Engine,
    force: bool,
    want_snapshots: bool,
) -> ImportResult:
    cache = manager.cache
    with _archive_reader(source) as stream:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115 (closed with the stream)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _bad(f"{source} is not a tar archive: {exc}") from None
        members = _members(tar, source)
        head_member, head_file = next(members, (None, None))
        if head_member is None or head_member.name != ARCHIVE_MANIFEST or head_file is None:
            raise _bad(f"{source} does not begin with {ARCHIVE_MANIFEST}")
        if head_member.size > MAX_MANIFEST_BYTES:
            raise _bad(f"{ARCHIVE_MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
        head = _parse_head(_read_all(head_file, head_member.size))
        if want_snapshots:
            for e in head.engines:
                if e != engine:
                    raise TemplateArchiveIncompatible(
                        f"the snapshots of {head.template!r} in {source} were made under "
                        f"{e.accel} by {e.version!r}; this host has {engine.accel} and "
                        f"{engine.version!r}. Import it without them (--no-snapshots, then "
                        f"`novasandbox template build {head.template}` makes them here)"
                    )
        names = [t["name"] for t in head.templates]
        definitions = [f"definitions/{n}.toml" for n in names]
        listed = [f.path for f in head.files]
        if listed[: len(names)] != definitions:
            raise _bad(f"its files must begin with the definitions {definitions}")
        # the definitions first: what they say decides which paths may follow
        for f in head.files[: len(names)]:
            _receive(members, f, staging, keep=True, source=source)
        chain = _resolve(manager, staging, head)
        folders, snap_folder = _expected(manager, chain)
        for f in head.files[len(names) :]:
            parent = f.path.rsplit("/", 1)[0]
            name = f.path.rsplit("/", 1)[1]
            in_snapshot = parent.rsplit("/", 1)[0] == snap_folder and bool(
                _HEX16.fullmatch(parent.rsplit("/", 1)[1])
            )
            if not (parent in folders or in_snapshot) or (
                name not in _FILE_NAMES and name not in ("vmlinux", "config")
            ):
                raise _bad(f"{f.path} is not a file of a built {head.template!r}")
        for f in head.files[len(names) :]:
            in_snapshot = f.path.startswith(snap_folder + "/")
            _receive(members, f, staging, keep=want_snapshots or not in_snapshot, source=source)
        if next(members, None) is not None:
            raise _bad(f"{source} holds more than its manifest lists")
    tpl = chain[0]
    _check_staged(manager, staging, chain, head, engine if want_snapshots else None)
    # what this host has already: the same is kept, another is a conflict
    conflicts: list[str] = []
    replaced: list[Path] = []
    new_defs: list[str] = []
    for t in chain:
        verdict = _definition_verdict(manager, t)
        rel = f"definitions/{t.name}.toml"
        if verdict == "same":
            (staging / rel).unlink()
        elif verdict == "new":
            new_defs.append(t.name)
        else:
            conflicts.append(f"{rel} ({verdict})")
            new_defs.append(t.name)
    for f in head.files[len(names) :]:
        staged = staging / f.path
        if not staged.exists():
            continue  # a snapshot left out
        here = cache / f.path
        if not os.path.lexists(here):
            continue
        if here.is_file() and not here.is_symlink() and _same_file(here, f):
            staged.unlink()
            continue
        conflicts.append(f"{f.path} (this cache has other bytes)")
        replaced.append(here)
    if conflicts and not force:
        raise TemplateArchiveConflict(
            f"importing {tpl.name!r} would replace what this host has: "
            + "; ".join(conflicts[:8])
            + (f" (and {len(conflicts) - 8} more)" if len(conflicts) > 8 else "")
            + ". --force replaces them (and removes what this cache made over them)"
        )
    dependents = _made_over(manager, replaced) if replaced else []
    written = _place(cache, staging)
    removed = []
    for folder in dependents:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.relative_to(cache).as_posix())
    snaps = sum(
        1 for f in head.files if f.path.startswith(snap_folder + "/") and f.path.endswith(MEMORY)
    )
    return ImportResult(
        tpl.name,
        tuple(names),
        tuple(w for w in written if not w.startswith("definitions/")),
        tuple(new_defs),
        snaps if want_snapshots else 0,
        tuple(removed),
    )


def _members(tar: tarfile.TarFile, source: Path) -> Iterator[tuple[tarfile.TarInfo, IO[bytes]]]:
    """The archive's entries, each a plain file (anything else is refused)."""
    count = 0
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            raise _bad(f"{source} is damaged or truncated: {exc}") from None
        if member is None:
            return
        count += 1
        if count > MAX_FILES + 1:
            raise _bad(f"more than {MAX_FILES} entries")
        if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.sparse is not None:
            raise _bad(f"{member.name!r} is not a plain file (links and others are refused)")
        f = tar.extractfile(member)
        if f is None:
            raise _bad(f"{member.name!r} cannot be read")
        yield member, f


def _read_all(f: IO[bytes], size: int) -> bytes:
    try:
        data = f.read(size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _bad(f"damaged or truncated: {exc}") from None
    if len(data) != size:
        raise _bad("truncated")
    return data


def _receive(
    members: Iterator[tuple[tarfile.TarInfo, IO[bytes]]],
    entry: ArchiveFile,
    staging: Path,
    *,
    keep: bool,
    source: Path,
) -> None:
    """The next entry, which must be ``entry``: written under ``staging`` (sparse: zero
    blocks are skipped), its size and sha256 checked; with ``keep`` False only checked."""
    item = next(members, None)
    if item is None:
        raise _bad(f"{source} ends before {entry.path}")
    member, f = item
    if member.name != entry.path:
        raise _bad(f"found {member.name!r} where {entry.path!r} should be")
    if member.size != entry.size:
        raise _bad(f"{entry.path} is {member.size} bytes, the manifest says {entry.size}")
    dest = staging / entry.path
    h = hashlib.sha256()
    fd = -1
    try:
        if keep:
            dest.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(dest, flags, 0o600)
        left = entry.size
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise _bad(f"{entry.path} is truncated")
            left -= len(chunk)
            h.update(chunk)
            if fd < 0:
                continue
            if chunk == _ZEROS[: len(chunk)]:
                os.lseek(fd, len(chunk), os.SEEK_CUR)
            else:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        if fd >= 0:
            os.ftruncate(fd, entry.size)
            os.fchmod(fd, entry.mode)
    except (tarfile.TarError, EOFError) as exc:
        raise _bad(f"{source} is damaged or truncated in {entry.path}: {exc}") from None
    except OSError as exc:
        raise TemplateArchiveError(f"cannot write {entry.path} into the cache: {exc}") from exc
    finally:
        if fd >= 0:
            os.close(fd)
    if h.hexdigest() != entry.sha256:
        raise _bad(f"{entry.path} does not match its sha256 (damaged or altered)")


def _resolve(manager: TemplateManager, staging: Path, head: _Head) -> list[Template]:
    """The archive's templates as this host reads their definitions; their digests
    must be the archive's."""
    reader = TemplateManager(manager.cache, template_dirs=[staging / "definitions"])
    chain: list[Template] = []
    for entry in head.templates:
        name = entry["name"]
        path = staging / "definitions" / f"{name}.toml"
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise _bad(f"definitions/{name}.toml: {exc}") from None
        if not isinstance(data, dict) or data.get("name") != name:
            raise _bad(f"definitions/{name}.toml does not define {name!r}")
        try:
            tpl = reader.get(name)
        except TemplateError as exc:
            raise _bad(f"definitions/{name}.toml: {exc.message}") from None
        expected_parent = chain[-1].parent if chain else None
        if expected_parent is not None and expected_parent.name != name:
            raise _bad("templates: must be the template, then each parent in turn")
        for key in ("digest", "image_digest", "kernel_digest"):
            if getattr(tpl, key) != entry[key]:
                raise TemplateArchiveIncompatible(
                    f"this host's NovaSandbox computes another {key} for {name!r} than the "
                    f"one that built it ({getattr(tpl, key)}, not {entry[key]}): another "
                    "version of NovaSandbox (its guest agent is part of an image)"
                )
        chain.append(tpl)
    if chain[-1].parent is not None:
        raise _bad(f"templates: {chain[-1].name!r}'s parent is missing")
    return chain


def _check_staged(
    manager: TemplateManager,
    staging: Path,
    chain: list[Template],
    head: _Head,
    engine: Engine | None,
) -> None:
    """What was received makes a built template: its kernel and image chain, every
    qcow2 image naming the image under it (relatively, within the archive), and its
    snapshots current for it (made by ``engine``; None: they were left out)."""
    cache = manager.cache
    tpl = chain[0]

    def staged(path: Path) -> Path:
        return staging / path.relative_to(cache)

    required = [manager.kernel_path(tpl), *manager.disk_chain(tpl)]
    required += [manager.image_dir(t) / "manifest.json" for t in chain]
    for path in required:
        if not staged(path).is_file():
            raise _bad(f"{path.relative_to(cache)} is missing")
    for t in chain:
        try:
            manifest = json.loads(staged(manager.image_dir(t) / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise _bad(f"the manifest of {t.name!r}: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("image_digest") != t.image_digest:
            raise _bad(f"the manifest of {t.name!r} is not its image's")
    chain_files = [staged(p) for p in manager.disk_chain(tpl)]
    for below, image in itertools.pairwise(chain_files):
        _check_qcow2(image, below, staging)
    if chain_files and qcow2_backing_name(chain_files[0]) is not None:
        raise _bad(f"{chain_files[0].relative_to(staging)} must be a root image")
    folder = staged(manager.image_dir(tpl) / "snapshots")
    for snap_dir in sorted(folder.iterdir()) if folder.is_dir() else []:
        names = sorted(p.name for p in snap_dir.iterdir())
        if engine is None:
            continue
        rel = snap_dir.relative_to(staging)
        if names != sorted([DISK, MANIFEST, MEMORY]):
            raise _bad(f"{rel} must hold {DISK}, {MANIFEST} and {MEMORY}")
        snap = current_template_snapshot(tpl, snap_dir, engine)
        if snap is None or snap.kind != "template" or snap.template != tpl.name:
            raise _bad(f"{rel} is not a snapshot of {tpl.name!r} made by this host's engine")
        if snap.kernel.resolve() != staged(manager.kernel_path(tpl)).resolve():
            raise _bad(f"{rel}: its kernel is not the template's")
        if snap.backing is None or Path(snap.backing).resolve() != chain_files[-1].resolve():
            raise _bad(f"{rel}: its disk is not layered on the template's image")
        _check_qcow2(snap_dir / DISK, chain_files[-1], staging)


def _check_qcow2(image: Path, below: Path, staging: Path) -> None:
    """``image`` is a qcow2 image whose header names ``below`` by a relative name, and
    asks QEMU to open no other file (no external data file)."""
    rel = image.relative_to(staging)
    try:
        with image.open("rb") as f:
            header = f.read(104)
    except OSError as exc:
        raise _bad(f"{rel}: {exc}") from None
    if len(header) < 72 or header[:4] != QCOW2_MAGIC:
        raise _bad(f"{rel} is not a qcow2 image")
    version = int.from_bytes(header[4:8], "big")
    if version >= 3 and len(header) >= 80:
        incompatible = int.from_bytes(header[72:80], "big")
        if incompatible & 0b100:
            raise _bad(f"{rel} has an external data file")
    name = qcow2_backing_name(image)
    if name is None or name.startswith("/") or "\0" in name or ":" in name:
        raise _bad(f"{rel} must name the image under it relatively (it names {name!r})")
    target = Path(os.path.normpath(image.parent / name))
    if target != below or qcow2_backing(image) is None:
        raise _bad(f"{rel} is not layered on {below.relative_to(staging)}")


def _definition_verdict(manager: TemplateManager, tpl: Template) -> str:
    """ "same": this host defines it so; "new": it does not define it; else what differs
    (and whether the cache's ``definitions/`` can take it: a definition found in a
    folder searched after it wins)."""
    found = manager._definitions().get(tpl.name)
    if found is None:
        return "new"
    try:
        local = manager.get(tpl.name)
        same = local.to_dict() == tpl.to_dict() and local.digest == tpl.digest
    except TemplateNotFound:
        return "new"
    except TemplateError:  # this host's definition cannot be read: it differs
        same = False
    if same:
        return "same"
    dirs = manager.template_dirs
    where = dirs.index(found.parent) if found.parent in dirs else len(dirs)
    if where > dirs.index(manager.definitions_dir):
        raise TemplateArchiveConflict(
            f"template {tpl.name!r} is defined differently in {found}, which takes "
            f"precedence over the cache's definitions: rename or remove it to import"
        )
    return f"defined differently in {found}"


def _same_file(path: Path, entry: ArchiveFile) -> bool:
    try:
        return path.stat().st_size == entry.size and _sha256_file(path) == entry.sha256
    except OSError:
        return False


def _made_over(manager: TemplateManager, replaced: list[Path]) -> list[Path]:
    """This cache's layers and snapshots (template and shape) that were made over one
    of ``replaced`` (in their disk chain, or their kernel): they go with it."""
    gone = {Path(os.path.realpath(p)) for p in replaced}
    cache = manager.cache
    found: list[Path] = []
    disks = list(cache.glob(f"layers/*/{LAYER_DISK}"))
    disks += list(cache.glob(f"templates/*/*/snapshots/*/{DISK}"))
    disks += list(cache.glob(f"templates/*/*/shapes/*/{DISK}"))
    for disk in disks:
        chain = {Path(os.path.realpath(p)) for p in backing_chain(disk)[1:]}
        kernel_gone = False
        if disk.parent.parent.name in ("snapshots", "shapes"):
            with contextlib.suppress(Exception):
                snap = Snapshot.load(disk.parent)
                kernel_gone = Path(os.path.realpath(snap.kernel)) in gone
        if chain & gone or kernel_gone:
            found.append(disk.parent)
    return found


def _place(cache: Path, staging: Path) -> list[str]:
    """Move what is under ``staging`` into the cache: a folder the cache lacks at once
    (renamed), else file by file, a ``manifest.json`` after the rest of its folder. On
    a failure everything moved is moved back (or removed) and the replaced restored."""
    backup = staging / ".replaced"
    done: list[tuple[Path, Path | None]] = []
    written: list[str] = []

    def put(src: Path, dst: Path) -> None:
        old = None
        if os.path.lexists(dst):
            old = backup / secrets.token_hex(8)
            backup.mkdir(exist_ok=True)
            dst.rename(old)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            src.rename(dst)
        except BaseException:
            if old is not None:
                old.rename(dst)
            raise
        done.append((dst, old))

    def walk(src: Path, dst: Path) -> None:
        if not any(p.is_file() for p in src.rglob("*")):
            return
        if not dst.exists() and not dst.is_symlink():
            written.extend(
                p.relative_to(staging).as_posix() for p in sorted(src.rglob("*")) if p.is_file()
            )
            put(src, dst)
            return
        children = sorted(src.iterdir(), key=lambda p: (p.name == "manifest.json", p.name))
        for child in children:
            if child.is_dir():
                walk(child, dst / child.name)
            else:
                written.append(child.relative_to(staging).as_posix())
                put(child, dst / child.name)

    try:
        for top in _ORDER:
            if (staging / top).is_dir():
                walk(staging / top, cache / top)
    except BaseException:
        for dst, old in reversed(done):
            with contextlib.suppress(OSError):
                if dst.is_dir() and not dst.is_symlink():
                    shutil.rmtree(dst)
                else:
                    dst.unlink()
                if old is not None:
                    old.rename(dst)
        raise
    return written


@contextlib.contextmanager
def _archive_reader(source: Path) -> Iterator[IO[bytes]]:
    """The archive's tar stream, decompressed by what its first bytes say."""
    try:
        raw = source.open("rb")
    except OSError as exc:
        raise TemplateArchiveError(f"cannot read {source}: {exc}") from exc
    with raw:
        try:
            magic = os.pread(raw.fileno(), 4, 0)  # the file's offset stays (zstd reads it)
        except OSError as exc:
            raise TemplateArchiveError(f"cannot read {source}: {exc}") from exc
        if magic.startswith(_GZIP_MAGIC):
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz  # type: ignore[misc]
        elif magic == _ZSTD_MAGIC:
            if shutil.which("zstd") is None:
                raise HostToolMissing("zstd", "zstd")
            proc = subprocess.Popen(
                ["zstd", "-d", "-c", "-q"],
                stdin=raw,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert proc.stdout is not None
            try:
                yield proc.stdout
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                proc.stdout.close()
        else:
            yield raw


__all__ = [
    "ARCHIVE_MANIFEST",
    "ArchiveFile",
    "ExportResult",
    "ImportResult",
    "export_archive",
    "export_files",
    "import_archive",
]
