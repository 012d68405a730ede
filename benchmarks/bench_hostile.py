"""Hostile guests: what a misbehaving guest does to the process that owns its sandbox.

    .venv/bin/python benchmarks/bench_hostile.py [--attacks flood,zero-read] [--repeat N]
        [--cap 60] [--max-rss 1500] [--out FILE]

For each attack a fresh owner process (this interpreter, ``python -c``, with this
environment, so ``PYTHONPATH`` chooses the library under test) creates a victim and a
bystander sandbox, mounts the attack on the victim (``tests/hostile.py``: a fake agent
takes the victim's port, or the agent is stopped), and reports its own memory, what the
victim's call raised and when, the bystander's latency meanwhile, and how long
``victim.kill()`` took. The owner prints one line per phase (``ready``, ``attack``,
``raised``, ``attacked``, ``killing``, ``killed``, ``done``, plus a ``sample`` a second);
this script kills it when it runs past ``--cap`` seconds ("hung") or its RSS passes
``--max-rss`` MiB ("oom-capped"), then cleans up its VMs (``novasandbox gc``, then
SIGKILL). Prints one JSON object ``{attack: {"runs": [...]}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from novasandbox import Sandbox

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 1 << 20
sys.path.insert(0, str(REPO))  # tests.hostile: the fake agent and its helpers

from tests.hostile import (  # noqa: E402
    MALFORMED,
    malformed_calls,
    process_alive,
    rss_mib,
    stop_agent_soon,
    take_port,
)

OWNER_SCRIPT = (
    "import sys; sys.path[:0] = sys.argv[1:3]; import bench_hostile; "
    "bench_hostile.owner(sys.argv[3])"
)

# --------------------------------------------------------------------------- the owner


def emit(phase: str, **fields: Any) -> None:
    print(phase, json.dumps(fields), flush=True)


class Bystander(threading.Thread):
    """Calls ``files.exists`` on another sandbox in a loop and times each call."""

    def __init__(self, sb: Sandbox) -> None:
        super().__init__(daemon=True)
        self.sb = sb
        self.latencies_ms: list[float] = []
        self.errors: list[str] = []
        self.in_flight_since: float | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            t0 = self.in_flight_since = time.monotonic()
            try:
                self.sb.files.exists("/etc/hostname")
            except Exception as exc:
                self.errors.append(type(exc).__name__)
            self.in_flight_since = None
            self.latencies_ms.append((time.monotonic() - t0) * 1000)

    def stats(self) -> dict[str, Any]:
        """Count, p50 and max so far; a call still waiting counts towards the max."""
        done = list(self.latencies_ms)
        since = self.in_flight_since
        waiting = [] if since is None else [(time.monotonic() - since) * 1000]
        return {
            "count": len(done),
            "p50_ms": round(statistics.median(done), 1) if done else None,
            "max_ms": round(max(done + waiting), 1) if done or waiting else None,
            "errors": len(self.errors),
        }


class Monitor(threading.Thread):
    """Samples this process's RSS every 20 ms (peak since ``reset``); prints a ``sample``
    line a second, so that the parent has numbers even if this process never finishes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_mib = rss_mib()
        self.bystander: Bystander | None = None

    def reset(self) -> float:
        self.peak_mib = rss_mib()
        return self.peak_mib

    def run(self) -> None:
        last = time.monotonic()
        while True:
            self.peak_mib = max(self.peak_mib, rss_mib())
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                emit(
                    "sample",
                    rss_mib=round(rss_mib(), 1),
                    peak_rss_mib=round(self.peak_mib, 1),
                    ru_maxrss_mib=ru_maxrss_mib(),
                    bystander=self.bystander.stats() if self.bystander else None,
                )
            time.sleep(0.02)


def ru_maxrss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def attempt(call: Callable[[], object]) -> dict[str, Any]:
    """Run ``call``: what it raised (class, ``.code``) or returned, and after how long."""
    t0 = time.monotonic()
    try:
        value = call()
    except Exception as exc:
        return {
            "error": type(exc).__name__,
            "code": getattr(exc, "code", None),
            "message": str(exc)[:200],
            "seconds": round(time.monotonic() - t0, 3),
        }
    return {
        "error": None,
        "returned": repr(value)[:100],
        "seconds": round(time.monotonic() - t0, 3),
    }


