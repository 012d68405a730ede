"""Commands in a real VM: output, exit codes, env, cwd, stdin, timeouts, concurrency."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest

from novasandbox import (
    CommandError,
    CommandFailed,
    CommandNotFound,
    CommandTimeout,
    ConfigError,
    InvalidWorkingDirectory,
    ProcessNotFound,
    RemoteUnsupported,
    Sandbox,
    StdinClosed,
    UnknownUser,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sb(sandbox: Sandbox) -> Sandbox:
    """Every test here runs local (restored, cold) and remote (through a server)."""
    return sandbox


def guest_processes_matching(sb: Sandbox, marker: str) -> list[str]:
    """Command lines of guest processes that mention ``marker`` (the probe excludes itself)."""
    probe = (
        "import os\n"
        "me = str(os.getpid())\n"
        "for p in os.listdir('/proc'):\n"
        "    if p.isdigit() and p != me:\n"
        "        try:\n"
        "            c = open(f'/proc/{p}/cmdline','rb').read().replace(b'\\0', b' ')\n"
        "        except OSError:\n"
        "            continue\n"
        f"        if {marker!r}.encode() in c:\n"
        "            print(p, c.decode(errors='replace'))\n"
    )
    return sb.commands.run(["python3", "-c", probe]).stdout.splitlines()


def test_guest_kernel_is_not_the_hosts(sb: Sandbox) -> None:
    release = sb.commands.run(["uname", "-r"]).stdout.strip()
    assert release.endswith("-novasandbox")
    assert release != os.uname().release
    if sb.server is None:
        assert sb.guest_kernel == release
    else:  # what the server's host knows of the guest is not the client's
        with pytest.raises(RemoteUnsupported) as info:
            _ = sb.guest_kernel
        assert info.value.code == "remote-unsupported"


def test_stdout_stderr_and_exit_code_of_shell_string(sb: Sandbox) -> None:
    r = sb.commands.run("echo out; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 3)
    assert not r.ok


def test_argv_form_and_python_exit_code(sb: Sandbox) -> None:
    r = sb.commands.run(["python3", "-c", "import sys; print(6 * 7); sys.exit(3)"])
    assert r.stdout == "42\n"
    assert r.exit_code == 3


def test_argv_is_not_split_by_a_shell(sb: Sandbox) -> None:
    r = sb.commands.run(["printf", "%s|", "a b", "$HOME", "'q'"])
    assert r.stdout == "a b|$HOME|'q'|"


def test_env_from_sandbox_and_command(sb: Sandbox) -> None:
    r = sb.commands.run('echo "$SANDBOX_LEVEL $ONE $PATH"', env={"ONE": "1"})
    level, one, path = r.stdout.split()
    assert (level, one) == ("yes", "1")
    assert "/usr/bin" in path
    assert sb.commands.run('echo "[$ONE]"').stdout == "[]\n"


def test_cwd(sb: Sandbox) -> None:
    assert sb.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sb.commands.run("pwd").stdout == "/home/user\n"  # the user's home
    assert sb.commands.run("pwd", user="root").stdout == "/root\n"
    with pytest.raises(InvalidWorkingDirectory):
        sb.commands.run("pwd", cwd="/does/not/exist")


def test_stdin_text_and_binary(sb: Sandbox) -> None:
    assert sb.commands.run("tr a-z A-Z", stdin="hello\n").stdout == "HELLO\n"
    blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
    r = sb.commands.run(["sha256sum"], stdin=blob)
    import hashlib

    assert r.stdout.split()[0] == hashlib.sha256(blob).hexdigest()
    # without stdin the command reads EOF at once instead of hanging
    assert sb.commands.run("cat", timeout=20).stdout == ""


def test_output_streams_to_callbacks(sb: Sandbox) -> None:
    seen_out: list[str] = []
    seen_err: list[str] = []
    r = sb.commands.run(
        "for i in 1 2 3; do echo o$i; echo e$i >&2; sleep 0.05; done",
        on_stdout=seen_out.append,
        on_stderr=seen_err.append,
    )
    assert "".join(seen_out) == r.stdout == "o1\no2\no3\n"
    assert "".join(seen_err) == r.stderr == "e1\ne2\ne3\n"


def test_unicode_output(sb: Sandbox) -> None:
    r = sb.commands.run(["python3", "-c", "print('h\\u00e9llo \\u2603 \\U0001f600')"])
    assert r.stdout == "héllo ☃ 😀\n"


def test_check_raises_command_failed(sb: Sandbox) -> None:
    with pytest.raises(CommandFailed) as info:
        sb.commands.run("echo boom >&2; exit 5", check=True)
    assert info.value.exit_code == 5
    assert info.value.code == "command-failed"
    assert "boom" in str(info.value)
    assert sb.commands.run("true", check=True).exit_code == 0


def test_command_not_found(sb: Sandbox) -> None:
    with pytest.raises(CommandNotFound) as info:
        sb.commands.run(["definitely-not-a-command"])
    assert info.value.code == "command-not-found"
    # the shell form reports it the shell's way
    assert sb.commands.run("definitely-not-a-command").exit_code == 127
    assert sb.commands.run("echo still fine").stdout == "still fine\n"


def test_timeout_kills_the_whole_process_group(sb: Sandbox) -> None:
    marker = f"mark-{uuid.uuid4().hex[:8]}"
    # the leader and a forked child both ignore SIGTERM
    script = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "os.fork()\n"
        "print('up', flush=True)\n"
        "time.sleep(300)\n"
        f"# {marker}\n"
    )
    with pytest.raises(CommandTimeout) as info:
        sb.commands.run(["python3", "-c", script], timeout=1.5)
    assert info.value.code == "command-timeout"
    assert "up" in info.value.result.stdout
    assert guest_processes_matching(sb, marker) == []


def test_signal_exit_is_reported(sb: Sandbox) -> None:
    r = sb.commands.run("kill -9 $$")
    assert r.signal == 9
    assert r.exit_code == 128 + 9


def test_commands_run_concurrently_in_one_sandbox(sb: Sandbox) -> None:
    """The waiter can only finish if the writer runs while it is still running."""
    flag = f"/tmp/flag-{uuid.uuid4().hex[:8]}"
    results: dict[str, object] = {}

    def waiter() -> None:
        results["waiter"] = sb.commands.run(
            f"while [ ! -f {flag} ]; do sleep 0.05; done; echo released", timeout=60
        )

    threads = [threading.Thread(target=waiter)]
    threads[0].start()
    others = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(i, sb.commands.run(f"echo {i}").stdout)
        )
        for i in range(4)
    ]
    for t in others:
        t.start()
    for t in others:
        t.join()
    sb.commands.run(f"touch {flag}")
    threads[0].join(90)
    assert [results[i] for i in range(4)] == [f"{i}\n" for i in range(4)]
    waited = results["waiter"]
    assert getattr(waited, "stdout", None) == "released\n"


def test_started_command_can_be_signalled(sb: Sandbox) -> None:
    ready = threading.Event()
    handle = sb.commands.start(
        "trap 'echo got-usr1; exit 42' USR1; echo ready; sleep 300 & wait",
        on_stdout=lambda text: ready.set() if "ready" in text else None,
    )
    assert ready.wait(30), "the command never got ready"
    handle.send_signal(signal.SIGUSR1)
    result = handle.wait()
    assert result.exit_code == 42
    assert result.stdout == "ready\ngot-usr1\n"


def test_started_command_kill_takes_the_group(sb: Sandbox) -> None:
    marker = f"mark-{uuid.uuid4().hex[:8]}"
    handle = sb.commands.start(f"sh -c 'sleep 300; : {marker}' & sh -c 'sleep 301; : {marker}'")
    assert not handle.done()
    handle.kill()
    result = handle.wait()
    assert result.signal == signal.SIGKILL
    assert guest_processes_matching(sb, marker) == []


def test_open_stdin_streams_both_ways(sb: Sandbox) -> None:
    lines: list[str] = []
    handle = sb.commands.start(
        ["python3", "-u", "-c", "import sys\nfor l in sys.stdin: print(l.strip().upper())"],
        open_stdin=True,
        on_stdout=lines.append,
    )
    handle.send_stdin("one\n")
    handle.send_stdin(b"two\n")
    handle.close_stdin()
    assert handle.wait(check=True).stdout == "ONE\nTWO\n"
    assert "".join(lines) == "ONE\nTWO\n"


# ---------------------------------------------------------------------------- accounts


def test_commands_run_as_the_unprivileged_user_by_default(sb: Sandbox) -> None:
    probe = 'id -u; id -gn; printf "%s|%s|%s|%s\\n" "$HOME" "$USER" "$LOGNAME" "$SHELL"; pwd'
    assert sb.commands.run(probe).stdout.splitlines() == [
        "1000",
        "user",
        "/home/user|user|user|/bin/bash",
        "/home/user",
    ]
    assert sb.commands.run(["id", "-un"], user="root").stdout == "root\n"
    assert sb.commands.run("echo $HOME; pwd", user="root").stdout == "/root\n/root\n"
    # a relative cwd is under the home of the call's user
    sb.commands.run("mkdir -p sub", user="root")
    assert sb.commands.run("pwd", cwd="sub", user="root").stdout == "/root/sub\n"
    # the account's limits hold: root's files are not the user's
    r = sb.commands.run("touch /etc/novasandbox-test")
    assert r.exit_code == 1 and "Permission denied" in r.stderr
    with pytest.raises(InvalidWorkingDirectory):
        sb.commands.run("true", cwd="/root")


def test_the_user_has_passwordless_sudo(sb: Sandbox) -> None:
    r = sb.commands.run("sudo -n id -u")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "0\n", "")  # and the hostname resolves
    assert sb.commands.run("sudo -n sh -c 'echo $HOME'").stdout == "/root\n"


def test_an_unknown_or_malformed_user_is_refused(sb: Sandbox) -> None:
    with pytest.raises(UnknownUser) as info:
        sb.commands.run("true", user="nosuchuser")
    assert info.value.code == "unknown-user" and "nosuchuser" in str(info.value)
    for bad in ("Root", "a b", "../x", "", "x" * 33, 0):
        with pytest.raises(ConfigError):
            sb.commands.run("true", user=bad)  # type: ignore[arg-type]
    assert sb.commands.run("echo ok").stdout == "ok\n"  # nothing broke


def test_shell_strings_run_in_bash_as_a_login_shell(sb: Sandbox) -> None:
    r = sb.commands.run(
        "[[ -n $BASH_VERSION ]] && echo bash; echo $(( RANDOM >= 0 )); printf '\\xe2\\x82\\xac\\n';"
        " shopt -q login_shell && echo login"
    )
    assert r.stdout == "bash\n1\n\u20ac\nlogin\n", r.stderr
    # what a login shell reads: the user's ~/.profile, every time
    sb.commands.run("echo 'export NOVA_PROFILE=from-profile' >> ~/.profile", check=True)
    assert sb.commands.run("echo $NOVA_PROFILE").stdout == "from-profile\n"
    sb.commands.run("sed -i '/NOVA_PROFILE/d' ~/.profile", check=True)
    # and `source` works
    sb.files.write("/tmp/vars.sh", "GREETING=hello\n")
    assert sb.commands.run("source /tmp/vars.sh; echo $GREETING").stdout == "hello\n"


def test_a_login_shell_keeps_the_path_the_call_and_template_give(sb: Sandbox) -> None:
    # the template's PATH (the venv first), not the one /etc/profile sets
    path = sb.commands.run("echo $PATH").stdout.strip().split(":")
    assert path[0] == "/opt/venv/bin" and "/usr/bin" in path
    assert sb.commands.run("echo $PATH", env={"PATH": "/x:/usr/bin:/bin"}).stdout == (
        "/x:/usr/bin:/bin\n"
    )
    assert sb.commands.run("echo ${NOVASANDBOX_PATH-unset}").stdout == "unset\n"
    assert sb.commands.run("command -v pip").stdout == "/opt/venv/bin/pip\n"


# ---------------------------------------------------------------------------- processes by pid


def test_background_commands_are_listed_and_killed_by_pid(sb: Sandbox) -> None:
    marker = uuid.uuid4().hex[:8]
    handle = sb.commands.run(f"sleep 300; : {marker}", background=True, tag=f"job-{marker}")
    assert handle.pid > 0 and not handle.done()
    mine = [p for p in sb.commands.list() if p.pid == handle.pid]
    assert len(mine) == 1
    info = mine[0]
    assert info.cmd == ("/bin/bash", "-l", "-c", f"sleep 300; : {marker}")
    assert (info.cwd, info.user, info.tag, info.stdin) == (
        "/home/user",
        "user",
        f"job-{marker}",
        False,
    )
    assert info.started_at > 0
    assert sb.commands.kill(handle.pid) is True
    result = handle.wait()
    assert result.signal == 9
    assert handle.pid not in {p.pid for p in sb.commands.list()}
    assert sb.commands.kill(handle.pid) is False  # gone: not an error
    assert guest_processes_matching(sb, marker) == []


def test_connect_streams_recent_and_new_output_and_the_exit(sb: Sandbox) -> None:
    gate = f"/tmp/gate-{uuid.uuid4().hex[:8]}"
    script = f"echo before; while [ ! -e {gate} ]; do sleep 0.05; done; echo after; exit 7"
    started = sb.commands.run(script, background=True)
    seen: list[str] = []
    # what it printed before the connection comes first
    wait_for = time.monotonic() + 30
    while time.monotonic() < wait_for:
        attached = sb.commands.connect(started.pid, on_stdout=seen.append)
        if "before" in "".join(seen):
            break
        attached.disconnect()
        seen.clear()
        time.sleep(0.1)
    assert attached.argv == started.argv
    sb.files.write(gate, "")
    result = attached.wait()
    assert (result.exit_code, result.stdout, result.missed) == (7, "before\nafter\n", 0)
    assert "".join(seen) == "before\nafter\n"
    assert started.wait().stdout == "before\nafter\n"  # its own handle got all of it too


def test_stdin_by_pid_from_any_handle(sb: Sandbox) -> None:
    cat = sb.commands.start("cat; echo done", open_stdin=True, timeout=60)
    listed = {p.pid: p for p in sb.commands.list()}
    assert listed[cat.pid].stdin is True
    sb.commands.send_stdin(cat.pid, "hello ")
    attached = sb.commands.connect(cat.pid)
    attached.send_stdin(b"world\n")  # a connected handle sends by pid too
    sb.commands.close_stdin(cat.pid)
    assert cat.wait().stdout == "hello world\ndone\n"
    assert attached.wait().stdout.endswith("done\n")


def test_unknown_pids_and_closed_stdin_are_typed_errors(sb: Sandbox) -> None:
    for call in (
        lambda: sb.commands.connect(999_999),
        lambda: sb.commands.send_stdin(999_999, "x"),
        lambda: sb.commands.close_stdin(999_999),
    ):
        with pytest.raises(ProcessNotFound) as info:
            call()
        assert info.value.code == "process-not-found"
    assert sb.commands.kill(999_999) is False
    assert sb.commands.send_signal(999_999, 15) is False
    sleeper = sb.commands.run("sleep 60", background=True)  # stdin not open
    with pytest.raises(StdinClosed) as closed:
        sb.commands.send_stdin(sleeper.pid, "x")
    assert closed.value.code == "stdin-closed"
    assert sb.commands.kill(sleeper.pid)
    for bad in (0, -1, "12", 1.5, True):
        with pytest.raises(ConfigError):
            sb.commands.kill(bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            sb.commands.connect(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        sb.commands.run("true", background=True, tag="x" * 257)
    assert sb.commands.run("echo ok").stdout == "ok\n"


def test_a_disconnected_handle_leaves_the_command_running(sb: Sandbox) -> None:
    marker = uuid.uuid4().hex[:8]
    handle = sb.commands.start(f"sleep 300; : {marker}", timeout=None, background=True)
    handle.disconnect()
    with pytest.raises(CommandError):
        handle.wait()
    assert handle.pid in {p.pid for p in sb.commands.list()}
    again = sb.commands.connect(handle.pid)
    assert sb.commands.kill(handle.pid)
    assert again.wait().signal == 9


def test_commands_ignore_no_signal_and_sigterm_ends_them(sb: Sandbox) -> None:
    """PID 1 ignores SIGTERM; what the agent starts must not inherit that."""
    mask = int(sb.commands.run("grep SigIgn /proc/self/status").stdout.split()[1], 16)
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):
        assert not mask & (1 << (sig - 1)), sig
    sleeper = sb.commands.run(["sleep", "300"], background=True)
    assert sb.commands.send_signal(sleeper.pid, signal.SIGTERM)
    assert sleeper.wait().signal == signal.SIGTERM
