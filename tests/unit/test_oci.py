"""Container images as template roots (templates/oci.py): archives built here with tarfile
in each format (docker save as a tar and a directory, OCI layout as a tar and a
directory), unpacked for real into temporary directories; hostile layers refused or kept
inside the destination."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from novasandbox.errors import HostToolMissing, TemplateBuildError
from novasandbox.templates import oci
from novasandbox.templates.oci import (
    MAX_JSON_BYTES,
    MAX_TAR_HEADER,
    OciImage,
    load_image,
    python_in_rootfs,
    unpack,
)

MTIME = 1_600_000_000
FORMATS = ["docker-tar", "docker-dir", "oci-tar", "oci-dir"]


# --------------------------------------------------------------------------- builders


@dataclass
class E:
    """One entry of a layer."""

    name: str
    kind: str = "file"  # file, dir, sym, link, fifo, chr
    data: bytes = b""
    mode: int = 0o644
    target: str = ""
    uid: int = 0
    gid: int = 0


def layer(entries: Sequence[E]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.mtime = MTIME
            info.mode = e.mode
            info.uid, info.gid = e.uid, e.gid
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "sym": tarfile.SYMTYPE,
                "link": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
                "chr": tarfile.CHRTYPE,
            }[e.kind]
            info.linkname = e.target
            if e.kind == "chr":
                info.devmajor, info.devminor = 1, 1
            tar.addfile(info)
    return out.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True).stdout
    return data


MEDIA = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def config_doc(layers: Sequence[bytes], arch: str = "amd64", **inner: Any) -> bytes:
    return json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": inner,
            "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]},
        },
        sort_keys=True,
    ).encode()


def write_tree(files: dict[str, bytes], dest: Path, fmt: str) -> Path:
    """The files as a directory or (``-tar`` formats) a tar of them."""
    if fmt.endswith("-dir"):
        for name, data in files.items():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)
        return dest
    path = dest.with_suffix(".tar")
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def docker_files(
    images: Sequence[tuple[Sequence[bytes], bytes, Sequence[str]]], compression: str = "none"
) -> dict[str, bytes]:
    """docker save's legacy layout: ``<id>/layer.tar`` and ``<config hex>.json``."""
    files: dict[str, bytes] = {}
    manifest = []
    for plain_layers, config, tags in images:
        paths = []
        for plain in plain_layers:
            layer_id = hashlib.sha256(b"id" + plain).hexdigest()
            files[f"{layer_id}/layer.tar"] = compress(plain, compression)
            files[f"{layer_id}/VERSION"] = b"1.0"
            paths.append(f"{layer_id}/layer.tar")
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        files[config_name] = config
        manifest.append({"Config": config_name, "RepoTags": list(tags), "Layers": paths})
    files["manifest.json"] = json.dumps(manifest).encode()
    files["repositories"] = b"{}"
    return files


def oci_files(
    images: Sequence[tuple[Sequence[bytes], bytes, dict[str, str] | None]],
    compression: str = "none",
    nested: bool = False,
    ref: str | None = None,
) -> dict[str, bytes]:
    """An OCI layout; ``nested``: the images under one index (a multi-platform image)."""
    files: dict[str, bytes] = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}'}
    descriptors = []
    for plain_layers, config, platform in images:
        layer_descs = []
        for plain in plain_layers:
            blob = compress(plain, compression)
            files[f"blobs/sha256/{sha(blob)[7:]}"] = blob
            layer_descs.append(
                {"mediaType": MEDIA[compression], "digest": sha(blob), "size": len(blob)}
            )
        files[f"blobs/sha256/{sha(config)[7:]}"] = config
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha(config),
                    "size": len(config),
                },
                "layers": layer_descs,
            }
        ).encode()
        files[f"blobs/sha256/{sha(manifest)[7:]}"] = manifest
        desc: dict[str, Any] = {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(manifest),
            "size": len(manifest),
        }
        if platform is not None:
            desc["platform"] = platform
        descriptors.append(desc)
    if nested:
        inner = json.dumps({"schemaVersion": 2, "manifests": descriptors}).encode()
        files[f"blobs/sha256/{sha(inner)[7:]}"] = inner
        descriptors = [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": sha(inner),
                "size": len(inner),
            }
        ]
    if ref is not None:
        for d in descriptors:
            d["annotations"] = {"org.opencontainers.image.ref.name": ref}
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": descriptors}).encode()
    return files