def timed_kill(victim: Sandbox, qemu_pid: int) -> float:
    emit("killing")
    t0 = time.monotonic()
    victim.kill()
    kill_s = round(time.monotonic() - t0, 3)
    emit("killed", kill_s=kill_s, victim_qemu_left=process_alive(qemu_pid))
    return kill_s


def setup_port(mode: str) -> Callable[[Sandbox], None]:
    def setup(victim: Sandbox) -> None:
        take_port(victim, mode)

    return setup


def setup_zero_link(victim: Sandbox) -> None:
    victim.commands.run("ln -sf /dev/zero /tmp/result.json", check=True)


def setup_stop(victim: Sandbox) -> None:
    stop_agent_soon(victim)
    time.sleep(1)


def act_run(victim: Sandbox, qemu_pid: int) -> None:
    emit("raised", victim_call=attempt(lambda: victim.commands.run("true", timeout=5)))


def act_read(path: str) -> Callable[[Sandbox, int], None]:
    def act(victim: Sandbox, qemu_pid: int) -> None:
        emit("raised", victim_call=attempt(lambda: victim.files.read(path)))

    return act


def act_stop_write(victim: Sandbox, qemu_pid: int) -> None:
    """Upload 64 MiB to a stopped agent, then kill the sandbox from another thread."""
    write: dict[str, Any] = {}

    def upload() -> None:
        write.update(attempt(lambda: victim.files.write("/tmp/big", bytes(64 << 20))))

    writer = threading.Thread(target=upload, daemon=True)
    writer.start()
    time.sleep(3)
    timed_kill(victim, qemu_pid)
    writer.join(10)
    emit("raised", victim_call=write or {"error": "still running 10 s after kill"})


def act_malformed(victim: Sandbox, qemu_pid: int) -> None:
    results: list[dict[str, Any]] = []
    for op, call in malformed_calls(victim).items():
        for reply in MALFORMED[op]:
            results.append({"op": op, "reply": repr(reply)[:120], **attempt(call)})
    emit("raised", calls=results)


def act_garbage(victim: Sandbox, qemu_pid: int) -> None:
    call = attempt(lambda: victim.commands.run("true", timeout=5))
    emit("raised", victim_call=call, state_after=victim.state.value)
    time.sleep(10)
    back = attempt(lambda: victim.commands.run("echo back").stdout == "back\n")
    emit(
        "raised",
        state_after_10s=victim.state.value,
        echo_after_10s=back,
        channel_back=back.get("returned") == "True",
    )


Setup = Callable[["Sandbox"], None]
Act = Callable[["Sandbox", int], None]
ATTACKS: dict[str, tuple[Setup, Act]] = {
    "flood": (setup_port("flood"), act_run),
    "msgflood": (setup_port("msgflood"), act_run),
    "zero-read": (setup_zero_link, act_read("/tmp/result.json")),
    "read-flood": (setup_port("flood"), act_read("/x")),
    "stop-write": (setup_stop, act_stop_write),
    "malformed": (setup_port("malformed"), act_malformed),
    "garbage": (setup_port("garbage"), act_garbage),
}
"""attack -> (mount it on the victim, the victim's call(s) during the attack)."""
KILLS_ITSELF = {"stop-write"}
"""Attacks whose act is the kill."""


def owner(attack: str) -> None:
    """The owner process: two sandboxes, one attack, one line per phase on stdout."""
    try:
        own(attack)
    except Exception as exc:
        emit("failed", failure=f"{type(exc).__name__}: {exc}")
        raise


def own(attack: str) -> None:
    import novasandbox
    from novasandbox import Sandbox

    setup, act = ATTACKS[attack]
    monitor = Monitor()
    monitor.start()
    victim = Sandbox.create()
    bystander_sb = Sandbox.create()
    assert victim._inner._vm is not None
    qemu_pid = victim._inner._vm.pid
    emit("ready", library=novasandbox.__file__, victim_qemu_pid=qemu_pid)
    setup(victim)
    bystander = monitor.bystander = Bystander(bystander_sb)
    bystander.start()
    emit("attack", rss_before_mib=round(monitor.reset(), 1))
    act(victim, qemu_pid)
    bystander.stopped.set()
    emit("attacked", peak_rss_mib=round(monitor.peak_mib, 1), bystander=bystander.stats())
    if attack not in KILLS_ITSELF:
        timed_kill(victim, qemu_pid)
    bystander.join(30)
    rss_after_kill = rss_mib()
    bystander_sb.kill()
    emit("done", rss_after_kill_mib=round(rss_after_kill, 1), ru_maxrss_mib=ru_maxrss_mib())


