"""The template cache as a whole: its size per kind, what is in use, what prune removes
(a fake cache laid out in a temporary directory; nothing is built or booted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from novasandbox.errors import TemplateError
from novasandbox.templates import (
    MAX_CHAIN,
    TemplateManager,
    backing_chain,
    disk_usage,
    paths_held_by_processes,
    qcow2_backing,
)

SIZE = 256 * 1024
CUSTOM_TOML = """\
name = "custom"
[image]
packages = ["python3", "curl"]
"""


@pytest.fixture(autouse=True)
def _no_env_template_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOVASANDBOX_TEMPLATE_PATH", raising=False)


def blob(path: Path, size: int = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


class Cache:
    """A fake cache: the built-in ``python`` and a user template ``custom`` built (each
    kernel, base, image and snapshot a blob), plus entries nothing uses and files that
    are not entries."""

    def __init__(self, tmp_path: Path) -> None:
        self.user_dir = tmp_path / "user"
        self.user_dir.mkdir()
        (self.user_dir / "custom.toml").write_text(CUSTOM_TOML)
        self.manager = TemplateManager(cache=tmp_path / "cache", template_dirs=[self.user_dir])
        m = self.manager
        self.wanted: list[Path] = []
        for name in ("python", "custom"):
            tpl = m.get(name)
            blob(m.kernel_path(tpl))
            blob(m.base_path(tpl))
            blob(m.image_dir(tpl) / "rootfs.ext4")
            (m.image_dir(tpl) / "manifest.json").write_text("{}")
            blob(m.image_dir(tpl) / "snapshots" / "k1" / "memory.bin")
            self.wanted += [m.kernel_path(tpl).parent, m.base_path(tpl), m.image_dir(tpl)]
        root = m.cache
        self.unused = {
            root / "kernels" / ("a" * 16): "kernel",
            root / "bases" / ("b" * 16 + ".tar"): "base",
            root / "templates" / "python" / ("c" * 16): "image",  # superseded
            root / "templates" / "gone" / ("d" * 16): "image",  # not defined
        }
        for path, kind in self.unused.items():
            blob(path / "vmlinux" if kind == "kernel" else path / "rootfs.ext4")
            if kind == "base":
                (path / "rootfs.ext4").unlink()
                path.rmdir()
                blob(path)
        (root / "templates" / "gone" / ("d" * 16) / "rootfs.ext4").chmod(0o444)
        self.junk = [
            blob(root / "bases" / ("e" * 16 + ".partial.tar")),
            blob(root / "templates" / "python" / ".build-x" / "root" / "f"),
            blob(root / "kernels" / "not-a-digest" / "vmlinux"),
        ]


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path)


def test_prune_plan_lists_what_no_defined_template_keeps(cache: Cache) -> None:
    plan = cache.manager.prune_plan()
    assert {e.path: e.kind for e in plan.remove} == cache.unused
    assert plan.keep == ()
    reasons = {e.path.name: e.reason for e in plan.remove}
    assert reasons["c" * 16] == "superseded: 'python' has changed"
    assert reasons["d" * 16] == "template 'gone' is not defined"
    assert reasons["a" * 16] == "no built template uses it"
    assert all(e.size_bytes >= SIZE for e in plan.remove)
    assert plan.size_bytes == sum(e.size_bytes for e in plan.remove)
    # a plan changes nothing
    assert all(p.exists() for p in [*cache.unused, *cache.wanted, *cache.junk])


def test_prune_removes_the_plan_and_frees_its_bytes(cache: Cache) -> None:
    m = cache.manager
    before = m.cache_usage()["total"]
    plan = m.prune_plan()
    freed = m.prune(plan)
    assert freed == plan.size_bytes
    assert not any(p.exists() for p in cache.unused)
    assert not (m.cache / "templates" / "gone").exists()  # left empty: removed
    assert all(p.exists() for p in [*cache.wanted, *cache.junk])
    assert m.cache_usage()["total"] <= before - freed  # (and the empty folder)
    assert m.prune_plan().remove == ()
    assert m.built("python") is not None and m.built("custom") is not None
    assert m.prune(plan) == 0  # gone already: skipped


def test_what_is_in_use_is_kept(cache: Cache) -> None:
    gone = cache.manager.cache / "templates" / "gone" / ("d" * 16)
    kernel = cache.manager.cache / "kernels" / ("a" * 16)
    plan = cache.manager.prune_plan([gone / "rootfs.ext4", kernel, Path("/elsewhere")])
    assert {e.path for e in plan.keep} == {gone, kernel}
    assert {e.reason for e in plan.keep} == {
        f"in use: {gone / 'rootfs.ext4'}",
        f"in use: {kernel}",
    }
    assert {e.path for e in plan.remove} == set(cache.unused) - {gone, kernel}


def test_template_rm_lets_its_base_go_but_not_a_kernel_another_template_has(
    cache: Cache,
) -> None:
    m = cache.manager
    custom, python = m.get("custom"), m.get("python")
    assert custom.kernel_digest == python.kernel_digest
    assert custom.base_digest != python.base_digest
    assert m.remove("custom")
    plan = m.prune_plan()
    assert {e.path for e in plan.remove} == set(cache.unused) | {m.base_path(custom)}


def test_a_running_build_keeps_the_kernel_and_base_of_every_defined_template(
    cache: Cache,
) -> None:
    m = cache.manager
    custom = m.get("custom")
    assert m.remove("custom")
    partial = m.cache / "bases" / ("e" * 16 + ".partial.tar")  # mmdebstrap writing
    plan = m.prune_plan([partial])
    assert m.base_path(custom) not in {e.path for e in plan.remove}
    assert {e.path for e in plan.remove} == set(cache.unused)


def test_an_unreadable_definition_stops_prune(cache: Cache) -> None:
    (cache.user_dir / "broken.toml").write_text("name = [")
    with pytest.raises(TemplateError):
        cache.manager.prune_plan()
    assert all(p.exists() for p in cache.unused)


def test_prune_refuses_a_path_outside_the_cache(cache: Cache, tmp_path: Path) -> None:
    from novasandbox.templates import CacheEntry, PrunePlan

    outside = blob(tmp_path / "precious")
    plan = PrunePlan((CacheEntry("base", outside, 1),), ())
    with pytest.raises(TemplateError, match="not in the cache"):
        cache.manager.prune(plan)
    assert outside.exists()


def test_cache_usage_per_kind(cache: Cache) -> None:
    usage = cache.manager.cache_usage()
    assert set(usage) == {"kernels", "bases", "templates", "layers", "snapshots", "other", "total"}
    assert usage["total"] == sum(v for k, v in usage.items() if k != "total")
    assert usage["total"] == disk_usage(cache.manager.cache)
    assert usage["snapshots"] >= 2 * SIZE  # one per template, counted apart from images
    assert usage["kernels"] >= 3 * SIZE  # python's (custom's is the same), unused, junk
    assert usage["bases"] >= 4 * SIZE


def test_disk_usage_counts_hard_links_once(tmp_path: Path) -> None:
    a = blob(tmp_path / "d" / "a")
    os.link(a, tmp_path / "d" / "b")
    (tmp_path / "d" / "c").symlink_to("/usr")  # not followed
    one = disk_usage(a)
    assert one >= SIZE
    assert one <= disk_usage(tmp_path / "d") < 2 * one


def qcow2_header(backing: bytes, *, magic: bytes = b"QFI\xfb", size: int | None = None) -> bytes:
    offset = 104
    header = bytearray(offset)
    header[:4] = magic
    header[4:8] = (3).to_bytes(4, "big")
    header[8:16] = (offset if backing else 0).to_bytes(8, "big")
    header[16:20] = (len(backing) if size is None else size).to_bytes(4, "big")
    return bytes(header) + backing


def test_qcow2_backing_reads_the_header(tmp_path: Path) -> None:
    image = tmp_path / "sub" / "top.qcow2"
    image.parent.mkdir()
    image.write_bytes(qcow2_header(b"/abs/base.ext4"))
    assert qcow2_backing(image) == Path("/abs/base.ext4")
    image.write_bytes(qcow2_header(b"rel.qcow2"))
    assert qcow2_backing(image) == tmp_path / "sub" / "rel.qcow2"
    for data in (
        qcow2_header(b""),  # no backing file
        qcow2_header(b"/x", magic=b"RAW!"),
        qcow2_header(b"/x", size=1 << 30),  # a hostile size: not read
        qcow2_header(b"json:{}"),
        b"QFI",
    ):
        image.write_bytes(data)
        assert qcow2_backing(image) is None
    assert qcow2_backing(tmp_path / "missing") is None


def test_qcow2_backing_agrees_with_qemu_img(tmp_path: Path) -> None:
    base = blob(tmp_path / "base.ext4", 1 << 20)
    top = tmp_path / "top.qcow2"
    done = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(top)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert backing_chain(top) == [top, base]


def test_backing_chain_follows_and_stops_at_loops(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in ("a.qcow2", "b.qcow2", "c.raw"))
    a.write_bytes(qcow2_header(b"b.qcow2"))
    b.write_bytes(qcow2_header(b"c.raw"))
    blob(c, 512)
    assert backing_chain(a) == [a, b, c]
    b.write_bytes(qcow2_header(b"a.qcow2"))
    assert backing_chain(a) == [a, b]
    for i in range(MAX_CHAIN + 5):
        (tmp_path / f"l{i}").write_bytes(qcow2_header(f"l{i + 1}".encode()))
    assert len(backing_chain(tmp_path / "l0")) == MAX_CHAIN


def test_paths_held_by_processes(tmp_path: Path) -> None:
    held = blob(tmp_path / "cache" / "bases" / "x.tar")
    workdir = tmp_path / "cache" / "kernels" / "k" / "kbuild"
    workdir.mkdir(parents=True)
    arg = tmp_path / "cache" / "kernels" / "k2" / "vmlinux"
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", f"-kernel={arg}"],
        cwd=workdir,
        stdin=subprocess.PIPE,
    )
    try:
        with held.open("rb"):
            found = paths_held_by_processes(tmp_path / "cache")
    finally:
        child.communicate(b"")
    assert {held, workdir, arg} <= found
    assert all(tmp_path / "cache" in p.parents for p in found)
    assert paths_held_by_processes(tmp_path / "cache") == set()