def build(
    tmp: Path,
    fmt: str,
    layers: Sequence[bytes],
    compression: str = "none",
    config: bytes | None = None,
    tags: Sequence[str] = ("example:latest",),
) -> Path:
    config = config if config is not None else config_doc(layers)
    if fmt.startswith("docker"):
        files = docker_files([(layers, config, tags)], compression)
    else:
        files = oci_files([(layers, config, None)], compression)
    return write_tree(files, tmp / f"image-{fmt}", fmt)


def unpack_into(tmp: Path, image: OciImage, **limits: int) -> Path:
    dest = tmp / "root"
    unpack(image, dest, **limits)
    return dest


def refused(tmp: Path, entries: Sequence[Sequence[E]], match: str, **limits: int) -> Path:
    """Unpacking these layers fails with TemplateBuildError matching ``match`` and leaves
    the destination empty."""
    path = build(tmp, "oci-dir", [layer(x) for x in entries])
    dest = tmp / "root"
    with pytest.raises(TemplateBuildError, match=match) as info:
        unpack(load_image(path), dest, **limits)
    assert info.value.code == "template-build-failed"
    assert str(path) in str(info.value)
    assert list(dest.iterdir()) == []
    return dest


# --------------------------------------------------------------------------- images


LOWER = [
    E("etc", "dir", mode=0o755),
    E("etc/keep", data=b"keep\n", mode=0o600),
    E("etc/gone", data=b"deleted later\n"),
    E("etc/hostname", data=b"lower\n"),
    E("opt", "dir", mode=0o755),
    E("opt/old", data=b"old\n"),
    E("opt/olddir", "dir"),
    E("opt/olddir/deep", data=b"deep\n"),
    E("usr", "dir"),
    E("usr/bin", "dir"),
    E("usr/bin/tool", data=b"#!/bin/sh\n", mode=0o4755),
    E("usr/bin/tool-again", "link", target="usr/bin/tool"),
    E("etc/alt", "sym", target="/usr/bin/tool"),
    E("tmp", "dir", mode=0o1777),
    E("run/fifo", "fifo", mode=0o600),
    E("dev/null", "chr", mode=0o666),
]
MIDDLE = [
    E("etc/.wh.gone"),
    E("etc/hostname", data=b"middle\n", mode=0o640),
    E("opt/.wh..wh..opq"),
    E("opt/new", data=b"new\n"),
    E("opt/olddir", "dir"),  # kept (this layer names it) but emptied of the lower files
    E("opt/olddir/fresh", data=b"fresh\n"),
]
UPPER = [
    E("app", "dir", mode=0o750),
    E("app/main.py", data=b"print('hi')\n", mode=0o755),
    E("usr/local/bin/python3.12", data=b"\x7fELF", mode=0o755),
    E("usr/local/bin/python3", "sym", target="python3.12"),
]


def three_layers() -> list[bytes]:
    return [layer(LOWER), layer(MIDDLE), layer(UPPER)]


def image_config(layers: Sequence[bytes]) -> bytes:
    return config_doc(
        layers,
        Env=["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", "EMPTY=", "A=b=c"],
        WorkingDir="/app",
        User="1000:1000",
        Cmd=["python3", "main.py"],
        Entrypoint=["/entry.sh"],
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_each_format_unpacks_three_layers(tmp_path: Path, fmt: str, compression: str) -> None:
    layers = three_layers()
    config = image_config(layers)
    image = load_image(build(tmp_path, fmt, layers, compression, config))
    assert image.digest == sha(config)  # the same in every format
    assert image.env == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "EMPTY": "",
        "A": "b=c",
    }
    assert image.workdir == "/app" and image.user == "1000:1000"
    assert image.cmd == ("python3", "main.py") and image.entrypoint == ("/entry.sh",)
    assert (image.os, image.architecture) == ("linux", "amd64")
    assert len(image.layers) == 3
    if fmt.startswith("docker"):
        assert image.tag == "example:latest"

    root = unpack_into(tmp_path, image)
    assert (root / "etc/keep").read_bytes() == b"keep\n"
    assert not (root / "etc/gone").exists()  # whiteout
    assert (root / "etc/hostname").read_bytes() == b"middle\n"
    assert sorted(os.listdir(root / "opt")) == ["new", "olddir"]  # opaque
    assert os.listdir(root / "opt/olddir") == ["fresh"]
    assert os.readlink(root / "etc/alt") == "/usr/bin/tool"  # absolute target kept as text
    tool, again = (root / "usr/bin/tool").stat(), (root / "usr/bin/tool-again").stat()
    assert tool.st_ino == again.st_ino and tool.st_nlink == 2  # the hard link
    assert stat.S_IMODE(tool.st_mode) == 0o4755
    assert stat.S_IMODE((root / "etc/keep").stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "etc/hostname").stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((root / "app").stat().st_mode) == 0o750
    assert stat.S_IMODE((root / "usr/local").stat().st_mode) == 0o755  # made implicitly
    assert (root / "etc/keep").stat().st_mtime == MTIME
    assert (root / "etc").stat().st_mtime == MTIME  # directories' times set last
    assert stat.S_ISFIFO((root / "run/fifo").lstat().st_mode)
    assert not (root / "dev/null").exists()  # device nodes are never made
    assert python_in_rootfs(root, image.env["PATH"]) == "/usr/local/bin/python3"


