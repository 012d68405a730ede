"""Container images as template roots: read an image archive, unpack its layers.

``load_image`` reads one image out of

* a ``docker save`` archive (``manifest.json`` naming each image's ``Config`` and
  ``Layers``; the legacy ``<id>/layer.tar`` layout and Docker 25's ``blobs/sha256/``
  layout alike), as a tar (plain or compressed) or unpacked into a directory, or
* an OCI image layout (``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``), as a tar
  or a directory. A nested index (a multi-platform image) is followed.

When the archive holds several images, ``tag`` picks one (docker save's ``RepoTags``, an
OCI descriptor's ``org.opencontainers.image.ref.name`` or ``io.containerd.image.name``
annotation); otherwise the one for linux/amd64 is taken, or the only one.

``unpack`` applies the layers in order into an empty directory, the way a container
runtime's tar applier does (OCI image spec, "Applying changesets"):

* gzip, zstd (the ``zstandard`` module, else the ``zstd`` program) and plain tar layers,
  recognised by their first bytes;
* whiteouts: ``.wh.NAME`` removes NAME from the lower layers, ``.wh..wh..opq`` empties its
  directory of everything the lower layers put there (what this layer adds stays); the
  other ``.wh..wh.*`` names (aufs bookkeeping) are ignored;
* regular files, directories, symlinks (any target text), hard links (to a file already
  in the tree), FIFOs; device nodes are never made (they would be device files on the
  host, readable by whoever reaches the tree; the guest's ``/dev`` is a devtmpfs) and are
  counted as skipped, as are entry types tar does not know; sparse files are refused;
* modes (setuid/setgid/sticky included), modification times, and the numeric owner and
  group when running as root (``UnpackStats.ownership``; otherwise everything belongs to
  the caller). Extended attributes are not applied. Directories keep ``rwx`` for their
  owner while the layers are applied, and get their own mode and time at the end.

The layers are hostile. An entry's name must be relative and free of ``..``; the
directories on the way to an entry are resolved inside ``dest`` the way a ``chroot``
would resolve them (a symlink ``etc -> /`` then ``etc/passwd`` writes
``dest/etc/passwd``; ``..`` stops at ``dest``), every step opened without following a
symlink, so nothing outside ``dest`` is ever written; the entry's own last component is
never followed (an entry replaces what is there, a symlink included). A hard link's
target is resolved the same way and must be a file inside ``dest``. Sizes are bounded:
the file bytes written (``max_bytes``), the entries (``max_entries``), each JSON document
(``MAX_JSON_BYTES``), each tar header extension (``MAX_TAR_HEADER``). Each blob is
checked against its digest as it streams (the blob's own digest where the archive names
it, and the uncompressed layer against the config's ``rootfs.diff_ids``). Anything wrong
raises ``TemplateBuildError`` naming the archive and what is wrong, and ``unpack`` leaves
``dest`` empty again.

Unpack into a directory other users cannot reach (``dest`` inside a ``mkdtemp()``
directory): the tree holds the image's setuid files and, as root, its owners.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from ..errors import HostToolMissing, TemplateBuildError

MAX_JSON_BYTES = 4 * 1024 * 1024
"""The largest manifest, index or config document read."""
MAX_TAR_HEADER = 1024 * 1024
"""The largest pax header or GNU long name in a tar (the archive's or a layer's)."""
MAX_ARCHIVE_MEMBERS = 100_000
"""The most members an image archive (not a layer) may have."""
MAX_LAYERS = 1000
MAX_INDEX_DEPTH = 4
"""How deep indexes may nest (an index naming an index naming manifests is depth 2)."""
MAX_SYMLINKS = 40
"""Symlinks followed while resolving one path, as Linux's ELOOP bound."""
DEFAULT_MAX_BYTES = 16 * 1024**3
DEFAULT_MAX_ENTRIES = 1_000_000
STREAM_SLACK_PER_ENTRY = 8192
"""Bytes of tar headers and padding allowed per entry on top of ``max_bytes``, bounding
the decompressed length of the layers."""
PLATFORM = ("linux", "amd64")

