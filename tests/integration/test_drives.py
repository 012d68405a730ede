"""Extra drives: attached as virtio-blk, mounted where the config says."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from novasandbox import Drive, ReadOnlyFilesystem

from .conftest import SandboxFactory

pytestmark = pytest.mark.integration


def make_ext4(tmp_path: Path, files: dict[str, str], name: str = "data.ext4") -> Path:
    content = tmp_path / f"{name}.d"
    content.mkdir()
    for rel, text in files.items():
        (content / rel).write_text(text)
    image = tmp_path / name
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(content), str(image), "16M"], check=True
    )
    return image


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_only_drive(factory: SandboxFactory, tmp_path: Path) -> None:
    image = make_ext4(tmp_path, {"hello.txt": "from the host\n"})
    before = sha256(image)
    sb = factory.create(drives=[Drive(image, mount="/data", read_only=True)])
    assert sb.files.read("/data/hello.txt") == "from the host\n"
    assert "ro" in sb.commands.run("grep ' /data ' /proc/mounts").stdout.split()[3].split(",")
    with pytest.raises(ReadOnlyFilesystem) as info:
        sb.files.write("/data/new.txt", "nope", user="root")
    assert info.value.code == "read-only-filesystem"
    r = sb.commands.run("echo x > /data/other.txt", user="root")
    assert r.exit_code != 0
    assert "Read-only file system" in r.stderr
    # the sandbox goes on working, and the image on the host is untouched
    assert sb.commands.run("echo fine").stdout == "fine\n"
    sb.kill()
    assert sha256(image) == before


def test_two_drives_read_write_reaches_the_file(factory: SandboxFactory, tmp_path: Path) -> None:
    first = make_ext4(tmp_path, {"which": "first\n"}, "first.ext4")
    second = make_ext4(tmp_path, {"which": "second\n"}, "second.ext4")
    sb = factory.create(
        drives=[Drive(first, mount="/mnt/one"), Drive(second, mount="/mnt/two", read_only=True)]
    )
    assert sb.files.read("/mnt/one/which") == "first\n"
    assert sb.files.read("/mnt/two/which") == "second\n"
    sb.files.write("/mnt/one/written.txt", "kept\n", user="root")
    sb.kill()
    out = subprocess.run(
        ["debugfs", "-R", "cat /written.txt", str(first)], capture_output=True, text=True
    )
    assert out.stdout == "kept\n"
