"""An output flood: 1 GB on stdout. The result keeps what ``max_output`` allows and
counts the rest, callbacks see every byte, and neither host nor agent memory follows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import assert_no_leftovers

pytestmark = pytest.mark.integration

FLOOD = 1_000_000_000
CAP = 1 << 20

SCRIPT = textwrap.dedent(
    f"""
    import json
    from novasandbox import Sandbox
    seen = 0
    def count(text):
        global seen
        seen += len(text)
    with Sandbox.create() as sb:
        r = sb.commands.run(["head", "-c", "{FLOOD}", "/dev/zero"], on_stdout=count,
                            max_output={CAP}, timeout=600)
        agent_pid = sb._inner._agent.info["pid"]
        status = sb.files.read(f"/proc/{{agent_pid}}/status")
        hwm_kib = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1])
        with open("/proc/self/status") as f:  # this process alone (wait4 counts QEMU too)
            own_kib = int(next(l for l in f if l.startswith("VmHWM")).split()[1])
        print(json.dumps({{"kept": len(r.stdout), "dropped": r.stdout_dropped, "seen": seen,
                          "exit": r.exit_code, "agent_peak_kib": hwm_kib,
                          "host_peak_kib": own_kib}}))
    """
)


def test_a_1_gb_flood_is_capped_and_memory_stays_bounded(state_root: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, _usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    report = json.loads(out)
    assert report["exit"] == 0
    assert report["kept"] == CAP
    assert report["dropped"] == FLOOD - CAP
    assert report["seen"] == FLOOD  # the callback got every byte
    # the guest agent streams: its peak RSS stays far below the flood
    assert report["agent_peak_kib"] < 64 * 1024
    peak_mib = report["host_peak_kib"] / 1024
    print(f"peak host RSS {peak_mib:.0f} MiB, agent peak {report['agent_peak_kib'] // 1024} MiB")
    assert peak_mib < 200, f"host process peaked at {peak_mib:.0f} MiB for a 1 GB flood"
    assert_no_leftovers(state_root)