# --------------------------------------------------------------------------- the parent


def qemu_pids(state: Path) -> list[int]:
    """QEMU processes of a state directory (its path is on their command lines)."""
    from bench import processes_matching

    return [pid for pid, _ in processes_matching(str(state))]


def clean_up(state: Path, env: dict[str, str]) -> dict[str, Any]:
    """After the owner: what it left, then ``novasandbox gc`` and SIGKILL for the rest."""
    left = qemu_pids(state)
    if left:
        subprocess.run(
            [sys.executable, "-m", "novasandbox.cli", "gc"],
            env=env,
            capture_output=True,
            timeout=60,
        )
    killed = qemu_pids(state)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while qemu_pids(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    remaining = qemu_pids(state)
    shutil.rmtree(state, ignore_errors=True)
    return {"after_owner": left, "sigkilled_after_gc": killed, "remaining": remaining}


def run_attack(attack: str, cap: float, max_rss: float) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="ns-", dir="/tmp"))
    env = {**os.environ, "NOVASANDBOX_STATE_DIR": str(state)}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT, str(HERE), str(REPO), attack],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    run: dict[str, Any] = {"phase": "starting", "phase_at_s": {}}

    def read_phases() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            phase, _, data = line.partition(" ")
            fields = json.loads(data) if data.strip() else {}
            if phase == "sample":
                run["last_sample"] = fields
                continue
            run["phase"] = phase
            run["phase_at_s"][phase] = round(time.monotonic() - t0, 2)
            run.update(fields)
            print(f"  {attack}: {phase} {data.strip()[:200]}", file=sys.stderr)

    reader = threading.Thread(target=read_phases, daemon=True)
    reader.start()
    outcome, parent_peak = "finished", 0.0
    while proc.poll() is None:
        rss = rss_mib(proc.pid)
        parent_peak = max(parent_peak, rss)
        if rss > max_rss:
            outcome = "oom-capped"
        elif time.monotonic() - t0 > cap:
            outcome = "hung"
        if outcome != "finished":
            proc.kill()
            break
        time.sleep(0.1)
    proc.wait()
    run["wall_s"] = round(time.monotonic() - t0, 2)
    run["leftovers"] = clean_up(state, env)
    reader.join(10)
    if outcome != "finished":
        run["capped_in_phase"] = run["phase"]
        run["capped_after_s_in_phase"] = round(
            run["wall_s"] - run["phase_at_s"].get(run["phase"], 0), 2
        )
        if "last_sample" in run:
            run.setdefault("bystander", run["last_sample"]["bystander"])
    elif proc.returncode != 0:
        outcome = f"owner exited {proc.returncode}"
    run["outcome"] = outcome
    run["owner_peak_rss_mib_seen_by_parent"] = round(parent_peak, 1)
    peak = max(run.get("peak_rss_mib", 0.0), run.get("last_sample", {}).get("peak_rss_mib", 0.0))
    if "rss_before_mib" in run:
        run["peak_growth_mib"] = round(max(peak, parent_peak) - run["rss_before_mib"], 1)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--cap", type=float, default=60.0, help="seconds per owner")
    parser.add_argument("--max-rss", type=float, default=1500.0, help="MiB per owner")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    attacks = args.attacks.split(",")
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    report: dict[str, Any] = {attack: {"runs": []} for attack in attacks}
    for n in range(args.repeat):
        for attack in attacks:
            print(f"{attack} ({n + 1}/{args.repeat})", file=sys.stderr)
            run = run_attack(attack, args.cap, args.max_rss)
            report[attack]["runs"].append(run)
            print(
                f"{attack}: {run['outcome']} {run.get('capped_in_phase', '')} "
                f"growth {run.get('peak_growth_mib')} MiB",
                file=sys.stderr,
            )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