_CHUNK = 1024 * 1024
_DIGEST = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
_LAYER_TYPES = {
    "",  # docker save's manifest.json names no media types
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
_REF_ANNOTATIONS = ("org.opencontainers.image.ref.name", "io.containerd.image.name")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_PYTHONS = ("python3",)
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class OciLayer:
    """One layer of an image: where its blob is in the archive and what it must hash to."""

    path: str
    """The blob's name in the archive: ``blobs/sha256/<hex>``, ``<id>/layer.tar``."""
    media_type: str
    """As the manifest says ("" where it says none: docker save's manifest.json). The
    compression is read from the blob's first bytes."""
    diff_id: str
    """The digest of the uncompressed tar (the config's ``rootfs.diff_ids``)."""
    digest: str | None = None
    """The blob's own digest, where the archive names it (OCI descriptors, blob paths)."""
    size: int | None = None
    """The blob's size, where a descriptor gives it."""


@dataclass(frozen=True)
class OciImage:
    """An image found in an archive: its layers (read again by ``unpack``) and its config."""

    source: Path
    digest: str
    """``sha256:<hex>`` of the image's config blob (which names every layer's uncompressed
    digest): the same image gives the same digest, whatever the archive's format."""
    layers: tuple[OciLayer, ...]
    env: dict[str, str] = field(default_factory=dict, hash=False)
    workdir: str | None = None
    user: str | None = None
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    architecture: str = ""
    os: str = ""
    tag: str | None = None
    """The name the archive gives the chosen image (a RepoTag, a ref name), if any."""


@dataclass(frozen=True)
class UnpackStats:
    entries: int
    """Tar entries read, over all layers (whiteouts and skipped ones included)."""
    bytes: int
    """Bytes of regular file content written."""
    files: int
    dirs: int
    symlinks: int
    hardlinks: int
    whiteouts: int
    """Whiteout entries applied, opaque directories included."""
    skipped: int
    """Entries not made: device nodes, types tar does not know."""
    ownership: bool
    """Whether entries got their numeric owner and group (only when running as root)."""


# --------------------------------------------------------------------------- errors


def _fail(source: Path | str, what: str) -> TemplateBuildError:
    return TemplateBuildError(f"container image {source}: {what}")


class _Bad(Exception):
    """What is wrong with an archive, before it is named (becomes TemplateBuildError)."""


# --------------------------------------------------------------------------- tar safety


class _SafeTarInfo(tarfile.TarInfo):
    """Refuses the tar extensions whose size the stream gives unbounded: a pax header or
    GNU long name beyond ``MAX_TAR_HEADER`` (tarfile reads them whole into memory), global
    pax headers past that size together, and sparse files (their maps are unbounded)."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in (
            tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK,
            tarfile.XHDTYPE,
            tarfile.XGLTYPE,
            tarfile.SOLARIS_XHDTYPE,
        ):
            if self.size > MAX_TAR_HEADER:
                raise _Bad(f"a tar header extension of {self.size} bytes")
            if self.type == tarfile.XGLTYPE:
                held = sum(len(k) + len(v) for k, v in tarfile_.pax_headers.items())
                if held + self.size > MAX_TAR_HEADER:
                    raise _Bad("global pax headers past their bound")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Bad(f"{self.name!r} is a sparse file (not supported)")
        return cast(tarfile.TarInfo, super()._proc_member(tarfile_))  # type: ignore[misc]

    def _proc_gnusparse_00(self, *args: object) -> None:
        raise _Bad("a sparse file (not supported)")

    def _proc_gnusparse_01(self, *args: object) -> None:
        raise _Bad("a sparse file (not supported)")

    def _proc_gnusparse_10(self, *args: object) -> None:
        raise _Bad("a sparse file (not supported)")


_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, RecursionError)


# --------------------------------------------------------------------------- archives


def _member_name(name: str) -> str:
    """A name as an archive or manifest gives it, normalised (``./`` and trailing ``/``
    dropped); refuses absolute names and ``..``."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or not parts:
        raise _Bad(f"refusing the path {name!r}")
    return "/".join(parts)


class _Archive:
    """Files of an image archive by name: a directory or a tar."""

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def read_json(self, name: str, digest: str | None = None) -> tuple[Any, str]:
        """The JSON document ``name`` and its sha256 digest; checked against ``digest``."""
        with self.open(name) as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise _Bad(f"{name} is larger than {MAX_JSON_BYTES} bytes")
        if digest is not None:
            algorithm, _, expected = digest.partition(":")
            if hashlib.new(algorithm, data).hexdigest() != expected:
                raise _Bad(f"{name} does not match its digest {digest}")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise _Bad(f"{name} is not valid JSON: {e}") from None
        return doc, "sha256:" + hashlib.sha256(data).hexdigest()


class _DirArchive(_Archive):
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, name: str) -> Path:
        path = (self.root / _member_name(name)).resolve()
        if not path.is_relative_to(self.root):
            raise _Bad(f"{name} leads out of the directory")
        return path

    def has(self, name: str) -> bool:
        return self._path(name).is_file()

    def open(self, name: str) -> IO[bytes]:
        path = self._path(name)
        if not path.is_file():
            raise _Bad(f"{name} is missing")
        return path.open("rb")