def test_stats_count_what_was_made(tmp_path: Path) -> None:
    layers = three_layers()
    stats = unpack(load_image(build(tmp_path, "oci-dir", layers)), tmp_path / "root")
    assert stats.entries == len(LOWER) + len(MIDDLE) + len(UPPER)
    assert stats.whiteouts == 2 and stats.hardlinks == 1 and stats.symlinks == 2
    assert stats.skipped == 1  # the device node
    assert stats.bytes == sum(len(e.data) for e in [*LOWER, *MIDDLE, *UPPER])
    assert stats.ownership == (os.geteuid() == 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="owners are kept only when unpacking as root")
def test_owners_are_kept_as_root(tmp_path: Path) -> None:
    entries = [
        E("home", "dir"),
        E("home/user", "dir", mode=0o700, uid=1000, gid=1001),
        E("home/user/file", data=b"x", uid=1000, gid=1001, mode=0o4750),
        E("home/user/link", "sym", target="file", uid=1002, gid=1003),
    ]
    root = unpack_into(tmp_path, load_image(build(tmp_path, "oci-dir", [layer(entries)])))
    for name, owner in [("home/user", (1000, 1001)), ("home/user/file", (1000, 1001))]:
        st = (root / name).stat()
        assert (st.st_uid, st.st_gid) == owner, name
    assert stat.S_IMODE((root / "home/user/file").stat().st_mode) == 0o4750  # after chown
    link = (root / "home/user/link").lstat()
    assert (link.st_uid, link.st_gid) == (1002, 1003)
    assert (root / "home").stat().st_uid == 0


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd program to make one")
def test_zstd_layers(tmp_path: Path) -> None:
    layers = three_layers()
    root = unpack_into(tmp_path, load_image(build(tmp_path, "oci-tar", layers, "zstd")))
    assert (root / "opt/new").read_bytes() == b"new\n"


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd program to make one")
def test_a_truncated_zstd_layer_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path, "docker-dir", [layer([E("f", data=os.urandom(100_000))])], "zstd")
    image = load_image(path)
    blob = path / image.layers[0].path
    blob.write_bytes(blob.read_bytes()[:50_000])
    with pytest.raises(TemplateBuildError, match="zstd could not decompress"):
        unpack(image, tmp_path / "root")
    assert os.listdir(tmp_path / "root") == []


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd program to make one")
def test_zstd_without_a_decompressor_names_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = build(tmp_path, "oci-dir", [layer([E("f")])], "zstd")

    def no_module(name: str) -> object:
        raise ImportError(name)

    monkeypatch.setattr(oci.importlib, "import_module", no_module)
    monkeypatch.setattr(oci.shutil, "which", lambda name: None)
    with pytest.raises(HostToolMissing, match="apt-get install zstd"):
        unpack(load_image(path), tmp_path / "root")
    assert os.listdir(tmp_path / "root") == []


