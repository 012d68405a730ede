"""Machine shapes other than the template's own (vCPUs, memory, network device): the first
create of a shape boots cold and saves a snapshot of the just-booted guest; later creates
of it restore that. Each test works in a private copy of the template cache, so it starts
with no shape saved and ``template rm`` there touches nothing shared."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novasandbox import Drive, Sandbox, TemplateManager
from novasandbox.errors import ProviderError
from novasandbox.sandbox import AsyncSandbox
from novasandbox.snapshots import shape_snapshot_dir
from novasandbox.vm import get_provider
from novasandbox.vm.qemu import QemuVM

from .conftest import SandboxFactory

pytestmark = pytest.mark.integration

PROBE = (
    "hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
    "echo ${LEAK-unset}; awk '/MemTotal/ {print $2}' /proc/meminfo"
)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A template cache with the built "python" image (no snapshots of any kind)."""
    shared = TemplateManager()
    tpl = shared.get("python")
    built = shared.built(tpl)
    assert built is not None
    root = tmp_path / "cache"
    image_dir = TemplateManager(cache=root).image_dir(tpl)
    image_dir.mkdir(parents=True)
    kernel = root / built.kernel.relative_to(shared.cache)
    kernel.parent.mkdir(parents=True)
    try:
        os.link(built.kernel, kernel)
    except OSError:  # another file system (/tmp as tmpfs)
        shutil.copyfile(built.kernel, kernel)
    shutil.copy(shared.image_dir(tpl) / "manifest.json", image_dir)
    # a copy, not a link: ``template rm`` changes the image's mode before removing it
    subprocess.run(
        ["cp", "--sparse=always", str(built.rootfs), str(image_dir / "rootfs.ext4")], check=True
    )
    return root


def manager(cache: Path, **kwargs: Any) -> TemplateManager:
    return TemplateManager(cache=cache, **kwargs)


def saved_shapes(mgr: TemplateManager) -> list[str]:
    """Every entry of the shapes directory (half-written ones included)."""
    base = mgr.shapes_dir(mgr.get("python"))
    return sorted(p.name for p in base.iterdir()) if base.exists() else []


def shape_dir(mgr: TemplateManager, memory_mib: int, network: str = "none") -> Path:
    built = mgr.require_built("python")
    return shape_snapshot_dir(mgr, built, 1, memory_mib, get_provider().engine(), network)


def probe(sb: Sandbox) -> list[str]:
    return sb.commands.run(PROBE, check=True).stdout.split()


def test_first_create_saves_the_shape_and_the_next_restores_it(
    factory: SandboxFactory, cache: Path
) -> None:
    mgr = manager(cache)
    first = factory.create(memory_mib=320, env={"LEAK": "first"}, templates=mgr)
    assert not first.restored
    assert first.cold_reason is not None
    assert "no snapshot of python for vcpus=1 memory_mib=320 network=none yet" in (
        first.cold_reason
    )
    assert "shape_saved" in first.timings
    assert saved_shapes(mgr) == [shape_dir(mgr, 320).name]
    # the sandbox that saved it is unaffected: its env, its files, its identity
    out_first = probe(first)
    assert out_first[0] == first.id and out_first[2] == "first"
    first.files.write("/home/user/only-in-first", "x")

    second = factory.create(memory_mib=320, templates=mgr)
    assert second.restored and second.cold_reason is None
    assert second.source_snapshot is not None
    assert second.source_snapshot.directory == shape_dir(mgr, 320)
    assert second.source_snapshot.env == {}
    out_second = probe(second)
    assert out_second[0] == second.id
    assert out_second[1] != out_first[1], "the restored guest shares the first one's RNG"
    assert out_second[2] == "unset", "the first create's env leaked into the snapshot"
    assert 256 * 1024 < int(out_second[3]) <= 320 * 1024  # the shape's memory
    assert not second.files.exists("/home/user/only-in-first")
    second.files.write("/home/user/written", "ok")  # its root file system was thawed
    assert second.commands.run("cat /home/user/written").stdout == "ok"

    # `novasandbox ls` tells which was restored and why the other booted cold
    cli = [sys.executable, "-m", "novasandbox.cli", "ls"]
    listed = json.loads(subprocess.run([*cli, "--json"], capture_output=True).stdout)
    infos = {i["id"]: i for i in listed}
    assert infos[second.id]["restored"] is True
    assert infos[second.id]["source_snapshot"] == second.source_snapshot.id
    assert infos[first.id]["restored"] is False
    assert infos[first.id]["cold_reason"] == first.cold_reason
    table = subprocess.run(
        cli, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    ).stdout
    rows = {line.split()[1]: line for line in table.splitlines() if "sb-" in line}
    assert "restored" in rows[second.id] and "cold" in rows[first.id]


def test_the_first_sandboxs_lifetime_is_not_in_the_snapshot(
    factory: SandboxFactory, cache: Path
) -> None:
    mgr = manager(cache)
    # the guest armed an 8 s lifetime before it was saved (the first create must end
    # within it: a cold boot takes 2-3 s here)
    first = factory.create(memory_mib=320, timeout=8, templates=mgr)
    assert not first.restored
    second = factory.create(memory_mib=320, timeout=None, templates=mgr)
    assert second.restored
    time.sleep(9)  # past that lifetime, in the restored guest's time too
    assert second.commands.run("echo alive").stdout == "alive\n"
    assert second.is_running()


