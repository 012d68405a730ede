"""The shape snapshot store without VMs: its key, its bound, what is left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from novasandbox import ConfigError, TemplateManager, warmup
from novasandbox.snapshots import shape_snapshot_key
from novasandbox.templates import STALE_PARTIAL_S


def entry(base: Path, name: str, age: float) -> Path:
    path = base / name
    path.mkdir(parents=True)
    (path / "manifest.json").write_text("{}")
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def test_the_key_covers_every_input() -> None:
    args = ["img", "kern", "1:2", "QEMU 7.2", "tcg", 1, 512, "none"]
    keys = {shape_snapshot_key(*args)}  # type: ignore[arg-type]
    for i, other in enumerate(["img2", "kern2", "1:3", "QEMU 8", "kvm", 2, 513, "nat"]):
        changed = list(args)
        changed[i] = other
        keys.add(shape_snapshot_key(*changed))  # type: ignore[arg-type]
    assert len(keys) == 9


def test_eviction_keeps_the_most_recently_used(tmp_path: Path) -> None:
    mgr = TemplateManager(cache=tmp_path, shape_snapshots=2)
    tpl = mgr.get("python")
    base = mgr.shapes_dir(tpl)
    old, middle, recent = (entry(base, n, age) for n, age in (("a", 300), ("b", 200), ("c", 100)))
    new = entry(base, "d", 0)
    assert mgr.evict_shape_snapshots(tpl, keep=new) == (middle, old)
    assert sorted(p.name for p in base.iterdir()) == ["c", "d"]
    assert recent.is_dir()


def test_eviction_never_removes_the_one_just_saved_and_sweeps_dead_partials(
    tmp_path: Path,
) -> None:
    mgr = TemplateManager(cache=tmp_path, shape_snapshots=1)
    tpl = mgr.get("python")
    base = mgr.shapes_dir(tpl)
    kept = entry(base, "k", 10_000)  # older than the others, but just saved
    entry(base, "x", 0)
    entry(base, ".x.partial-dead", STALE_PARTIAL_S + 60)
    entry(base, ".y.partial-busy", 1)  # another process is writing it
    mgr.evict_shape_snapshots(tpl, keep=kept)
    assert sorted(p.name for p in base.iterdir()) == [".y.partial-busy", "k"]


def test_eviction_of_a_missing_directory_is_a_no_op(tmp_path: Path) -> None:
    mgr = TemplateManager(cache=tmp_path)
    assert mgr.evict_shape_snapshots(mgr.get("python")) == ()


@pytest.mark.parametrize("value", [-1, 65, True, 2.0, "4", None])
def test_shape_snapshots_is_validated(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError):
        TemplateManager(cache=tmp_path, shape_snapshots=value)  # type: ignore[arg-type]


def test_remove_takes_the_shapes_along(tmp_path: Path) -> None:
    mgr = TemplateManager(cache=tmp_path)
    tpl = mgr.get("python")
    entry(mgr.shapes_dir(tpl), "a", 0)
    assert mgr.remove("python")
    assert not mgr.shapes_dir(tpl).exists()


def test_remaking_the_templates_snapshots_removes_the_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mgr = TemplateManager(cache=tmp_path)
    tpl = mgr.get("python")
    mgr.kernel_path(tpl).parent.mkdir(parents=True)
    mgr.kernel_path(tpl).write_bytes(b"kernel")
    mgr.image_dir(tpl).mkdir(parents=True)
    (mgr.image_dir(tpl) / "rootfs.ext4").write_bytes(b"image")
    (mgr.image_dir(tpl) / "manifest.json").write_text("{}")
    entry(mgr.shapes_dir(tpl), "a", 0)
    made: list[bool] = []

    def fake_snapshot(
        manager: TemplateManager, built: Any, *, nic: bool = False, provider: Any = None
    ) -> Any:
        made.append(nic)
        return SimpleNamespace(size_bytes=1, save_seconds=0.1)

    monkeypatch.setattr(warmup, "build_snapshot", fake_snapshot)
    warmup.build(mgr, "python")
    assert made == [False, True]
    assert not mgr.shapes_dir(tpl).exists()
