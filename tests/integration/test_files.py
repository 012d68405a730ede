"""Files in a real VM: binary-safe chunked transfers, listing, errors."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from novasandbox import (
    ConfigError,
    FilesystemEvent,
    FileTooLarge,
    NotADirectory,
    Sandbox,
    SandboxFileError,
    SandboxFileExists,
    SandboxFileNotFound,
    SandboxPermissionError,
    TooManyEntries,
    UnknownUser,
    WriteEntry,
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


# ---------------------------------------------------------------------------- files, completely


def _until(fn: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    """Wait for ``fn()`` (a guest under emulation is slow); fail naming ``what``."""
    deadline = time.monotonic() + seconds
    while not fn():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen")
        time.sleep(0.05)


def test_entries_have_owner_group_permissions_time_and_link_target(sb: Sandbox) -> None:
    sb.files.write("info/f.txt", "12345", mode=0o640)
    sb.commands.run(
        "ln -sfn f.txt /home/user/info/link && ln -sfn /etc/hostname /tmp/root-link", user="root"
    )
    info = sb.files.get_info("info/f.txt")
    assert (info.name, info.path, info.type, info.size) == (
        "f.txt",
        "/home/user/info/f.txt",
        "file",
        5,
    )
    assert (info.mode, info.permissions) == (0o640, "rw-r-----")
    assert (info.owner, info.group, info.symlink_target) == ("user", "user", None)
    assert (
        info.modified_time.tzinfo is not None
        and info.modified_time.utcoffset().total_seconds() == 0
    )
    assert info.modified_time == datetime.fromtimestamp(info.mtime, UTC)
    assert sb.files.stat("info/f.txt") == info  # the former name
    link = sb.files.get_info("info/link")
    assert (link.type, link.symlink_target, link.owner) == ("symlink", "f.txt", "root")
    assert sb.files.get_info("/tmp/root-link").symlink_target == "/etc/hostname"
    listed = {e.name: e for e in sb.files.list("info")}
    assert listed["f.txt"] == info and listed["link"] == link
    root = sb.files.get_info("/root", user="root")
    assert (root.owner, root.group, root.type, root.permissions) == (
        "root",
        "root",
        "dir",
        "rwx------",
    )
    sb.files.remove("info")


def test_list_to_a_depth(sb: Sandbox) -> None:
    sb.commands.run("mkdir -p tree/a/b/c && touch tree/top tree/a/one tree/a/b/c/deep")
    rel = {
        depth: [e.path.removeprefix("/home/user/tree/") for e in sb.files.list("tree", depth=depth)]
        for depth in (1, 2, 4)
    }
    assert rel[1] == ["a", "top"]
    assert rel[2] == ["a", "a/b", "a/one", "top"]
    assert rel[4] == ["a", "a/b", "a/b/c", "a/b/c/deep", "a/one", "top"]
    deep = [e for e in sb.files.list("tree", depth=4) if e.name == "deep"]
    assert [e.path for e in deep] == ["/home/user/tree/a/b/c/deep"]
    with pytest.raises(TooManyEntries) as info:
        sb.files.list("tree", depth=4, max_entries=5)
    assert info.value.code == "too-many-entries"
    assert len(sb.files.list("tree", depth=4, max_entries=6)) == 6
    for bad in ({"depth": 0}, {"depth": 33}, {"depth": "2"}, {"max_entries": 0}):
        with pytest.raises(ConfigError):
            sb.files.list("tree", **bad)  # type: ignore[arg-type]
    with pytest.raises(NotADirectory):
        sb.files.list("tree/top")
    sb.files.remove("tree")


def test_rename(sb: Sandbox) -> None:
    sb.files.write("ren/a.txt", "a")
    sb.files.write("ren/b.txt", "b")
    with pytest.raises(SandboxFileExists) as exists:
        sb.files.rename("ren/a.txt", "ren/b.txt")
    assert exists.value.code == "file-exists"
    assert sb.files.read("ren/b.txt") == "b" and sb.files.read("ren/a.txt") == "a"
    with pytest.raises(SandboxFileNotFound):
        sb.files.rename("ren/a.txt", "ren/missing-dir/c.txt")
    info = sb.files.rename("ren/a.txt", "/home/user/ren/c.txt")
    assert (info.name, info.path, info.size, info.owner) == (
        "c.txt",
        "/home/user/ren/c.txt",
        1,
        "user",
    )
    assert not sb.files.exists("ren/a.txt") and sb.files.read("ren/c.txt") == "a"
    with pytest.raises(SandboxFileNotFound):
        sb.files.rename("ren/a.txt", "ren/d.txt")
    sb.files.write("/root/r.txt", "r", user="root")
    with pytest.raises(SandboxPermissionError):
        sb.files.rename("/root/r.txt", "ren/stolen.txt")
    assert sb.files.exists("/root/r.txt", user="root")
    with pytest.raises(ConfigError):
        sb.files.rename("ren/c.txt", "../escape")
    assert sb.files.exists("ren/c.txt")
    sb.files.remove("ren")
    sb.files.remove("/root/r.txt", user="root")


def test_make_dir_tells_whether_it_created(sb: Sandbox) -> None:
    assert sb.files.make_dir("mk/sub") is True
    assert sb.files.make_dir("mk/sub") is False
    assert sb.files.make_dir("mk") is False
    sb.files.write("mk/file", "x")
    for path in ("mk/file", "mk/file/below"):
        with pytest.raises(NotADirectory) as info:
            sb.files.make_dir(path)
        assert info.value.code == "not-a-directory"
    assert sb.files.read("mk/file") == "x"
    sb.files.remove("mk")


def test_write_takes_iterables_and_write_files_several(sb: Sandbox) -> None:
    def chunks() -> Iterator[bytes]:
        for i in range(40):
            yield bytes([i]) * 100_000

    expected = b"".join(chunks())
    assert sb.files.write("it/gen.bin", chunks()) == len(expected)
    assert sb.files.read("it/gen.bin", format="bytes") == expected
    assert sb.files.write("it/list.bin", [b"ab", bytearray(b"cd"), b""]) == 4
    assert sb.files.read("it/list.bin") == "abcd"
    with pytest.raises(ConfigError):
        sb.files.write("it/list.bin", ["text, not bytes"])  # type: ignore[list-item]
    assert sb.files.read("it/list.bin") == "abcd"  # refused before the file was opened
    infos = sb.files.write_files(
        [
            {"path": "it/one.txt", "data": "1"},
            WriteEntry("it/two.sh", b"#!/bin/sh\necho two\n", mode=0o755),
            {"path": "/tmp/three.bin", "data": iter([b"3" * 10])},
        ]
    )
    assert [(i.path, i.size, i.permissions) for i in infos] == [
        ("/home/user/it/one.txt", 1, "rw-r--r--"),
        ("/home/user/it/two.sh", 19, "rwxr-xr-x"),
        ("/tmp/three.bin", 10, "rw-r--r--"),
    ]
    assert sb.commands.run("it/two.sh").stdout == "two\n"
    for bad in (
        [{"path": "it/x", "data": "x"}, {"path": "it/y"}],
        [{"path": "it/x", "data": "x"}, {"path": "../y", "data": "y"}],
        [{"path": "it/x", "data": "x"}, {"path": "it/y", "data": 42}],
        [{"path": "it/x", "data": "x"}, WriteEntry("it/y", "y", mode=0o10000)],
        "it/x",
    ):
        with pytest.raises(ConfigError):
            sb.files.write_files(bad)  # type: ignore[arg-type]
    assert not sb.files.exists("it/x")  # nothing of a refused call was written
    sb.files.remove("it")


def test_read_as_a_stream(sb: Sandbox) -> None:
    blob = os.urandom(3 * 1024 * 1024 + 5)
    sb.files.write("/tmp/stream.bin", blob)
    stream = sb.files.read("/tmp/stream.bin", format="stream")
    chunks = list(stream)
    assert b"".join(chunks) == blob and len(chunks) > 1
    # leaving early stops the read; the channel goes on
    stream = sb.files.read("/tmp/stream.bin", format="stream")
    assert len(next(iter(stream))) > 0
    stream.close()  # type: ignore[attr-defined]
    assert sb.files.read("/tmp/stream.bin", format="bytes") == blob
    # errors before the first byte come from the call itself
    with pytest.raises(SandboxFileNotFound):
        sb.files.read("/tmp/no-such", format="stream")
    with pytest.raises(FileTooLarge):
        sb.files.read("/tmp/stream.bin", format="stream", max_size=1000)
    with pytest.raises(ConfigError):
        sb.files.read("/tmp/stream.bin", format="lines")  # type: ignore[call-overload]
    sb.files.remove("/tmp/stream.bin")


def _guest_inotify_fds(sb: Sandbox) -> int:
    out = sb.commands.run(
        "for f in /proc/[0-9]*/fd/*; do readlink $f; done 2>/dev/null | grep -c inotify",
        user="root",
    ).stdout
    return int(out.strip() or 0)


def test_watch_dir(sb: Sandbox) -> None:
    sb.files.make_dir("watched/sub")
    seen: list[FilesystemEvent] = []
    handle = sb.files.watch_dir("watched", recursive=True, on_event=seen.append)
    assert handle.path == "/home/user/watched" and handle.running
    assert _guest_inotify_fds(sb) == 1
    sb.commands.run("echo hi > watched/sub/f && chmod 600 watched/sub/f")
    _until(lambda: len(seen) >= 3, "three events")
    sb.commands.run("mv watched/sub/f watched/g && rm watched/g && mkdir watched/later")
    _until(lambda: len(seen) >= 7, "seven events")
    sb.commands.run(": > watched/later/new")  # a directory made after the watch started
    _until(lambda: len(seen) >= 8, "an event in a new directory")
    events = handle.get_new_events()
    assert [(e.name, e.type) for e in events] == [
        ("sub/f", "create"),
        ("sub/f", "write"),
        ("sub/f", "chmod"),
        ("sub/f", "rename"),
        ("g", "create"),
        ("g", "remove"),
        ("later", "create"),
        ("later/new", "create"),
    ]
    assert seen == events and handle.get_new_events() == [] and handle.dropped == 0
    handle.stop()
    assert not handle.running
    _until(lambda: _guest_inotify_fds(sb) == 0, "the guest's inotify descriptor closed")
    sb.commands.run("touch watched/after-stop")
    assert handle.get_new_events() == []
    handle.stop()  # idempotent
    sb.files.remove("watched")


def test_watch_dir_refuses_bad_input_and_ends_with_its_directory(sb: Sandbox) -> None:
    sb.files.write("wfile", "x")
    with pytest.raises(NotADirectory):
        sb.files.watch_dir("wfile")
    with pytest.raises(SandboxFileNotFound):
        sb.files.watch_dir("no-such-dir")
    with pytest.raises(SandboxPermissionError):
        sb.files.watch_dir("/root")
    with pytest.raises(ConfigError):
        sb.files.watch_dir("/tmp", recursive="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        sb.files.watch_dir("../x")
    assert _guest_inotify_fds(sb) == 0
    sb.files.make_dir("gone")
    handle = sb.files.watch_dir("gone")
    sb.commands.run(": > gone/f && rm -r gone")
    handle.wait()
    assert not handle.running and handle.error is None
    assert [(e.name, e.type) for e in handle.get_new_events()][:2] == [
        ("f", "create"),
        ("f", "remove"),
    ]
    _until(lambda: _guest_inotify_fds(sb) == 0, "the guest's inotify descriptor closed")
    sb.files.remove("wfile")