def test_cold_and_drives_save_nothing(factory: SandboxFactory, cache: Path, tmp_path: Path) -> None:
    mgr = manager(cache)
    cold = factory.create(memory_mib=320, cold=True, templates=mgr)
    assert not cold.restored and cold.cold_reason == "cold=True"
    image = tmp_path / "d.ext4"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(image), "8M"], check=True)
    with_drive = factory.create(
        memory_mib=320, drives=[Drive(image, mount="/d", read_only=True)], templates=mgr
    )
    assert not with_drive.restored
    assert with_drive.cold_reason is not None and "extra drives" in with_drive.cold_reason
    assert saved_shapes(mgr) == []


def test_the_bound_evicts_the_least_recently_used(factory: SandboxFactory, cache: Path) -> None:
    mgr = manager(cache, shape_snapshots=2)
    for memory in (288, 320):
        sb = factory.create(memory_mib=memory, templates=mgr)
        assert not sb.restored
        sb.kill()
    again = factory.create(memory_mib=288, templates=mgr)  # 288 is now the most recent
    assert again.restored
    again.kill()
    newest = factory.create(memory_mib=352, templates=mgr)
    assert not newest.restored
    assert saved_shapes(mgr) == sorted([shape_dir(mgr, 288).name, shape_dir(mgr, 352).name])
    assert not shape_dir(mgr, 320).exists()


def test_cli_says_why_it_boots_cold_and_template_rm_removes_the_shapes(cache: Path) -> None:
    env = {**os.environ, "NOVASANDBOX_CACHE_DIR": str(cache)}
    cli = [sys.executable, "-m", "novasandbox.cli"]
    run = [*cli, "-v", "run", "--memory", "320", "--", "echo", "hi"]
    first = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout == "hi\n"
    assert (
        "cold boot (no snapshot of python for vcpus=1 memory_mib=320 network=none yet"
        in first.stderr
    )
    assert "saved the snapshot of its machine shape" in first.stderr
    second = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert second.stdout == "hi\n"
    assert "by restore" in second.stderr and "cold boot" not in second.stderr
    mgr = manager(cache)
    assert shape_dir(mgr, 320).is_dir()
    rm = subprocess.run([*cli, "template", "rm", "python"], capture_output=True, text=True, env=env)
    assert rm.returncode == 0, rm.stderr
    assert not mgr.shapes_dir(mgr.get("python")).exists()
    assert mgr.built("python") is None


@pytest.mark.parametrize("where", ["in-capture", "after-capture"])
def test_a_failed_save_leaves_nothing_and_the_sandbox_works(
    factory: SandboxFactory, cache: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    if where == "in-capture":

        async def broken_save(
            self: QemuVM, memory: Path, disk: Path, timeout: float = 120.0
        ) -> None:
            memory.write_bytes(b"half a memory image")
            raise ProviderError("saving the VM state failed (test)")

        monkeypatch.setattr(QemuVM, "save", broken_save)
    else:
        real_capture = AsyncSandbox._capture

        async def capture_then_fail(*args: Any, **kwargs: Any) -> float:
            await real_capture(*args, **kwargs)
            raise OSError(28, "No space left on device (test)")

        monkeypatch.setattr(AsyncSandbox, "_capture", capture_then_fail)
    mgr = manager(cache)
    sb = factory.create(memory_mib=320, templates=mgr)
    assert not sb.restored
    assert saved_shapes(mgr) == []
    assert "shape_saved" not in sb.timings
    sb.files.write("/home/user/after-failed-save", "ok")  # not left frozen
    assert sb.commands.run("cat /home/user/after-failed-save").stdout == "ok"


def test_two_first_creates_of_a_shape_at_once(factory: SandboxFactory, cache: Path) -> None:
    mgr = manager(cache)
    made: list[Sandbox] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            made.append(factory.create(memory_mib=320, templates=mgr))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(made) == 2
    assert saved_shapes(mgr) == [shape_dir(mgr, 320).name]  # one, and nothing half-written
    third = factory.create(memory_mib=320, templates=mgr)
    assert third.restored
    assert third.commands.run("echo fine").stdout == "fine\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="a networked sandbox's egress policy needs root")
def test_a_network_device_is_a_shape_of_its_own(factory: SandboxFactory, cache: Path) -> None:
    mgr = manager(cache)
    first = factory.create(memory_mib=320, network="nat", allow=[], templates=mgr)
    assert not first.restored
    assert saved_shapes(mgr) == [shape_dir(mgr, 320, "nat").name]
    second = factory.create(memory_mib=320, network="nat", allow=[], templates=mgr)
    assert second.restored
    mac = "cat /sys/class/net/eth0/address; hostname"
    out_first = first.commands.run(mac, check=True).stdout.split()
    out_second = second.commands.run(mac, check=True).stdout.split()
    assert out_second[1] == second.id
    assert out_second[0] != out_first[0], "the restored guest kept the first one's MAC"
    without = factory.create(memory_mib=320, templates=mgr)  # no network device: not that one
    assert not without.restored
    assert without.commands.run("ls /sys/class/net").stdout.split() == ["lo"]


@pytest.fixture(autouse=True)
def _no_shape_in_shared_cache() -> Iterator[None]:
    """These tests never save a shape into the shared cache."""
    shared = TemplateManager()
    base = shared.shapes_dir(shared.get("python"))
    before = sorted(p.name for p in base.iterdir()) if base.exists() else []
    yield
    after = sorted(p.name for p in base.iterdir()) if base.exists() else []
    assert after == before
