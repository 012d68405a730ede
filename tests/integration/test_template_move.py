"""Templates that move: a template cache copied elsewhere (its old place gone) restores
its snapshots, a user snapshot into the old place fails with a typed error, and a
template exported from one cache and imported into an empty one restores there without
being built. Real VMs, the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from novasandbox import Sandbox, SnapshotError, TemplateManager
from novasandbox.paths import cache_dir

from .conftest import SandboxFactory

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "novasandbox.cli"]
LAYERED = """name = "moved"
from = "python"
[[steps]]
run = "echo layered > /etc/moved"
[[steps]]
copy = "{files}"
dest = "/etc/moved.d"
"""


def cli(*args: str, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NOVASANDBOX_CACHE_DIR": str(cache)}
    env.pop("NOVASANDBOX_TEMPLATE_PATH", None)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)


def copy_cache(shared: Path, dest: Path) -> None:
    """What a built template needs of a cache, copied (bases are only for building)."""
    dest.mkdir(parents=True)
    for part in ("kernels", "templates", "layers", "definitions"):
        if (shared / part).exists():
            subprocess.run(["cp", "-a", str(shared / part), str(dest / part)], check=True)


@pytest.fixture
def holder() -> Iterator[Path]:
    shared = cache_dir()
    path = Path(tempfile.mkdtemp(prefix=".nscache-move-", dir=shared.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_moved_cache_restores_and_a_user_snapshot_into_the_old_one_fails_typed(
    factory: SandboxFactory, holder: Path
) -> None:
    old, new = holder / "old", holder / "new"
    copy_cache(cache_dir(), old)
    first = factory.create(templates=TemplateManager(old))
    assert first.restored
    first.files.write("/home/user/mark", "before the move")
    snap = first.snapshot()
    first.kill()
    old.rename(new)  # the old place is gone

    run = cli("-v", "run", "--", "cat", "/etc/hostname", cache=new)
    assert run.returncode == 0, run.stderr
    assert "by restore" in run.stderr and "cold boot" not in run.stderr
    assert str(new) in run.stderr or "template-python-" in run.stderr
    sb = factory.create(templates=TemplateManager(new))
    assert sb.restored
    assert sb.commands.run("python3 -c 'print(6 * 7)'").stdout == "42\n"
    with pytest.raises(SnapshotError) as info:
        factory.track(Sandbox.create(from_snapshot=snap))
    assert info.value.code == "snapshot-incompatible"
    assert str(old) in info.value.message


def test_export_then_import_into_an_empty_cache(holder: Path) -> None:
    archive = holder / "python.tar.zst"
    out = cli("template", "export", "python", str(archive), cache=cache_dir())
    assert out.returncode == 0, out.stderr
    assert "2 snapshots" in out.stdout and archive.is_file()
    empty = holder / "empty"
    imported = cli("template", "import", str(archive), cache=empty)
    assert imported.returncode == 0, imported.stderr
    assert "2 snapshots" in imported.stdout
    run = cli("-v", "run", "--", "python3", "-c", "print(6 * 7)", cache=empty)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "42\n"
    assert "by restore" in run.stderr and "cold boot" not in run.stderr
    again = cli("template", "build", "python", cache=empty)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stderr


def test_a_layered_template_moves_and_exports_with_its_parent(holder: Path) -> None:
    shared = cache_dir()
    built = holder / "built"
    built.mkdir()
    # python as the shared cache has it (hard links: nothing here writes into them)
    for part in ("kernels", "templates"):
        subprocess.run(["cp", "-al", str(shared / part), str(built / part)], check=True)
    (built / "definitions").mkdir()
    files = holder / "files"  # a copy step's source: the importing host will not have it
    files.mkdir()
    (files / "note").write_text("copied\n")
    (built / "definitions" / "moved.toml").write_text(LAYERED.format(files=files))
    build = cli("template", "build", "moved", cache=built, timeout=900)
    assert build.returncode == 0, build.stderr

    moved = holder / "moved"
    subprocess.run(["cp", "-a", str(built), str(moved)], check=True)
    shutil.rmtree(built)
    run = cli("-v", "run", "-t", "moved", "--", "cat", "/etc/moved", cache=moved)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "layered\n"
    assert "by restore" in run.stderr and "cold boot" not in run.stderr

    archive = holder / "moved.tar.zst"
    out = cli("template", "export", "moved", str(archive), cache=moved)
    assert out.returncode == 0, out.stderr
    shutil.rmtree(files)  # the definition in the archive pins what the copy copied
    empty = holder / "empty"
    imported = cli("template", "import", str(archive), cache=empty)
    assert imported.returncode == 0, imported.stderr
    assert "definitions of moved" in imported.stdout
    assert (empty / "definitions" / "moved.toml").is_file()
    run = cli(
        "-v", "run", "-t", "moved", "--", "cat", "/etc/moved", "/etc/moved.d/note", cache=empty
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "layered\ncopied\n"
    assert "by restore" in run.stderr and "cold boot" not in run.stderr
    # its parent came along, built
    assert TemplateManager(empty).built("python") is not None
