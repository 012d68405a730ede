"""Terminals in a real VM (``sandbox.pty``): a login shell with a tty of the given size,
typing, Ctrl-C, resize, exit codes, as the user or root; locally and through a server."""

from __future__ import annotations

import re
import threading
import time

import pytest

from novasandbox import ConfigError, Sandbox

from .conftest import SandboxFactory

pytestmark = pytest.mark.integration

WAIT = 60.0


@pytest.fixture(scope="module")
def sb(sandbox: Sandbox) -> Sandbox:
    """Local (restored, cold) and remote (through a server)."""
    return sandbox


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def lines(shown: str) -> list[str]:
    """The screen's lines, without terminal control sequences (bash's bracketed paste)."""
    return [line.strip("\r") for line in ANSI.sub("", shown).split("\r\n")]


class Screen:
    """What a terminal showed, as it came (``on_data``)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._cond = threading.Condition()

    def __call__(self, chunk: bytes) -> None:
        assert isinstance(chunk, bytes)
        with self._cond:
            self.data += chunk
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = WAIT) -> str:
        """Everything shown so far, once ``text`` is in it (after ``mark``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while text.encode() not in self.data:
                left = deadline - time.monotonic()
                assert left > 0, f"{text!r} never showed; the screen: {bytes(self.data)!r}"
                self._cond.wait(left)
            return self.data.decode(errors="replace")


def test_a_login_shell_in_a_terminal_of_the_size_asked(sb: Sandbox) -> None:
    screen = Screen()
    term = sb.pty.create(100, 30, on_data=screen)
    assert term.pid in {p.pid for p in sb.commands.list()}  # a command like any other
    term.send_stdin("id -un; stty size; tty; echo $TERM; shopt -q login_shell && echo L\n")
    shown = lines(screen.wait_for("\r\nL\r\n"))
    assert "user" in shown and "30 100" in shown and "xterm-256color" in shown, shown
    assert any(line.startswith("/dev/pts/") for line in shown), shown
    term.resize(132, 43)
    term.send_stdin("stty size\n")
    screen.wait_for("43 132\r\n")
    term.send_stdin("exit 3\n")
    assert term.wait().exit_code == 3
    assert term.pid not in {p.pid for p in sb.commands.list()}


def test_ctrl_c_interrupts_the_foreground_program_not_the_shell(
    factory: SandboxFactory,
) -> None:
    sb = factory.create()
    screen = Screen()
    term = sb.pty.create(on_data=screen, user="root", cwd="/tmp")
    term.send_stdin("id -un; pwd; sleep 300\n")
    screen.wait_for("/tmp\r\n")
    time.sleep(0.5)  # the sleep is running
    term.send_stdin("\x03")
    term.send_stdin("echo after-$?\n")
    shown = lines(screen.wait_for("after-130"))
    assert "root" in shown and "/tmp" in shown, shown
    term.send_stdin("exit\n")
    assert term.wait().exit_code == 0  # the shell went on: its last command was the echo


def test_a_terminal_is_killed_by_pid_and_bad_sizes_are_refused(factory: SandboxFactory) -> None:
    sb = factory.create()
    for cols, rows in ((0, 24), (80, 0), (1001, 24), (80, 1001), (True, 24), (80.5, 24)):
        with pytest.raises(ConfigError):
            sb.pty.create(cols, rows)  # type: ignore[arg-type]
    term = sb.pty.create(cmd=["sleep", "300"])
    assert sb.commands.kill(term.pid)
    result = term.wait()
    assert result.signal == 9 and result.stdout == ""
    with pytest.raises(ConfigError):
        term.resize(0, 10)
