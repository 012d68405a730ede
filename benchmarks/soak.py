"""Soak: rounds of sandboxes created and killed in parallel, with faults injected, then a
check that nothing leaked. Not part of the test suite (it runs for minutes).

    .venv/bin/python benchmarks/soak.py [--rounds 10] [--parallel 6] [--out FILE]

Each round creates ``--parallel`` sandboxes at once (restored, some cold) and gives each
one fault, in turn: none, the VMM SIGKILLed, a kernel panic, the agent killed, a fork
bomb under a timeout, a command timeout, a snapshot + restore, a fork, and the hostile
guest's attacks (``tests/hostile.py``): a fake agent that floods output, sends framing
garbage or malformed replies, the agent stopped during an upload, a read of a link to
/dev/zero. It then kills them all, each kill bounded by ``KILL_BOUND_S``; the report has
the slowest kill and the owner's peak RSS. Every third sandbox has a network (``nat``,
with an egress policy when run as root). Every few rounds an owner process holding
sandboxes is SIGKILLed and ``reap()`` (what ``novasandbox gc`` runs) has to clean up
after it. At the end it checks that no QEMU process, state entry, socket, overlay,
snapshot, control group or egress policy is left under its private state directory and
that the host's available memory is back where it started (within
``--memory-slack`` MiB), and prints a JSON report; it exits 1 on any leak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

FAULTS = [
    "none",
    "vmm-killed",
    "kernel-panic",
    "agent-killed",
    "fork-bomb",
    "command-timeout",
    "snapshot-restore",
    "fork",
    "hostile-flood",
    "hostile-garbage",
    "hostile-malformed",
    "agent-stopped-upload",
    "zero-read",
]
KILL_BOUND_S = 10.0
"""A kill that takes longer is reported as an error (it must not depend on the guest)."""
STATS = {"slowest_kill_s": 0.0}
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.hostile

OWNER = textwrap.dedent(
    """
    import sys, time
    from novasandbox import Sandbox
    net = {"network": "nat", "allow": ["127.0.0.1:1"]} if sys.argv[2] == "1" else {}
    boxes = [Sandbox.create(**(net if i == 0 else {})) for i in range(int(sys.argv[1]))]
    print("ready", flush=True)
    time.sleep(600)
    """
)


async def one_sandbox(index: int, fault: str, counts: dict[str, int]) -> None:
    from tests.hostile import stop_agent_soon_async, take_port_async

    from novasandbox import (
        AgentProtocolError,
        AgentTimeout,
        AsyncSandbox,
        NotARegularFile,
        NovaSandboxError,
        delete_snapshot,
    )

    extra: list[AsyncSandbox] = []
    # every third sandbox is networked (with an egress policy when root)
    net: dict[str, Any] = {}
    if index % 3 == 1:
        net = {"network": "nat", "allow": ["127.0.0.1:1"] if os.geteuid() == 0 else []}
    sb = await AsyncSandbox.create(cold=index % 5 == 4, timeout=120, **net)
    try:
        await sb.commands.run("echo up", timeout=60)
        if fault == "vmm-killed":
            info = {i.id: i for i in await AsyncSandbox.list()}[sb.id]
            assert info.pid is not None
            os.kill(info.pid, signal.SIGKILL)
        elif fault == "kernel-panic":
            with contextlib.suppress(NovaSandboxError):
                await sb.commands.run("echo c > /proc/sysrq-trigger", timeout=30, user="root")
        elif fault == "agent-killed":
            pid = sb._agent.info["pid"] if sb._agent else 0
            with contextlib.suppress(NovaSandboxError):
                await sb.commands.run(f"kill -9 {pid}", timeout=30, user="root")
        elif fault == "fork-bomb":
            with contextlib.suppress(NovaSandboxError):
                await sb.commands.run(":(){ :|:& };:", timeout=3)
        elif fault == "command-timeout":
            with contextlib.suppress(NovaSandboxError):
                await sb.commands.run("sleep 100", timeout=1)
        elif fault == "snapshot-restore":
            snap = await sb.snapshot()
            clone = await AsyncSandbox.create(from_snapshot=snap, timeout=120, **net)
            extra.append(clone)
            await clone.commands.run("echo clone", timeout=60)
            await clone.kill()
            delete_snapshot(snap)
        elif fault == "fork":
            extra.extend(await sb.fork(2))
        elif fault == "hostile-flood":  # a fake agent floods tiny output frames
            await take_port_async(sb, "flood")
            with contextlib.suppress(AgentTimeout):
                await sb.commands.run("true", timeout=2)
        elif fault == "hostile-garbage":  # framing garbage: broken, then reconnected
            await take_port_async(sb, "garbage")
            with contextlib.suppress(AgentProtocolError):
                await sb.commands.run("true", timeout=5)
        elif fault == "hostile-malformed":
            await take_port_async(sb, "malformed")
            for _ in range(3):
                with contextlib.suppress(AgentProtocolError):
                    await sb.files.stat("/x")
        elif fault == "agent-stopped-upload":
            await stop_agent_soon_async(sb, 0.1)
            await asyncio.sleep(1)
            with contextlib.suppress(AgentTimeout):
                await sb.files.write("/tmp/big", bytes(16 << 20), timeout=2)
        elif fault == "zero-read":
            await sb.commands.run("ln -sf /dev/zero /tmp/result.json", timeout=60)
            with contextlib.suppress(NotARegularFile):
                await sb.files.read("/tmp/result.json")
        counts[fault] = counts.get(fault, 0) + 1
    finally:
        for other in extra:
            await other.kill()
        t0 = time.monotonic()
        await asyncio.wait_for(sb.kill(), KILL_BOUND_S)
        STATS["slowest_kill_s"] = max(STATS["slowest_kill_s"], time.monotonic() - t0)


async def soak_round(round_no: int, parallel: int, counts: dict[str, int]) -> list[str]:
    jobs = [
        one_sandbox(i, FAULTS[(round_no * parallel + i) % len(FAULTS)], counts)
        for i in range(parallel)
    ]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    return [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]


def orphan_round(count: int) -> list[str]:
    from novasandbox.gc import reap

    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(count), "1" if os.geteuid() == 0 else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    ready = owner.stdout.readline().strip() == "ready"
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    reaped = reap()
    return [] if ready and len(reaped) == count else [f"orphans: reaped {reaped}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--parallel", type=int, default=6)
    parser.add_argument("--orphans-every", type=int, default=3)
    parser.add_argument("--memory-slack", type=int, default=256, help="MiB")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ns-soak-", dir="/tmp"))
    os.environ["NOVASANDBOX_STATE_DIR"] = str(root)
    from novasandbox.gc import reap, vmm_pids_under
    from novasandbox.host import cgroups, egress
    from novasandbox.host.limits import available_memory_mib

    reap()
    time.sleep(1)
    mem_start = available_memory_mib()
    t0 = time.monotonic()
    counts: dict[str, int] = {}
    errors: list[str] = []
    try:
        for n in range(args.rounds):
            errors += asyncio.run(soak_round(n, args.parallel, counts))
            if args.orphans_every and n % args.orphans_every == args.orphans_every - 1:
                errors += orphan_round(3)
            print(f"round {n + 1}/{args.rounds}: {len(errors)} errors so far", file=sys.stderr)
    finally:
        reap()
    time.sleep(2)  # let the kernel give back what the VMs had
    leftovers: dict[str, Any] = {
        "qemu_processes": vmm_pids_under(root),
        "state_entries": sorted(p.name for p in (root / "sandboxes").glob("*")),
        "snapshots": sorted(p.name for p in (root / "snapshots").glob("*")),
        "control_groups": cgroups.empty_groups(),
        "egress_policies": sorted(egress.installed()),
    }
    # the kernel gives memory back lazily (freed guest RAM, caches, the control groups
    # of dead VMMs): wait up to 30 s for MemAvailable to come back within the slack
    settle = time.monotonic()
    mem_end = available_memory_mib()
    while mem_start - mem_end > args.memory_slack and time.monotonic() - settle < 30:
        time.sleep(1)
        mem_end = available_memory_mib()
    report = {
        "rounds": args.rounds,
        "parallel": args.parallel,
        "sandboxes": sum(counts.values()),
        "faults_injected": counts,
        "errors": errors,
        "leftovers": leftovers,
        "memory_available_mib": {
            "start": mem_start,
            "end": mem_end,
            "settled_after_s": round(time.monotonic() - settle, 1),
        },
        "wall_s": round(time.monotonic() - t0, 1),
        "slowest_kill_s": round(STATS["slowest_kill_s"], 3),
        "owner_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    leaked = any(leftovers.values()) or mem_start - mem_end > args.memory_slack
    report["leaks"] = leaked
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    if not leaked:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if leaked or errors else 0


if __name__ == "__main__":
    sys.exit(main())
