"""The novasandbox command, run as a user runs it (a real process, real VMs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from novasandbox.host import cgroups

from .conftest import assert_no_leftovers

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "novasandbox.cli"]


def cli(
    *args: str, timeout: float = 180, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI as a process; its stdin is ``stdin`` (or /dev/null: never the test's)."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
    )


def test_run_prints_the_guest_kernel(state_root: Path) -> None:
    r = cli("run", "--", "uname", "-r")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("-novasandbox")
    assert r.stdout.strip() != os.uname().release
    assert_no_leftovers(state_root)


def test_run_passes_streams_env_cwd_and_exit_status(state_root: Path) -> None:
    r = cli(
        "run",
        "--env",
        "GREETING=hi",
        "--cwd",
        "/tmp",
        "--",
        "sh",
        "-c",
        'echo "$GREETING from $(pwd)"; echo oops >&2; exit 7',
    )
    assert r.returncode == 7
    assert r.stdout == "hi from /tmp\n"
    assert r.stderr == "oops\n"
    assert_no_leftovers(state_root)


def test_run_errors_have_codes_and_statuses(state_root: Path) -> None:
    r = cli("run", "--", "no-such-command")
    assert r.returncode == 127
    assert "[command-not-found]" in r.stderr
    r = cli("run", "--timeout", "1", "--", "sleep", "30")
    assert r.returncode == 124
    assert "[command-timeout]" in r.stderr
    r = cli("run", "-t", "nope", "--", "true")
    assert r.returncode == 125
    assert "[template-not-found]" in r.stderr
    assert_no_leftovers(state_root)


def test_ls_and_kill(state_root: Path) -> None:
    from novasandbox import Sandbox

    sb = Sandbox.create()
    try:
        listed = json.loads(cli("ls", "--json").stdout)
        assert sb.id in {entry["id"] for entry in listed}
        r = cli("kill", sb.id)
        assert r.returncode == 0, r.stderr
        assert json.loads(cli("ls", "--json").stdout) == []
        assert not sb.is_running()
        r = cli("kill", sb.id)
        assert r.returncode == 125
        assert "[sandbox-not-found]" in r.stderr
    finally:
        sb.kill()
    assert_no_leftovers(state_root)


def test_template_list_and_doctor() -> None:
    r = cli("template", "list", "--json")
    assert r.returncode == 0
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["python"]["built"] is True
    r = cli("doctor", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["provider"]["name"] == "qemu" and report["provider"]["isolated"] is True
    assert report["accelerator"]["name"] in ("kvm", "tcg")
    assert report["qemu"].startswith("QEMU emulator version")
    layout = cgroups.detect()
    assert report["vmm_cgroups"] == (layout.describe() if layout else "none (rlimits only)")
    assert report["vmm_confinement"].startswith("drops root" if os.geteuid() == 0 else "runs as")
    r = cli("template", "build", "python")
    assert r.returncode == 0
    assert "up to date" in r.stdout


def test_run_with_a_network(state_root: Path) -> None:
    r = cli("run", "--network", "nat", "--no-egress", "--", "ls", "/sys/class/net")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["eth0", "lo"]
    r = cli("run", "--", "ls", "/sys/class/net")
    assert r.stdout.split() == ["lo"]
    r = cli("run", "--allow", "1.2.3.4", "--", "true")  # --allow needs --network nat
    assert r.returncode == 125
    assert "invalid-config" in r.stderr
    assert_no_leftovers(state_root)
    for mode in ("detached", "bridge"):  # the template snapshot's internal mode is not one
        r = cli("run", "--network", mode, "--", "true")
        assert r.returncode == 125, r.stderr
        assert r.stderr.strip() == (
            f"error [invalid-config]: --network must be one of none, nat, tap, got '{mode}'"
        )
    assert_no_leftovers(state_root)
