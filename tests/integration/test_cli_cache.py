"""``novasandbox cache prune`` and the cache report of ``doctor``, run as a user runs them
(a real process), against a private cache: hard links (``cp -al``) of the shared one plus
entries made for the test. The shared cache is never pruned: each test checks that it
is exactly as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novasandbox.paths import cache_dir
from novasandbox.templates import BUILTIN_DIR, TemplateManager

from .conftest import assert_no_leftovers

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "novasandbox.cli"]
MB = 1_000_000


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env if env is not None else os.environ.copy(),
    )


def prune_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = cli("cache", "prune", "--json", *args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its inode and mode: what must not change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_ino, st.st_mode)
    return out


def blob(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(os.urandom(size))
    return path


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    shared = cache_dir()
    assert TemplateManager(shared).built("python") is not None
    before = listing(shared)
    # beside the shared cache, so that hard links work (tmp_path may be another file
    # system); removed at the end
    holder = Path(tempfile.mkdtemp(prefix=".nscache-test-", dir=shared.parent))
    private = holder / "cache"
    subprocess.run(["cp", "-al", str(shared), str(private)], check=True)
    monkeypatch.setenv("NOVASANDBOX_CACHE_DIR", str(private))
    monkeypatch.delenv("NOVASANDBOX_TEMPLATE_PATH", raising=False)
    # what the copy already holds that no template uses (an older base, say) goes first:
    # each test judges only what it adds
    prune_json()
    try:
        yield private
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    assert listing(shared) == before, "the shared cache changed"


def test_prune_removes_what_no_template_uses_and_says_how_much(private_cache: Path) -> None:
    fakes = [
        blob(private_cache / "kernels" / ("f" * 16) / "vmlinux", 1 * MB).parent,
        blob(private_cache / "bases" / ("e" * 16 + ".tar"), 2 * MB),
        blob(private_cache / "templates" / "gone" / ("d" * 16) / "rootfs.ext4", 3 * MB).parent,
    ]
    doctor = json.loads(cli("doctor", "--json").stdout)["cache_bytes"]
    assert doctor["total"] == sum(v for k, v in doctor.items() if k != "total")
    assert min(doctor["kernels"], doctor["bases"], doctor["templates"]) > MB
    assert doctor["snapshots"] > 0  # the python template's snapshots

    plan = prune_json("--dry-run")
    assert sorted(e["path"] for e in plan["remove"]) == sorted(map(str, fakes))
    assert plan["keep"] == [] and plan["dry_run"] is True and plan["freed"] == 0
    assert plan["bytes"] >= 6 * MB
    assert all(p.exists() for p in fakes)
    text = cli("cache", "prune", "--dry-run").stdout
    assert f"would free {plan['bytes']} bytes" in text
    assert text.count("would remove ") == 3

    r = cli("cache", "prune")
    assert r.returncode == 0, r.stderr
    assert f"freed {plan['bytes']} bytes" in r.stdout
    assert not any(p.exists() for p in fakes)
    assert not (private_cache / "templates" / "gone").exists()
    rows = {row["name"]: row for row in json.loads(cli("template", "list", "--json").stdout)}
    assert rows["python"]["built"] is True
    after = json.loads(cli("doctor", "--json").stdout)["cache_bytes"]
    assert after["total"] <= doctor["total"] - plan["bytes"]
    assert "freed 0 bytes" in cli("cache", "prune").stdout


def test_template_rm_then_prune_frees_the_base(private_cache: Path, tmp_path: Path) -> None:
    user = tmp_path / "templates"
    user.mkdir()
    (user / "tiny.toml").write_text('name = "tiny"\n[image]\npackages = ["python3", "less"]\n')
    env = {**os.environ, "NOVASANDBOX_TEMPLATE_PATH": str(user)}
    manager = TemplateManager(private_cache, template_dirs=[user])
    tiny = manager.get("tiny")
    # its artifacts, as a build would leave them (the kernel is python's)
    assert manager.kernel_path(tiny).is_file()
    base = blob(manager.base_path(tiny), 2 * MB)
    blob(manager.image_dir(tiny) / "rootfs.ext4", MB)
    (manager.image_dir(tiny) / "manifest.json").write_text("{}")
    assert manager.built("tiny") is not None

    assert prune_json("--dry-run", env=env)["remove"] == []
    r = cli("template", "rm", "tiny", env=env)
    assert r.returncode == 0 and "removed" in r.stdout
    result = prune_json(env=env)
    assert [e["path"] for e in result["remove"]] == [str(base)]
    assert result["freed"] == result["bytes"] >= 2 * MB
    assert not base.exists()
    assert manager.kernel_path(tiny).is_file()  # python still has it
    assert manager.built("python") is not None


def test_prune_keeps_the_image_of_a_live_sandbox(
    private_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    factory: Any,
    state_root: Path,
) -> None:
    # "mine": python's definition under another name (same image digest), built by
    # linking python's image, then its definition removed while a sandbox runs it
    user = tmp_path / "templates"
    user.mkdir()
    text = (BUILTIN_DIR / "python.toml").read_text().replace('name = "python"', 'name = "mine"')
    (user / "mine.toml").write_text(text)
    manager = TemplateManager(private_cache, template_dirs=[user])
    python, mine = manager.get("python"), manager.get("mine")
    image = manager.image_dir(mine)
    image.parent.mkdir(parents=True)
    subprocess.run(["cp", "-al", str(manager.image_dir(python)), str(image)], check=True)
    monkeypatch.setenv("NOVASANDBOX_TEMPLATE_PATH", str(user))
    sb = factory.create("mine", cold=True)  # boots from the private image
    env = {k: v for k, v in os.environ.items() if k != "NOVASANDBOX_TEMPLATE_PATH"}

    result = prune_json(env=env)
    assert result["remove"] == [] and result["freed"] == 0
    [kept] = result["keep"]
    assert kept["path"] == str(image)
    assert kept["reason"].startswith(f"in use: {image}/")
    assert image.is_dir()
    assert sb.commands.run("echo still here").stdout == "still here\n"

    sb.kill()
    result = prune_json(env=env)
    assert [(e["path"], e["reason"]) for e in result["remove"]] == [
        (str(image), "template 'mine' is not defined")
    ]
    assert not image.exists()
    assert_no_leftovers(state_root)