def test_docker_save_layers_shared_by_a_symlink(tmp_path: Path) -> None:
    """The legacy docker save stores a layer two images share once; the other image's
    ``layer.tar`` is a symlink to it in the archive."""
    shared = layer([E("shared", data=b"s")])
    own = layer([E("own", data=b"o")])
    files = docker_files([([shared], config_doc([shared]), ["a:1"])])
    manifest = json.loads(files["manifest.json"])
    config = config_doc([shared, own])
    files[hashlib.sha256(config).hexdigest() + ".json"] = config
    files["own/layer.tar"] = own
    manifest.append(
        {
            "Config": hashlib.sha256(config).hexdigest() + ".json",
            "RepoTags": ["b:1"],
            "Layers": ["second/layer.tar", "own/layer.tar"],
        }
    )
    files["manifest.json"] = json.dumps(manifest).encode()
    path = write_tree(files, tmp_path / "saved", "docker-tar")
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo("second/layer.tar")
        info.type = tarfile.SYMTYPE
        info.linkname = "../" + manifest[0]["Layers"][0]
        tar.addfile(info)
    root = unpack_into(tmp_path, load_image(path, tag="b:1"))
    assert sorted(os.listdir(root)) == ["own", "shared"]


def test_a_compressed_docker_save_archive(tmp_path: Path) -> None:
    path = build(tmp_path, "docker-tar", three_layers())
    packed = tmp_path / "image.tar.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    root = unpack_into(tmp_path, load_image(packed))
    assert (root / "app/main.py").exists()


def test_a_layer_may_replace_a_symlink_with_a_directory(tmp_path: Path) -> None:
    entries = [
        E("real", "dir"),
        E("a", "sym", target="real"),
        E("a/one", data=b"1"),  # through the symlink: lands in real/
        E("a", "dir"),  # the symlink replaced by a directory
        E("a/two", data=b"2"),
    ]
    root = unpack_into(tmp_path, load_image(build(tmp_path, "oci-dir", [layer(entries)])))
    assert (root / "real/one").read_bytes() == b"1"
    assert not (root / "a").is_symlink() and os.listdir(root / "a") == ["two"]


def test_a_path_is_resolved_again_after_a_change_through_a_symlink(tmp_path: Path) -> None:
    entries = [
        E("a", "dir"),
        E("a/l", "sym", target="."),
        E("a/l/l/l", "dir"),  # a/l/l is a itself: its symlink l becomes a directory
        E("a/l/l/x", data=b"x"),  # now a/l/l is a new directory in a/l
    ]
    root = unpack_into(tmp_path, load_image(build(tmp_path, "oci-dir", [layer(entries)])))
    assert (root / "a/l/l/x").read_bytes() == b"x"
    assert not (root / "a/x").exists()


def test_a_file_replaces_a_directory_of_a_lower_layer(tmp_path: Path) -> None:
    lower = layer([E("x", "dir"), E("x/inner", data=b"i")])
    upper = layer([E("x", data=b"now a file")])
    root = unpack_into(tmp_path, load_image(build(tmp_path, "docker-tar", [lower, upper])))
    assert (root / "x").read_bytes() == b"now a file"


# --------------------------------------------------------------------------- choosing


def test_an_index_of_platforms_gives_linux_amd64(tmp_path: Path) -> None:
    amd = [layer([E("which", data=b"amd64")])]
    arm = [layer([E("which", data=b"arm64")])]
    files = oci_files(
        [
            (arm, config_doc(arm, "arm64"), {"os": "linux", "architecture": "arm64"}),
            (amd, config_doc(amd, "amd64"), {"os": "linux", "architecture": "amd64"}),
        ],
        nested=True,
        ref="example:1",
    )
    image = load_image(write_tree(files, tmp_path / "layout", "oci-tar"))
    assert image.architecture == "amd64" and image.tag == "example:1"
    assert (unpack_into(tmp_path, image) / "which").read_bytes() == b"amd64"


def test_only_other_platforms_is_an_error_naming_them(tmp_path: Path) -> None:
    a = [layer([E("f", data=b"a")])]
    b = [layer([E("f", data=b"b")])]
    files = oci_files([(a, config_doc(a, "arm64"), None), (b, config_doc(b, "s390x"), None)])
    with pytest.raises(TemplateBuildError, match=r"linux/arm64, linux/s390x"):
        load_image(write_tree(files, tmp_path / "layout", "oci-dir"))


