"""Files in a real VM: binary-safe chunked transfers, listing, errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from novasandbox import (
    ConfigError,
    Sandbox,
    SandboxFileError,
    SandboxFileNotFound,
    SandboxPermissionError,
    UnknownUser,
)
from novasandbox.guest.protocol import ErrorCode

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sb(sandbox: Sandbox) -> Sandbox:
    """Every test here runs local (restored, cold) and remote (through a server)."""
    return sandbox


def test_20_mb_binary_round_trip(sb: Sandbox) -> None:
    blob = os.urandom(20 * 1024 * 1024)
    digest = hashlib.sha256(blob).hexdigest()
    assert sb.files.write("/home/user/big.bin", blob) == len(blob)
    # the guest sees exactly these bytes ...
    assert sb.commands.run("sha256sum /home/user/big.bin").stdout.split()[0] == digest
    # ... and reading them back gives the same bytes
    back = sb.files.read("/home/user/big.bin", format="bytes")
    assert isinstance(back, bytes)
    assert len(back) == len(blob)
    assert hashlib.sha256(back).hexdigest() == digest
    sb.files.remove("/home/user/big.bin")


def test_text_write_read_and_parents_created(sb: Sandbox) -> None:
    sb.files.write("/tmp/a/b/c.txt", "héllo\n")
    assert sb.files.read("/tmp/a/b/c.txt") == "héllo\n"
    assert sb.commands.run("cat /tmp/a/b/c.txt").stdout == "héllo\n"
    sb.files.write("/tmp/a/b/c.txt", b"")
    assert sb.files.read("/tmp/a/b/c.txt", format="bytes") == b""


def test_mode_is_applied(sb: Sandbox) -> None:
    sb.files.write("/tmp/script.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    assert sb.commands.run(["/tmp/script.sh"]).stdout == "ran\n"


def test_list_stat_exists_make_dir_remove(sb: Sandbox) -> None:
    sb.files.make_dir("/tmp/d/sub")
    sb.files.write("/tmp/d/f.txt", "12345")
    entries = {e.name: e for e in sb.files.list("/tmp/d")}
    assert set(entries) == {"sub", "f.txt"}
    assert entries["sub"].type == "dir"
    assert (entries["f.txt"].type, entries["f.txt"].size) == ("file", 5)
    assert entries["f.txt"].path == "/tmp/d/f.txt"
    assert sb.files.stat("/tmp/d/f.txt").size == 5
    assert sb.files.exists("/tmp/d/f.txt")
    assert not sb.files.exists("/tmp/d/f.txt/below-a-file")
    sb.files.make_dir("/tmp/d/sub")  # exists already: fine
    sb.files.remove("/tmp/d")
    assert not sb.files.exists("/tmp/d")
    assert sb.commands.run("test -e /tmp/d").exit_code == 1


def test_reading_a_missing_file_raises(sb: Sandbox) -> None:
    with pytest.raises(SandboxFileNotFound) as info:
        sb.files.read("/no/such/file")
    assert info.value.code == "file-not-found"
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(SandboxFileNotFound):
        sb.files.list("/no/such/dir")
    with pytest.raises(SandboxFileNotFound):
        sb.files.remove("/no/such/file")


def test_reading_a_directory_raises(sb: Sandbox) -> None:
    with pytest.raises(SandboxFileError) as info:
        sb.files.read("/etc")
    assert info.value.agent_code is ErrorCode.IS_A_DIRECTORY
    assert info.value.path == "/etc"


def test_writing_over_a_directory_raises_and_changes_nothing(sb: Sandbox) -> None:
    sb.files.make_dir("/tmp/keep")
    with pytest.raises(SandboxFileError):
        sb.files.write("/tmp/keep", b"data")
    assert sb.files.stat("/tmp/keep").type == "dir"
    # the channel is still in sync after a failed upload
    assert sb.commands.run("echo ok").stdout == "ok\n"


def test_relative_paths_are_in_the_home_where_commands_run(sb: Sandbox) -> None:
    sb.files.write("data.csv", "a,b\n1,2\n")
    assert sb.commands.run("cat data.csv").stdout == "a,b\n1,2\n"  # cwd is the home
    assert sb.commands.run("pwd").stdout == "/home/user\n"
    assert sb.files.read("/home/user/data.csv") == "a,b\n1,2\n"
    assert "data.csv" in {e.name for e in sb.files.list(".")}
    assert sb.files.stat("./data.csv").path == "/home/user/data.csv"
    sb.files.make_dir("work/in")
    assert sb.commands.run("pwd", cwd="work/in").stdout == "/home/user/work/in\n"
    sb.files.remove("data.csv")
    assert not sb.files.exists("data.csv")


def test_write_streams_a_binary_file_from_where_it_stands(sb: Sandbox, tmp_path: Path) -> None:
    blob = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "src.bin"
    src.write_bytes(b"skipped" + blob)
    with src.open("rb") as f:
        f.seek(len(b"skipped"))
        assert sb.files.write("/tmp/streamed.bin", f) == len(blob)
    assert sb.files.read("/tmp/streamed.bin", format="bytes") == blob
    with src.open("r", encoding="latin-1") as text, pytest.raises(ConfigError):
        sb.files.write("/tmp/streamed.bin", text)  # type: ignore[arg-type]
    assert sb.files.stat("/tmp/streamed.bin").size == len(blob)  # refused: unchanged
    with pytest.raises(ConfigError):
        sb.files.write("/tmp/streamed.bin", 42)  # type: ignore[arg-type]
    sb.files.remove("/tmp/streamed.bin")


# ---------------------------------------------------------------------------- accounts


def test_files_act_as_the_user_and_belong_to_who_wrote_them(sb: Sandbox) -> None:
    sb.files.write("mine.txt", "user's")
    sb.files.make_dir("made/here")
    sb.files.write("/root/roots.txt", "root's", user="root")
    owners = sb.commands.run(
        "stat -c '%U:%G %n' /home/user/mine.txt /home/user/made /home/user/made/here "
        "/root/roots.txt",
        user="root",
    ).stdout.splitlines()
    assert owners == [
        "user:user /home/user/mine.txt",
        "user:user /home/user/made",
        "user:user /home/user/made/here",
        "root:root /root/roots.txt",
    ]
    # relative paths are under the home of the call's user
    assert sb.files.read("roots.txt", user="root") == "root's"
    assert sb.files.stat("roots.txt", user="root").path == "/root/roots.txt"
    assert sb.files.exists("mine.txt") and not sb.files.exists("mine.txt", user="root")


def test_the_users_file_calls_obey_the_guests_permissions(sb: Sandbox) -> None:
    sb.files.write("/root/secret", "s", user="root")
    with pytest.raises(SandboxPermissionError) as info:
        sb.files.read("/root/secret")
    assert info.value.code == "permission-denied" and info.value.path == "/root/secret"
    for call in (
        lambda: sb.files.write("/root/other", "x"),
        lambda: sb.files.write("/etc/novasandbox-test", "x"),
        lambda: sb.files.list("/root"),
        lambda: sb.files.make_dir("/root/d"),
        lambda: sb.files.remove("/root/secret"),
    ):
        with pytest.raises(SandboxPermissionError):
            call()
    assert sb.files.read("/root/secret", user="root") == "s"  # root still can
    assert not sb.files.exists("/root/other", user="root")
    assert not sb.files.exists("/etc/novasandbox-test")
    sb.files.remove("/root/secret", user="root")


def test_file_calls_refuse_an_unknown_or_malformed_user(sb: Sandbox) -> None:
    with pytest.raises(UnknownUser):
        sb.files.write("/tmp/x", "x", user="nosuchuser")
    with pytest.raises(UnknownUser):
        sb.files.read("/etc/hostname", user="nosuchuser")
    with pytest.raises(ConfigError):
        sb.files.stat("/tmp", user="Not A User")
    assert not sb.files.exists("/tmp/x")