class _TarArchive(_Archive):
    def __init__(self, path: Path) -> None:
        self.tar = tarfile.open(path, "r:*", tarinfo=_SafeTarInfo)  # noqa: SIM115 (closed by close)
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            while (member := self.tar.next()) is not None:
                if len(self.members) >= MAX_ARCHIVE_MEMBERS:
                    raise _Bad(f"more than {MAX_ARCHIVE_MEMBERS} members")
                with contextlib.suppress(_Bad):
                    self.members[_member_name(member.name)] = member
        except BaseException:
            self.tar.close()
            raise

    def has(self, name: str) -> bool:
        member = self.members.get(_member_name(name))
        return member is not None and (member.isfile() or member.issym() or member.islnk())

    def open(self, name: str) -> IO[bytes]:
        member = self.members.get(_member_name(name))
        if member is None:
            raise _Bad(f"{name} is missing")
        try:
            f = self.tar.extractfile(member)
        except KeyError:
            f = None
        if f is None:
            raise _Bad(f"{name} is not a file")
        return f

    def close(self) -> None:
        self.tar.close()


@contextlib.contextmanager
def _archive(source: Path) -> Iterator[_Archive]:
    try:
        if source.is_dir():
            archive: _Archive = _DirArchive(source)
        elif source.is_file():
            archive = _TarArchive(source)
        else:
            raise _Bad("no such file or directory")
    except _Bad as e:
        raise _fail(source, str(e)) from None
    except (*_TAR_ERRORS, OSError) as e:
        raise _fail(source, f"not a readable tar archive: {e}") from None
    try:
        yield archive
    except _Bad as e:
        raise _fail(source, str(e)) from None
    except (*_TAR_ERRORS, OSError) as e:
        raise _fail(source, f"corrupt or truncated: {e}") from None
    finally:
        archive.close()


# --------------------------------------------------------------------------- load_image


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{what} is not a string")
    return value