def test_the_only_image_is_taken_whatever_its_platform(tmp_path: Path) -> None:
    a = [layer([E("f", data=b"a")])]
    files = oci_files([(a, config_doc(a, "arm64"), None)])
    assert load_image(write_tree(files, tmp_path / "l", "oci-dir")).architecture == "arm64"


def test_tag_chooses_among_the_images_of_docker_save(tmp_path: Path) -> None:
    one = [layer([E("f", data=b"one")])]
    two = [layer([E("f", data=b"two")])]
    files = docker_files(
        [(one, config_doc(one, Cmd=["one"]), ["app:1"]), (two, config_doc(two), ["app:2"])]
    )
    path = write_tree(files, tmp_path / "saved", "docker-tar")
    with pytest.raises(TemplateBuildError, match=r"2 images .*tag=.*app:1, app:2"):
        load_image(path)
    image = load_image(path, tag="app:1")
    assert image.cmd == ("one",) and image.tag == "app:1"
    with pytest.raises(TemplateBuildError, match="no image tagged 'app:3'"):
        load_image(path, tag="app:3")


def test_tag_matches_a_docker_hub_name(tmp_path: Path) -> None:
    one = [layer([E("f", data=b"one")])]
    files = docker_files([(one, config_doc(one), ["docker.io/library/python:3.12-slim"])])
    path = write_tree(files, tmp_path / "saved", "docker-dir")
    assert load_image(path, tag="python:3.12-slim").tag == "docker.io/library/python:3.12-slim"


# --------------------------------------------------------------------------- damaged


def test_a_layer_not_matching_its_digest_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path, "oci-dir", [layer([E("f", data=b"good")])])
    image = load_image(path)
    blob = path / image.layers[0].path
    blob.write_bytes(blob.read_bytes().replace(b"good", b"evil"))
    with pytest.raises(TemplateBuildError, match="does not match its digest"):
        unpack(image, tmp_path / "root")
    assert os.listdir(tmp_path / "root") == []


def test_a_docker_layer_not_matching_its_diff_id_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path, "docker-dir", [layer([E("f", data=b"good")])])
    image = load_image(path)
    blob = path / image.layers[0].path
    blob.write_bytes(blob.read_bytes().replace(b"good", b"evil"))
    with pytest.raises(TemplateBuildError, match=r"uncompressed layer .* does not match"):
        unpack(image, tmp_path / "root")


def test_a_config_not_matching_its_digest_is_refused(tmp_path: Path) -> None:
    layers = [layer([E("f")])]
    config = config_doc(layers)
    path = build(tmp_path, "oci-dir", layers, config=config)
    (path / "blobs/sha256" / sha(config)[7:]).write_bytes(config.replace(b"amd64", b"AMD64"))
    with pytest.raises(TemplateBuildError, match="does not match its digest"):
        load_image(path)


def test_a_missing_blob_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path, "oci-dir", [layer([E("f")])])
    image = load_image(path)
    (path / image.layers[0].path).unlink()
    with pytest.raises(TemplateBuildError, match="is missing"):
        unpack(image, tmp_path / "root")


def test_a_truncated_archive_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path, "docker-tar", [layer([E("f", data=os.urandom(100_000))])], "gzip")
    image = load_image(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 60_000])
    with pytest.raises(TemplateBuildError, match=str(path)):
        unpack(image, tmp_path / "root")
    with pytest.raises(TemplateBuildError):
        load_image(path)


def test_a_truncated_gzip_layer_is_refused(tmp_path: Path) -> None:
    path = build(tmp_path, "docker-dir", [layer([E("f", data=os.urandom(100_000))])], "gzip")
    image = load_image(path)
    blob = path / image.layers[0].path
    blob.write_bytes(blob.read_bytes()[:50_000])
    with pytest.raises(TemplateBuildError, match=image.layers[0].path):
        unpack(image, tmp_path / "root")
    assert os.listdir(tmp_path / "root") == []


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"manifest.json": b"{not json"}, "not valid JSON"),
        ({"manifest.json": b"[" * 100_000 + b"]" * 100_000}, "not valid JSON"),
        ({"manifest.json": b'{"Config": 1}'}, "is not a list"),
        ({"manifest.json": b'[{"Config": "../../etc/passwd", "Layers": []}]'}, "refusing"),
        ({"manifest.json": b" " * (MAX_JSON_BYTES + 1)}, "larger than"),
        ({"index.json": b'{"manifests": [{"digest": "md5:x"}]}'}, "not a sha256"),
        ({"other": b""}, "neither a docker save archive"),
    ],
)
def test_bad_manifests_are_refused(tmp_path: Path, files: dict[str, bytes], match: str) -> None:
    for fmt in ("docker-dir", "docker-tar"):
        path = write_tree(files, tmp_path / fmt, fmt)
        with pytest.raises(TemplateBuildError, match=match) as info:
            load_image(path)
        assert str(path) in str(info.value)


