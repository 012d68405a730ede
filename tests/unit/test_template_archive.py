"""``templates/archive.py``: a built template exported into one file and imported, and
the archives import refuses (damaged, hostile, from another engine, in conflict) with
nothing written. The built template is a stand-in (small files, a real qcow2 snapshot
disk made by qemu-img), so no VM runs here; tests/integration/test_template_move.py
restores real ones."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from novasandbox.errors import (
    TemplateArchiveConflict,
    TemplateArchiveError,
    TemplateArchiveIncompatible,
)
from novasandbox.snapshots import Engine, template_snapshot, template_snapshot_key
from novasandbox.templates import TemplateManager, qcow2_backing
from novasandbox.templates.archive import ARCHIVE_MANIFEST, export_archive, import_archive

ENGINE = Engine("tcg", "QEMU emulator version 0.0 (test)")
ROOTFS = b"\0" * (3 << 20) + b"root file system" + b"\0" * (1 << 20)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")


def fake_built(cache: Path, engine: Engine = ENGINE, rootfs: bytes = ROOTFS) -> TemplateManager:
    """A cache in which "python" looks built, with one template snapshot."""
    manager = TemplateManager(cache)
    tpl = manager.get("python")
    kernel = manager.kernel_path(tpl)
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(b"a kernel")
    image = manager.image_dir(tpl)
    image.mkdir(parents=True)
    (image / "rootfs.ext4").write_bytes(rootfs)
    (image / "rootfs.ext4").chmod(0o444)
    (image / "manifest.json").write_text(json.dumps({"image_digest": tpl.image_digest}))
    key = template_snapshot_key(
        tpl.image_digest, tpl.kernel_digest, engine.version, engine.accel, 1, 256
    )
    snap = image / "snapshots" / key
    snap.mkdir(parents=True)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "../../rootfs.ext4"]
    subprocess.run([*argv, str(snap / "disk.qcow2")], check=True)
    (snap / "memory.bin").write_bytes(b"memory" * 1000)
    (snap / "manifest.json").write_text(
        json.dumps(
            {
                "id": f"template-python-{key}",
                "kind": "template",
                "template": "python",
                "directory": ".",
                "kernel": os.path.relpath(kernel, snap),
                "vcpus": tpl.vcpus,
                "memory_mib": tpl.memory_mib,
                "accel": engine.accel,
                "qemu_version": engine.version,
                "created_at": 1.0,
                "backing": "../../rootfs.ext4",
                "frozen": False,
                "network": "none",
            }
        )
    )
    assert manager.built("python") is not None
    return manager


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def assert_untouched(cache: Path, before: dict[str, bytes] | None = None) -> None:
    assert tree(cache) == (before or {})
    assert [p.name for p in cache.iterdir() if p.name.startswith(".import")] == []


@pytest.fixture
def source(tmp_path: Path) -> TemplateManager:
    return fake_built(tmp_path / "source")


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.zst"])
def test_export_then_import_into_an_empty_cache(
    source: TemplateManager, tmp_path: Path, suffix: str
) -> None:
    if suffix == ".tar.zst" and shutil.which("zstd") is None:
        pytest.skip("no zstd")
    archive = tmp_path / f"python{suffix}"
    done = export_archive(source, "python", archive)
    assert done.snapshots == 1 and done.files == 7 and archive.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    dest = TemplateManager(tmp_path / "dest")
    result = import_archive(dest, archive, engine=ENGINE)
    assert result.snapshots == 1 and result.definitions == ()  # python is built in
    expected = {k: v for k, v in tree(source.cache).items()}
    assert tree(dest.cache) == expected
    built = dest.built("python")
    assert built is not None
    rootfs = built.rootfs
    assert rootfs.stat().st_blocks * 512 < len(ROOTFS)  # written sparse
    assert oct(rootfs.stat().st_mode & 0o777) == oct(0o444)
    snap = template_snapshot(dest, built, 1, 256, ENGINE)
    assert snap is not None and snap.kernel == dest.kernel_path(built.template)
    assert qcow2_backing(snap.disk) == snap.disk.parent / "../../rootfs.ext4"
    assert snap.backing == str(rootfs)
    # again: everything is here already, and the same
    again = import_archive(dest, archive, engine=ENGINE)
    assert again.written == ()
    assert tree(dest.cache) == expected


def test_a_flipped_byte_is_refused_and_nothing_written(
    source: TemplateManager, tmp_path: Path
) -> None:
    archive = tmp_path / "python.tar"
    export_archive(source, "python", archive)
    data = bytearray(archive.read_bytes())
    at = data.index(b"root file system")
    data[at] ^= 0x01
    archive.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    with pytest.raises(TemplateArchiveError, match="does not match its sha256") as info:
        import_archive(TemplateManager(dest), archive, engine=ENGINE)
    assert info.value.code == "template-archive-invalid"
    assert_untouched(dest)


def test_a_truncated_archive_is_refused(source: TemplateManager, tmp_path: Path) -> None:
    archive = tmp_path / "python.tar.gz"
    export_archive(source, "python", archive)
    archive.write_bytes(archive.read_bytes()[:-2000])
    dest = tmp_path / "dest"
    with pytest.raises(TemplateArchiveError):
        import_archive(TemplateManager(dest), archive, engine=ENGINE)
    assert_untouched(dest)


def test_another_engine_is_refused_or_imported_without_snapshots(
    source: TemplateManager, tmp_path: Path
) -> None:
    archive = tmp_path / "python.tar"
    export_archive(source, "python", archive)
    dest = TemplateManager(tmp_path / "dest")
    other = Engine("kvm", ENGINE.version)
    with pytest.raises(TemplateArchiveIncompatible, match="--no-snapshots") as info:
        import_archive(dest, archive, engine=other)
    assert info.value.code == "template-archive-incompatible"
    assert_untouched(dest.cache)
    result = import_archive(dest, archive, engine=other, snapshots=False)
    assert result.snapshots == 0
    built = dest.built("python")
    assert built is not None
    assert not (dest.image_dir(built.template) / "snapshots").exists()


def test_other_bytes_here_are_a_conflict_unless_forced(
    source: TemplateManager, tmp_path: Path
) -> None:
    archive = tmp_path / "python.tar"
    export_archive(source, "python", archive)
    other_engine = Engine("tcg", "QEMU emulator version 9.9 (local)")
    dest = fake_built(tmp_path / "dest", other_engine, rootfs=b"another build" + ROOTFS)
    before = tree(dest.cache)
    with pytest.raises(TemplateArchiveConflict, match=r"rootfs\.ext4") as info:
        import_archive(dest, archive, engine=ENGINE)
    assert info.value.code == "template-archive-conflict"
    assert_untouched(dest.cache, before)
    result = import_archive(dest, archive, engine=ENGINE, force=True)
    built = dest.built("python")
    assert built is not None and built.rootfs.read_bytes() == ROOTFS
    # the local snapshot was made over the replaced image: it went
    assert len(result.removed) == 1
    assert tree(dest.cache) == tree(source.cache)


def test_a_definition_that_differs_is_a_conflict(source: TemplateManager, tmp_path: Path) -> None:
    archive = tmp_path / "python.tar"
    export_archive(source, "python", archive)
    dest = TemplateManager(tmp_path / "dest")
    text = source.get("python").to_toml().replace('name = "python"', 'name = "python"\n')
    dest.definitions_dir.mkdir(parents=True)
    (dest.definitions_dir / "python.toml").write_text(
        text.replace("[machine]", "[machine]\nvcpus = 2")
        if "[machine]" in text
        else text + "\n[machine]\nvcpus = 2\n"
    )
    before = tree(dest.cache)
    with pytest.raises(TemplateArchiveConflict, match=r"definitions/python\.toml"):
        import_archive(dest, archive, engine=ENGINE)
    assert_untouched(dest.cache, before)
    result = import_archive(dest, archive, engine=ENGINE, force=True)
    assert result.definitions == ("python",)
    assert dest.get("python").vcpus == source.get("python").vcpus


# --------------------------------------------------------------------------- hostile


def read_archive(path: Path) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    head = json.loads(members[0][1])
    return head, members[1:]


def write_archive(
    path: Path,
    head: dict[str, Any],
    members: list[tuple[str, bytes]],
    *,
    fix_digests: bool = True,
    extra: list[tarfile.TarInfo] = (),  # type: ignore[assignment]
) -> None:
    if fix_digests:
        listed = {f["path"]: f for f in head["files"]}
        for name, data in members:
            if name in listed:
                listed[name]["sha256"] = hashlib.sha256(data).hexdigest()
                listed[name]["size"] = len(data)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        raw = json.dumps(head).encode()
        info = tarfile.TarInfo(ARCHIVE_MANIFEST)
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)


@pytest.fixture
def parts(
    source: TemplateManager, tmp_path: Path
) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    archive = tmp_path / "good.tar"
    export_archive(source, "python", archive)
    return read_archive(archive)


def refused(
    tmp_path: Path, head: dict[str, Any], members: list[tuple[str, bytes]], **kw: Any
) -> str:
    path = tmp_path / "bad.tar"
    write_archive(path, head, members, **kw)
    dest = tmp_path / "hostile-dest"
    with pytest.raises(TemplateArchiveError) as info:
        import_archive(TemplateManager(dest), path, engine=ENGINE)
    assert_untouched(dest)
    return info.value.message


@pytest.mark.parametrize("bad", ["../evil", "/etc/evil", "kernels/../../evil", "kernels/.x/y", "a"])
def test_paths_out_of_the_cache_are_refused(
    parts: tuple[dict[str, Any], list[tuple[str, bytes]]], tmp_path: Path, bad: str
) -> None:
    head, members = parts
    head["files"].append({"path": bad, "size": 4, "sha256": "0" * 64, "mode": 0o644})
    members.append((bad, b"evil"))
    assert "refusing the path" in refused(tmp_path, head, members)
    assert not (tmp_path / "evil").exists()


def test_a_file_no_built_template_has_is_refused(
    parts: tuple[dict[str, Any], list[tuple[str, bytes]]], tmp_path: Path
) -> None:
    head, members = parts
    name = "templates/other/0123456789abcdef/rootfs.ext4"
    head["files"].append({"path": name, "size": 1, "sha256": "0" * 64, "mode": 0o644})
    members.append((name, b"x"))
    assert "is not a file of a built" in refused(tmp_path, head, members)


def test_links_and_unlisted_entries_are_refused(
    parts: tuple[dict[str, Any], list[tuple[str, bytes]]], tmp_path: Path
) -> None:
    head, members = parts
    link = tarfile.TarInfo("definitions/evil")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    assert "not a plain file" in refused(tmp_path, head, members, extra=[link])
    assert "more than its manifest lists" in refused(
        tmp_path, head, [*members, ("kernels/x", b"x")]
    )


def test_entries_out_of_order_or_missing_are_refused(
    parts: tuple[dict[str, Any], list[tuple[str, bytes]]], tmp_path: Path
) -> None:
    head, members = parts
    assert "should be" in refused(tmp_path, head, members[::-1])
    assert "ends before" in refused(tmp_path, head, members[:-1])


def test_sizes_and_counts_are_bounded(
    parts: tuple[dict[str, Any], list[tuple[str, bytes]]], tmp_path: Path
) -> None:
    head, members = parts
    head["files"][1]["size"] = 1 << 50
    assert "invalid size" in refused(tmp_path, head, members, fix_digests=False)
    head, members = parts
    head["files"] = head["files"] * 1000
    assert "files: must be a list" in refused(tmp_path, head, members, fix_digests=False)


def test_a_snapshot_disk_naming_a_host_file_is_refused(
    parts: tuple[dict[str, Any], list[tuple[str, bytes]]], tmp_path: Path
) -> None:
    head, members = parts
    disk_at = next(i for i, (n, _) in enumerate(members) if n.endswith("disk.qcow2"))
    qcow = tmp_path / "evil.qcow2"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd"]
    subprocess.run([*argv, "-o", "size=1M", str(qcow)], check=True)
    members[disk_at] = (members[disk_at][0], qcow.read_bytes())
    assert "relatively" in refused(tmp_path, head, members)


def test_a_definition_with_other_digests_is_incompatible(
    parts: tuple[dict[str, Any], list[tuple[str, bytes]]], tmp_path: Path
) -> None:
    head, members = parts
    head["templates"][0]["image_digest"] = "f" * 16
    path = tmp_path / "other.tar"
    write_archive(path, head, members)
    dest = tmp_path / "dest"
    with pytest.raises(TemplateArchiveIncompatible, match="another version"):
        import_archive(TemplateManager(dest), path, engine=ENGINE)
    assert_untouched(dest)


def test_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "junk.tar"
    path.write_bytes(b"junk" * 1000)
    with pytest.raises(TemplateArchiveError):
        import_archive(TemplateManager(tmp_path / "dest"), path, engine=ENGINE)
    assert_untouched(tmp_path / "dest")