def _obj(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{what} is not an object")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad(f"{what} is not a list")
    return value


def _strings(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(_str(v, what) for v in _list(value, what))


def _digest(value: object, what: str) -> str:
    digest = _str(value, what)
    if not _DIGEST.match(digest):
        raise _Bad(f"{what} is not a sha256 or sha512 digest: {digest[:80]!r}")
    return digest


def _blob(digest: str) -> str:
    algorithm, _, hexdigest = digest.partition(":")
    return f"blobs/{algorithm}/{hexdigest}"


def _digest_of_path(path: str) -> str | None:
    """The digest a blob's path names (``blobs/sha256/<hex>``, ``<hex>.json``), if any."""
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "blobs":
        candidate = f"{parts[1]}:{parts[2]}"
    else:
        candidate = "sha256:" + parts[-1].removesuffix(".json")
    return candidate if _DIGEST.match(candidate) else None


_Blob = tuple[str, str, str | None, int | None]
"""(path, media type, digest, size) of a layer blob."""


@dataclass
class _Candidate:
    config: str
    """The config's path in the archive."""
    config_digest: str | None
    layers: list[_Blob]
    names: tuple[str, ...]
    platform: tuple[str, str] | None


def _docker_candidates(archive: _Archive) -> list[_Candidate]:
    manifest, _ = archive.read_json("manifest.json")
    out = []
    for i, entry in enumerate(_list(manifest, "manifest.json")):
        entry = _obj(entry, f"manifest.json[{i}]")
        config = _member_name(_str(entry.get("Config"), f"manifest.json[{i}].Config"))
        layers: list[_Blob] = []
        for path in _strings(entry.get("Layers"), f"manifest.json[{i}].Layers"):
            path = _member_name(path)
            layers.append((path, "", _digest_of_path(path), None))
        tags = _strings(entry.get("RepoTags"), f"manifest.json[{i}].RepoTags")
        out.append(_Candidate(config, _digest_of_path(config), layers, tags, None))
    return out


def _platform(value: object) -> tuple[str, str] | None:
    if not isinstance(value, dict):
        return None
    return (str(value.get("os", "")), str(value.get("architecture", "")))


def _oci_candidates(archive: _Archive) -> list[_Candidate]:
    index, _ = archive.read_json("index.json")
    out: list[_Candidate] = []

    def walk(doc: object, where: str, names: tuple[str, ...], depth: int) -> None:
        doc = _obj(doc, where)
        for i, desc in enumerate(_list(doc.get("manifests"), f"{where}.manifests")):
            desc = _obj(desc, f"{where}.manifests[{i}]")
            media_type = _str(desc.get("mediaType", ""), "mediaType")
            digest = _digest(desc.get("digest"), f"{where}.manifests[{i}].digest")
            annotations = desc.get("annotations")
            own = names
            if isinstance(annotations, dict):
                own = own + tuple(
                    a for k in _REF_ANNOTATIONS if isinstance(a := annotations.get(k), str)
                )
            if media_type in _INDEX_TYPES:
                if depth >= MAX_INDEX_DEPTH:
                    raise _Bad(f"indexes nest deeper than {MAX_INDEX_DEPTH}")
                nested, _ = archive.read_json(_blob(digest), digest)
                walk(nested, digest, own, depth + 1)
                continue
            if media_type not in _MANIFEST_TYPES:
                continue  # an artifact that is no image (signatures, attestations' blobs)
            if len(out) >= MAX_LAYERS:
                raise _Bad("too many manifests")
            manifest, _ = archive.read_json(_blob(digest), digest)
            manifest = _obj(manifest, digest)
            config = _obj(manifest.get("config"), f"{digest}.config")
            config_digest = _digest(config.get("digest"), f"{digest}.config.digest")
            layers: list[_Blob] = []
            for j, layer in enumerate(_list(manifest.get("layers"), f"{digest}.layers")):
                layer = _obj(layer, f"{digest}.layers[{j}]")
                layer_digest = _digest(layer.get("digest"), f"{digest}.layers[{j}].digest")
                size = layer.get("size")
                layers.append(
                    (
                        _blob(layer_digest),
                        _str(layer.get("mediaType", ""), "mediaType"),
                        layer_digest,
                        size if isinstance(size, int) and size >= 0 else None,
                    )
                )
            out.append(
                _Candidate(
                    _blob(config_digest),
                    config_digest,
                    layers,
                    own,
                    _platform(desc.get("platform")),
                )
            )

    walk(index, "index.json", (), 0)
    return out


def _tag_matches(tag: str, names: tuple[str, ...]) -> bool:
    wanted = {tag}
    if ":" not in tag.rsplit("/", 1)[-1]:
        wanted.add(f"{tag}:latest")
    for name in names:
        short = name.removeprefix("docker.io/").removeprefix("library/")
        if name in wanted or short in wanted:
            return True
    return False


def _choose(
    archive: _Archive, candidates: list[_Candidate], tag: str | None
) -> tuple[_Candidate, Any, str]:
    """The image to take, its config document and the config's digest."""
    if tag is not None:
        candidates = [c for c in candidates if _tag_matches(tag, c.names)]
        if not candidates:
            raise _Bad(f"no image tagged {tag!r} in it")
    if not candidates:
        raise _Bad("it holds no image")
    # an index's platform spares reading the config of every other platform
    if len(candidates) > 1:
        by_platform = [c for c in candidates if c.platform in (None, PLATFORM)]
        candidates = by_platform or candidates
    read = []
    for c in candidates:
        config, digest = archive.read_json(c.config, c.config_digest)
        read.append((c, config, digest))
    if len(read) > 1:
        matching = [
            r
            for r in read
            if isinstance(r[1], dict) and (r[1].get("os"), r[1].get("architecture")) == PLATFORM
        ]
        read = matching or read
        unique = {r[2]: r for r in read}  # one image under two names is one image
        read = list(unique.values())
    if len(read) > 1:
        names = sorted({n for c, _, _ in read for n in c.names}) or ["(untagged)"]
        platforms = sorted(
            {f"{r[1].get('os')}/{r[1].get('architecture')}" for r in read if isinstance(r[1], dict)}
        )
        raise _Bad(
            f"it holds {len(read)} images ({', '.join(platforms)}), not one for "
            f"{'/'.join(PLATFORM)}; name one with tag=: " + ", ".join(names)
        )
    return read[0]


def _image(
    source: Path, candidate: _Candidate, config: Any, digest: str, tag: str | None
) -> OciImage:
    config = _obj(config, "the config")
    rootfs = _obj(config.get("rootfs"), "config.rootfs")
    diff_ids = [_digest(d, "config.rootfs.diff_ids") for d in _list(rootfs.get("diff_ids"), "")]
    if len(diff_ids) != len(candidate.layers):
        raise _Bad(
            f"the manifest names {len(candidate.layers)} layers, the config "
            f"{len(diff_ids)} diff_ids"
        )
    if len(diff_ids) > MAX_LAYERS:
        raise _Bad(f"more than {MAX_LAYERS} layers")
    layers = []
    for (path, media_type, blob_digest, size), diff_id in zip(
        candidate.layers, diff_ids, strict=True
    ):
        if media_type not in _LAYER_TYPES:
            raise _Bad(f"layer {path} has the media type {media_type!r}, not a tar layer")
        layers.append(OciLayer(path, media_type, diff_id, blob_digest, size))
    inner = config.get("config")
    inner = {} if inner is None else _obj(inner, "config.config")
    env: dict[str, str] = {}
    for item in _strings(inner.get("Env"), "config.config.Env"):
        key, eq, value = item.partition("=")
        if eq and key:
            env[key] = value
    workdir = inner.get("WorkingDir")
    user = inner.get("User")
    names = candidate.names
    chosen = next((n for n in names if _tag_matches(tag, (n,))), None) if tag else None
    return OciImage(
        source=source,
        digest=digest,
        layers=tuple(layers),
        env=env,
        workdir=_str(workdir, "config.config.WorkingDir") or None if workdir else None,
        user=_str(user, "config.config.User") or None if user else None,
        cmd=_strings(inner.get("Cmd"), "config.config.Cmd"),
        entrypoint=_strings(inner.get("Entrypoint"), "config.config.Entrypoint"),
        architecture=str(config.get("architecture", "")),
        os=str(config.get("os", "")),
        tag=chosen or (names[0] if names else None),
    )


def load_image(source: Path, tag: str | None = None) -> OciImage:
    """The image in the archive ``source`` (see the module's docstring for the formats):
    its config read and checked against its digest, its layers named for ``unpack``.
    ``TemplateBuildError`` when the archive is not one, is damaged, or holds no single
    image to take."""
    source = Path(source)
    with _archive(source) as archive:
        if archive.has("manifest.json"):
            candidates = _docker_candidates(archive)
        elif archive.has("index.json"):
            candidates = _oci_candidates(archive)
        else:
            raise _Bad("neither a docker save archive (manifest.json) nor an OCI layout")
        candidate, config, digest = _choose(archive, candidates, tag)
        return _image(source, candidate, config, digest, tag)


# --------------------------------------------------------------------------- streams


class _Verified(io.RawIOBase):
    """Reads ``inner``, hashing and counting what passes; refuses more than ``limit``."""

    def __init__(self, inner: IO[bytes], algorithm: str, limit: int | None, what: str) -> None:
        self.inner = inner
        self.hash = hashlib.new(algorithm)
        self.count = 0
        self.limit = limit
        self.what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        data = self.inner.read(len(view))
        n = len(data)
        if n:
            self.count += n
            if self.limit is not None and self.count > self.limit:
                raise _Bad(f"{self.what} is longer than {self.limit} bytes")
            self.hash.update(data)
            view[:n] = data
        return n

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def check(self, digest: str, size: int | None = None) -> None:
        if size is not None and self.count != size:
            raise _Bad(f"{self.what} is {self.count} bytes, its descriptor says {size}")
        if f"{self.hash.name}:{self.hash.hexdigest()}" != digest:
            raise _Bad(f"{self.what} does not match its digest {digest}")


class _ZstdProcess(io.RawIOBase):
    """The ``zstd`` program decompressing ``inner`` (fed from a thread)."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.proc = subprocess.Popen(
            ["zstd", "-d", "-c", "-q"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.inner = inner
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            while chunk := self.inner.read(_CHUNK):
                stdin.write(chunk)
        except BrokenPipeError:
            pass
        except BaseException as e:
            self.error = e
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        stdout = self.proc.stdout
        assert stdout is not None
        n: int = stdout.readinto(buffer)  # type: ignore[attr-defined]
        if n == 0:
            self._finish()
        return n

    def _finish(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error
        if self.proc.wait() != 0:
            raise _Bad("zstd could not decompress a layer (corrupt or truncated)")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.thread.join()
        super().close()


def _zstd(inner: IO[bytes]) -> IO[bytes]:
    try:
        module: Any = importlib.import_module("zstandard")
    except ImportError:
        if shutil.which("zstd") is None:
            raise HostToolMissing("zstd (or the Python module zstandard)", "zstd") from None
        return io.BufferedReader(_ZstdProcess(inner), _CHUNK)
    reader = module.ZstdDecompressor().stream_reader(inner, read_across_frames=True)
    return cast(IO[bytes], reader)


# --------------------------------------------------------------------------- the tree


def _parts(name: str) -> tuple[str, ...]:
    """A layer entry's path as components; refuses absolute paths and ``..``."""
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if name.startswith("/") or ".." in parts:
        raise _Bad(f"refusing the entry {name!r} (absolute or with ..)")
    return parts


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _DirMeta:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: float | None = None


class _Tree:
    """``dest`` as the root of a tree: every path resolved inside it as a chroot would,
    every step opened without following a symlink."""

    def __init__(self, dest: Path, *, max_bytes: int, max_entries: int) -> None:
        self.dest = dest
        self.root = os.open(dest, _DIR_FLAGS)
        self.as_root = os.geteuid() == 0
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.dirs: dict[tuple[str, ...], _DirMeta] = {(): _DirMeta()}
        self.written: set[tuple[str, ...]] = set()
        self.opaque: set[tuple[str, ...]] = set()
        self.streamed = 0
        """Uncompressed layer bytes read so far (bounded by unpack's stream limit)."""
        self._cache: tuple[tuple[str, ...], tuple[str, ...], int] | None = None
        """The last directory resolved: (its parts as named, its real path, an fd)."""
        self.counts = dict.fromkeys(
            ("entries", "bytes", "files", "dirs", "symlinks", "hardlinks", "whiteouts"), 0
        )
        self.counts["skipped"] = 0

    def close(self) -> None:
        self._drop_cache()
        os.close(self.root)

    # ----------------------------------------------------------------- resolving

    def _drop_cache(self) -> None:
        if self._cache is not None:
            os.close(self._cache[2])
            self._cache = None

    def _changed(self) -> None:
        """A directory or symlink went away: the cached resolution may no longer hold."""
        self._drop_cache()

    def resolve(self, parts: tuple[str, ...], create: bool) -> tuple[tuple[str, ...], int] | None:
        """The directory ``parts`` names, resolved inside the root: its real path and an
        fd of it (the caller closes it). Missing directories are made when ``create``
        (else None); a component that is a file is an error."""
        cached = self._cache
        if cached is not None and cached[0] == parts:
            return cached[1], os.dup(cached[2])
        stack: list[tuple[str, int]] = []
        pending = list(reversed(parts))
        links = 0
        try:
            while pending:
                name = pending.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if stack:
                        os.close(stack.pop()[1])
                    continue
                at = stack[-1][1] if stack else self.root
                try:
                    st = os.lstat(name, dir_fd=at)
                except FileNotFoundError:
                    if not create:
                        return None
                    os.mkdir(name, 0o700, dir_fd=at)
                    real = (*(n for n, _ in stack), name)
                    self.dirs[real] = _DirMeta()
                    st = os.lstat(name, dir_fd=at)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise _Bad(f"too many levels of symlinks in {'/'.join(parts)!r}")
                    target = os.readlink(name, dir_fd=at)
                    if target.startswith("/"):
                        while stack:
                            os.close(stack.pop()[1])
                    pending.extend(reversed(target.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise _Bad(f"{'/'.join(parts)!r} goes through a file, not a directory")
                stack.append((name, os.open(name, _DIR_FLAGS, dir_fd=at)))
            real = tuple(n for n, _ in stack)
            fd = stack.pop()[1] if stack else os.dup(self.root)
        finally:
            for _, f in stack:
                os.close(f)
        self._drop_cache()
        self._cache = (parts, real, os.dup(fd))
        return real, fd

    # ----------------------------------------------------------------- changing

    def _remove(self, name: str, at: int) -> None:
        """Remove ``name`` in ``at`` whatever it is (a directory with all it holds)."""
        try:
            st = os.lstat(name, dir_fd=at)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=at)
        else:
            os.unlink(name, dir_fd=at)
        if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            self._changed()

    def _mark_written(self, path: tuple[str, ...]) -> None:
        while path and path not in self.written:
            self.written.add(path)
            path = path[:-1]

    def apply(self, member: tarfile.TarInfo, data: IO[bytes] | None) -> None:
        self.counts["entries"] += 1
        if self.counts["entries"] > self.max_entries:
            raise _Bad(f"more than {self.max_entries} entries")
        parts = _parts(member.name)
        if not parts:  # the root itself
            if member.isdir():
                self._dir_meta((), member)
            return
        base = parts[-1]
        if base.startswith(_WHITEOUT):
            self._whiteout(parts[:-1], base)
            return
        if (
            member.ischr()
            or member.isblk()
            or not (
                member.isreg()
                or member.isdir()
                or member.issym()
                or member.islnk()
                or member.isfifo()
            )
        ):
            self.counts["skipped"] += 1
            return
        resolved = self.resolve(parts[:-1], create=True)
        assert resolved is not None
        parent, at = resolved
        path = (*parent, base)
        try:
            if member.isdir():
                self._make_dir(base, at, path, member)
            elif member.islnk():
                self._link(base, at, member)
            else:
                self._remove(base, at)
                if member.isreg():
                    self._write(base, at, member, data)
                elif member.issym():
                    os.symlink(member.linkname, base, dir_fd=at)
                    self._set_link_meta(base, at, member)
                    self.counts["symlinks"] += 1
                else:
                    os.mkfifo(base, 0o600, dir_fd=at)
                    self._set_file_meta(base, at, member)
            self._mark_written(path)
        finally:
            os.close(at)

    def _whiteout(self, parent_parts: tuple[str, ...], base: str) -> None:
        resolved = self.resolve(parent_parts, create=False)
        if resolved is None:
            return
        parent, at = resolved
        try:
            if base == _OPAQUE:
                self.opaque.add(parent)
            elif base.startswith(_WHITEOUT + _WHITEOUT):
                return  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs)
            else:
                name = base.removeprefix(_WHITEOUT)
                if name in ("", ".", ".."):
                    raise _Bad(f"refusing the whiteout {base!r}")
                self._remove(name, at)
            self.counts["whiteouts"] += 1
        finally:
            os.close(at)

    def _dir_meta(self, path: tuple[str, ...], member: tarfile.TarInfo) -> None:
        self.dirs[path] = _DirMeta(member.mode & 0o7777, member.uid, member.gid, member.mtime)

    def _make_dir(self, base: str, at: int, path: tuple[str, ...], member: tarfile.TarInfo) -> None:
        try:
            is_dir = stat.S_ISDIR(os.lstat(base, dir_fd=at).st_mode)
        except FileNotFoundError:
            is_dir = False
        if not is_dir:
            self._remove(base, at)
            os.mkdir(base, 0o700, dir_fd=at)
        self._dir_meta(path, member)
        self.counts["dirs"] += 1

    def _link(self, base: str, at: int, member: tarfile.TarInfo) -> None:
        target = _parts(member.linkname)
        if not target:
            raise _Bad(f"the hard link {member.name!r} has no target")
        resolved = self.resolve(target[:-1], create=False)
        if resolved is None:
            raise _Bad(f"the hard link {member.name!r} names a missing {member.linkname!r}")
        _, target_at = resolved
        try:
            try:
                st = os.lstat(target[-1], dir_fd=target_at)
            except FileNotFoundError:
                raise _Bad(
                    f"the hard link {member.name!r} names a missing {member.linkname!r}"
                ) from None
            if stat.S_ISDIR(st.st_mode):
                raise _Bad(f"the hard link {member.name!r} names a directory")
            try:
                if os.path.samestat(st, os.lstat(base, dir_fd=at)):
                    return
            except FileNotFoundError:
                pass
            self._remove(base, at)
            os.link(target[-1], base, src_dir_fd=target_at, dst_dir_fd=at, follow_symlinks=False)
            self.counts["hardlinks"] += 1
        finally:
            os.close(target_at)

    def _write(self, base: str, at: int, member: tarfile.TarInfo, src: IO[bytes] | None) -> None:
        if self.counts["bytes"] + member.size > self.max_bytes:
            raise _Bad(f"its files are larger than {self.max_bytes} bytes")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(base, flags, 0o600, dir_fd=at)
        try:
            left = member.size
            while left > 0:
                chunk = src.read(min(_CHUNK, left)) if src is not None else b""
                if not chunk:
                    raise _Bad(f"{member.name!r} is cut short")
                left -= len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            self.counts["bytes"] += member.size
            if self.as_root:
                os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, member.mode & 0o7777)
            os.utime(fd, ns=(_ns(member.mtime), _ns(member.mtime)))
        finally:
            os.close(fd)
        self.counts["files"] += 1

    def _set_file_meta(self, base: str, at: int, member: tarfile.TarInfo) -> None:
        if self.as_root:
            os.chown(base, member.uid, member.gid, dir_fd=at, follow_symlinks=False)
        os.chmod(base, member.mode & 0o7777, dir_fd=at)
        os.utime(base, ns=(_ns(member.mtime), _ns(member.mtime)), dir_fd=at)

    def _set_link_meta(self, base: str, at: int, member: tarfile.TarInfo) -> None:
        if self.as_root:
            os.chown(base, member.uid, member.gid, dir_fd=at, follow_symlinks=False)
        os.utime(base, ns=(_ns(member.mtime), _ns(member.mtime)), dir_fd=at, follow_symlinks=False)

    # ----------------------------------------------------------------- layer ends

    def end_layer(self) -> None:
        """Apply this layer's opaque directories, then forget what it wrote."""
        for path in sorted(self.opaque):
            fd = self._open_real(path)
            if fd is not None:
                try:
                    self._clear_unwritten(path, fd)
                finally:
                    os.close(fd)
        self.opaque.clear()
        self.written.clear()

    def _open_real(self, path: tuple[str, ...]) -> int | None:
        """An fd of the real directory ``path`` (no symlink followed), or None."""
        fd = os.dup(self.root)
        try:
            for name in path:
                new = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = new
        except OSError:
            os.close(fd)
            return None
        return fd

    def _clear_unwritten(self, path: tuple[str, ...], fd: int) -> None:
        for name in os.listdir(fd):
            child = (*path, name)
            if child not in self.written:
                self._remove(name, fd)
                continue
            st = os.lstat(name, dir_fd=fd)
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                try:
                    self._clear_unwritten(child, sub)
                finally:
                    os.close(sub)

    def finish(self) -> None:
        """Give every directory its own owner, mode and time (deepest first)."""
        for path in sorted(self.dirs, key=len, reverse=True):
            meta = self.dirs[path]
            fd = self._open_real(path)
            if fd is None:
                continue
            try:
                if self.as_root:
                    os.fchown(fd, meta.uid, meta.gid)
                os.fchmod(fd, meta.mode)
                if meta.mtime is not None:
                    os.utime(fd, ns=(_ns(meta.mtime), _ns(meta.mtime)))
            finally:
                os.close(fd)

    def clear(self) -> None:
        """Empty the root again (after a failure)."""
        self._changed()
        for name in os.listdir(self.root):
            with contextlib.suppress(OSError):
                self._remove(name, self.root)

    def stats(self) -> UnpackStats:
        c = self.counts
        return UnpackStats(
            entries=c["entries"],
            bytes=c["bytes"],
            files=c["files"],
            dirs=c["dirs"],
            symlinks=c["symlinks"],
            hardlinks=c["hardlinks"],
            whiteouts=c["whiteouts"],
            skipped=c["skipped"],
            ownership=self.as_root,
        )


def _ns(mtime: float) -> int:
    return int(mtime * 1_000_000_000)


# --------------------------------------------------------------------------- unpack


def _unpack_layer(archive: _Archive, layer: OciLayer, tree: _Tree, stream_limit: int) -> None:
    with contextlib.ExitStack() as stack:
        blob = stack.enter_context(archive.open(layer.path))
        algorithm = (layer.digest or "sha256:").partition(":")[0]
        raw = _Verified(blob, algorithm, layer.size, f"layer {layer.path}")
        buffered = stack.enter_context(io.BufferedReader(raw, _CHUNK))
        head = buffered.peek(4)[:4]
        decompressed: IO[bytes]
        if head.startswith(_GZIP_MAGIC):
            decompressed = cast(
                IO[bytes], stack.enter_context(gzip.GzipFile(fileobj=buffered, mode="rb"))
            )
        elif head.startswith(_ZSTD_MAGIC):
            decompressed = stack.enter_context(_zstd(buffered))
        else:
            decompressed = buffered
        diff_algorithm = layer.diff_id.partition(":")[0]
        plain = _Verified(
            decompressed,
            diff_algorithm,
            stream_limit - tree.streamed,
            f"the uncompressed layer {layer.path}",
        )
        tar = stack.enter_context(
            tarfile.open(fileobj=io.BufferedReader(plain, _CHUNK), mode="r|", tarinfo=_SafeTarInfo)
        )
        while (member := tar.next()) is not None:
            tar.members.clear()  # type: ignore[attr-defined]  # else stream mode keeps all
            tree.apply(member, tar.extractfile(member) if member.isreg() else None)
        tree.end_layer()
        plain.drain()
        raw.drain()
        if layer.digest is not None:
            raw.check(layer.digest, layer.size)
        plain.check(layer.diff_id)
        tree.streamed += plain.count


def unpack(
    image: OciImage,
    dest: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> UnpackStats:
    """Apply the image's layers in order into ``dest`` (an empty directory, made if
    missing). See the module's docstring for what is made and what is refused; on any
    error ``dest`` is left empty and ``TemplateBuildError`` (``HostToolMissing`` for a zstd
    layer on a host without zstd) is raised."""
    dest = Path(dest)
    try:
        dest.mkdir(exist_ok=True)
        st = os.lstat(dest)
        if not stat.S_ISDIR(st.st_mode) or any(dest.iterdir()):
            raise _fail(image.source, f"unpacking needs an empty directory, {dest} is not")
    except OSError as e:
        raise _fail(image.source, f"cannot unpack into {dest}: {e}") from None
    tree = _Tree(dest, max_bytes=max_bytes, max_entries=max_entries)
    stream_limit = max_bytes + STREAM_SLACK_PER_ENTRY * max_entries
    try:
        with _archive(image.source) as archive:
            for layer in image.layers:
                try:
                    _unpack_layer(archive, layer, tree, stream_limit)
                except _Bad as e:
                    raise _Bad(f"layer {layer.path}: {e}") from None
                except (*_TAR_ERRORS, OSError) as e:
                    raise _Bad(f"layer {layer.path}: {type(e).__name__}: {e}") from None
            tree.finish()
        return tree.stats()
    except BaseException:
        tree.clear()
        raise
    finally:
        tree.close()


# --------------------------------------------------------------------------- python


def python_in_rootfs(root: Path, path: str | None = None) -> str | None:
    """Where an unpacked tree has ``python3``: the first directory of ``path`` (the
    image's ``PATH``; a usual default when None) holding one that, its symlinks resolved
    inside ``root``, is an executable regular file. The path is as the guest sees it
    (``/usr/local/bin/python3``); None when there is none."""
    try:
        tree = _Tree(Path(root), max_bytes=0, max_entries=0)
    except OSError:
        return None
    try:
        for directory in (path or _DEFAULT_PATH).split(":"):
            if not directory.startswith("/"):
                continue
            for name in _PYTHONS:
                if _is_executable(tree, (*directory.split("/"), name)):
                    return "/" + "/".join(p for p in (*directory.split("/"), name) if p)
    except (OSError, _Bad):
        return None
    finally:
        tree.close()
    return None


def _is_executable(tree: _Tree, parts: tuple[str, ...]) -> bool:
    for _ in range(MAX_SYMLINKS):
        try:
            resolved = tree.resolve(parts[:-1], create=False)
        except (OSError, _Bad):
            return False
        if resolved is None:
            return False
        real, at = resolved
        try:
            if parts[-1] in ("", ".", ".."):
                return False
            st = os.lstat(parts[-1], dir_fd=at)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(parts[-1], dir_fd=at)
                base = () if target.startswith("/") else real
                parts = (*base, *target.split("/"))
                continue
            return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)
        except OSError:
            return False
        finally:
            os.close(at)
    return False