def test_a_file_that_is_no_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.tar"
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(TemplateBuildError, match="not a readable tar"):
        load_image(path)
    with pytest.raises(TemplateBuildError, match="no such file"):
        load_image(tmp_path / "missing.tar")


def test_layer_count_must_match_the_configs_diff_ids(tmp_path: Path) -> None:
    layers = [layer([E("f")])]
    path = build(tmp_path, "oci-dir", layers, config=config_doc([*layers, *layers]))
    with pytest.raises(TemplateBuildError, match="1 layers, the config 2 diff_ids"):
        load_image(path)


def test_the_destination_must_be_empty(tmp_path: Path) -> None:
    image = load_image(build(tmp_path, "oci-dir", [layer([E("f")])]))
    (tmp_path / "root").mkdir()
    (tmp_path / "root/x").write_text("mine")
    with pytest.raises(TemplateBuildError, match="empty directory"):
        unpack(image, tmp_path / "root")
    assert (tmp_path / "root/x").read_text() == "mine"


# --------------------------------------------------------------------------- hostile


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host directory no layer may write in."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "passwd").write_text("host file\n")
    return path


def untouched(outside: Path) -> None:
    assert os.listdir(outside) == ["passwd"]
    assert (outside / "passwd").read_text() == "host file\n"
    assert (outside / "passwd").stat().st_nlink == 1


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/abs", "/../x"])
def test_entries_out_of_the_root_are_refused(tmp_path: Path, name: str) -> None:
    refused(tmp_path, [[E("ok", data=b"1"), E(name, data=b"x")]], "absolute or with")
    assert not (tmp_path / "x").exists() and not Path("/abs").exists()


def test_writes_through_a_symlink_stay_inside(tmp_path: Path, outside: Path) -> None:
    lower = [E("etc", "sym", target=str(outside)), E("up", "sym", target="../../../..")]
    upper = [
        E("etc/f", data=b"through the absolute link"),
        E("etc/passwd", data=b"overwritten?"),
        E("up/g", data=b"through the relative link"),
        E("up/etc/h", data=b"two links"),
    ]
    root = unpack_into(
        tmp_path, load_image(build(tmp_path, "oci-tar", [layer(lower), layer(upper)]))
    )
    untouched(outside)
    inside = root / str(outside).lstrip("/")
    assert (inside / "f").read_bytes() == b"through the absolute link"  # as in a chroot
    assert (inside / "passwd").read_bytes() == b"overwritten?"
    assert (inside / "h").read_bytes() == b"two links"
    assert (root / "g").read_bytes() == b"through the relative link"  # .. stops at the root


def test_a_symlink_loop_is_refused(tmp_path: Path) -> None:
    refused(
        tmp_path,
        [[E("a", "sym", target="b"), E("b", "sym", target="a"), E("a/f", data=b"x")]],
        "too many levels of symlinks",
    )


def test_a_path_through_a_file_is_refused(tmp_path: Path) -> None:
    refused(tmp_path, [[E("f", data=b"x"), E("f/g", data=b"y")]], "goes through a file")


def test_the_last_component_is_replaced_not_followed(tmp_path: Path, outside: Path) -> None:
    entries = [
        E("passwd", "sym", target=str(outside / "passwd")),
        E("passwd", data=b"replaces the link"),
        E("dir", "sym", target=str(outside)),
        E("dir", "dir"),
    ]
    root = unpack_into(tmp_path, load_image(build(tmp_path, "oci-dir", [layer(entries)])))
    untouched(outside)
    assert (root / "passwd").read_bytes() == b"replaces the link"
    assert (root / "dir").is_dir() and not (root / "dir").is_symlink()


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([E("h", "link", target="../outside/passwd")], "absolute or with"),
        ([E("h", "link", target="/etc/passwd")], "absolute or with"),
        ([E("h", "link", target="etc/passwd")], "missing"),  # not in the root
        ([E("l", "sym", target="/etc"), E("h", "link", target="l/passwd")], "missing"),
        ([E("d", "dir"), E("h", "link", target="d")], "names a directory"),
    ],
)
def test_hard_links_out_of_the_root_are_refused(
    tmp_path: Path, outside: Path, entries: list[E], match: str
) -> None:
    refused(tmp_path, [entries], match)
    untouched(outside)


def test_a_whiteout_cannot_reach_out(tmp_path: Path, outside: Path) -> None:
    lower = [E("etc", "sym", target=str(outside)), E("keep", data=b"k")]
    upper = [E("etc/.wh.passwd"), E("etc/.wh..wh..opq"), E("nothere/.wh.x")]
    path = build(tmp_path, "oci-dir", [layer(lower), layer(upper)])
    root = unpack_into(tmp_path, load_image(path))
    untouched(outside)
    assert (root / "keep").exists() and (root / "etc").is_symlink()


def test_a_whiteout_of_dot_or_dotdot_is_refused(tmp_path: Path, outside: Path) -> None:
    refused(tmp_path, [[E("keep", data=b"k")], [E(".wh..")]], "refusing the whiteout")
    untouched(outside)


def test_more_bytes_than_the_limit_are_refused(tmp_path: Path) -> None:
    entries = [E("a", data=b"x" * 600), E("b", data=b"x" * 600)]
    refused(tmp_path, [entries], "larger than 1000", max_bytes=1000)


def test_more_entries_than_the_limit_are_refused(tmp_path: Path) -> None:
    refused(tmp_path, [[E(f"f{i}") for i in range(11)]], "more than 10 entries", max_entries=10)


def test_an_oversized_tar_header_is_refused(tmp_path: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"comment": "x" * (MAX_TAR_HEADER + 1)}
        tar.addfile(info, io.BytesIO(b""))
    path = build(tmp_path, "oci-dir", [out.getvalue()])
    with pytest.raises(TemplateBuildError, match="tar header extension"):
        unpack(load_image(path), tmp_path / "root")


@pytest.mark.parametrize(
    "headers",
    [
        {"GNU.sparse.map": "0,1"},  # 0.1
        {"GNU.sparse.size": "1", "GNU.sparse.offset": "0", "GNU.sparse.numbytes": "1"},  # 0.0
        {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"},  # 1.0
    ],
)
def test_sparse_files_are_refused(tmp_path: Path, headers: dict[str, str]) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("sparse")
        info.pax_headers = headers
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    path = build(tmp_path, "oci-dir", [out.getvalue()])
    with pytest.raises(TemplateBuildError, match="sparse file"):
        unpack(load_image(path), tmp_path / "root")


def test_a_zip_bomb_is_stopped_by_the_limit(tmp_path: Path) -> None:
    # one small file, then a long run of zeros past the tar's end
    bomb = layer([E("f", data=b"x")]) + bytes(50 * 1024 * 1024)
    path = build(tmp_path, "oci-dir", [bomb], "gzip")
    assert sum(p.stat().st_size for p in (path / "blobs/sha256").iterdir()) < 1024 * 1024
    with pytest.raises(TemplateBuildError, match="longer than"):
        unpack(load_image(path), tmp_path / "root", max_bytes=1000, max_entries=100)


# --------------------------------------------------------------------------- python


def test_python_in_rootfs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert python_in_rootfs(root) is None
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3").write_text("not executable")
    assert python_in_rootfs(root) is None
    os.chmod(root / "usr/bin/python3", 0o755)
    assert python_in_rootfs(root) == "/usr/bin/python3"
    (root / "usr/local/bin").mkdir(parents=True)
    os.symlink("/usr/bin/python3", root / "usr/local/bin/python3")  # absolute, inside
    assert python_in_rootfs(root) == "/usr/local/bin/python3"
    assert python_in_rootfs(root, "/usr/bin") == "/usr/bin/python3"
    (root / "bin").mkdir()
    os.symlink("/usr/bin/../../../../../../usr/bin/env", root / "bin/python3")
    assert python_in_rootfs(root, "/bin") is None  # resolves inside the root: missing
    os.symlink("..", root / "opt")
    assert python_in_rootfs(root, "/opt") is None
