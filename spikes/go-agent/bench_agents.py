"""SPIKE (issue 13): the Python agent against the Go responder, interleaved in one run.

Both templates live in one private cache (same kernel, same base; only the agent differs):
"python" (agent.py) and "pythongo" (spikes/go-agent, the Go binary as init). Usage::

    spikes/go-agent/build.sh
    export NOVASANDBOX_CACHE_DIR=/tmp/nscache-gospike
    export NOVASANDBOX_TEMPLATE_PATH=$PWD/spikes/go-agent/template
    novasandbox template build python; novasandbox template build pythongo
    PYTHONPATH=src .venv/bin/python spikes/go-agent/bench_agents.py [--runs 20] [--out F]

Measures per agent: create() (template snapshot restore) -> agent answered and -> first
stdout of ``echo hi``; in a running sandbox the argv ``true`` and ``ping`` round trips;
inside one guest the cost of spawning /bin/true (Go os/exec and ForkExec, Python
posix_spawn, subprocess.run, Popen with the agent's pipes and session); PSS of idle
restored QEMUs; the template snapshot's memory image; the agent's own RSS in the guest.
Every sandbox is killed before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench import host_info, summarize

from novasandbox import AsyncSandbox

AGENTS = {"python": "python", "go": "pythongo"}

PY_SPAWN = r"""
import json, os, subprocess, sys, time
n = int(sys.argv[1])
res = {"py_posix_spawn": [], "py_subprocess_run": [], "py_popen_pipes_session": []}
for _ in range(n):
    t = time.perf_counter(); pid = os.posix_spawn("/bin/true", ["true"], os.environ)
    os.waitpid(pid, 0); res["py_posix_spawn"].append((time.perf_counter() - t) * 1000)
    t = time.perf_counter(); subprocess.run(["/bin/true"])
    res["py_subprocess_run"].append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    p = subprocess.Popen(["/bin/true"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    p.communicate(); res["py_popen_pipes_session"].append((time.perf_counter() - t) * 1000)
print(json.dumps(res))
"""


def ms(s: float) -> float:
    return s * 1000.0


def smaps_pss_mib(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2:
            fields[name.strip()] = int(parts[0])
    return fields["Pss"] / 1024, fields["Rss"] / 1024


def cpu_ticks(sb: AsyncSandbox) -> int:
    """utime + stime of the sandbox's QEMU process (clock ticks)."""
    assert sb._vm is not None
    fields = Path(f"/proc/{sb._vm.pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


async def restore_once(template: str) -> dict[str, float]:
    first: list[float] = []
    t0 = time.perf_counter()
    sb = await AsyncSandbox.create(template)
    try:
        t_ready = time.perf_counter()
        if not sb.restored:
            raise RuntimeError(f"{template}: booted cold, expected a restore")
        r = await sb.commands.run(
            "echo hi", on_stdout=lambda _t: first.append(time.perf_counter()) if not first else None
        )
        t_echo = time.perf_counter()
        if r.stdout != "hi\n" or r.exit_code != 0 or not first:
            raise RuntimeError(f"{template}: bad echo result {r!r}")
        assert sb._agent is not None
        steps = sb._agent.info.get("steps") or {}  # the Go responder's own hello timings
        t1 = time.perf_counter()
        await sb.commands.run(["true"])
        t_true = time.perf_counter() - t1
        return {
            "answered": ms(t_ready - t0),
            "first_output": ms(first[0] - t0),
            "first_echo_done": ms(t_echo - t0),
            "second_cmd_true": ms(t_true),
            **{f"phase_{k}": v for k, v in sb.timings.items()},
            **{f"agent_{k}": v / 1000 if k.endswith("_us") else v for k, v in steps.items()},
        }
    finally:
        await sb.kill()


async def round_trips(sbs: dict[str, AsyncSandbox], runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for i in range(runs + 5):
        order = list(sbs) if i % 2 == 0 else list(reversed(sbs))
        for name in order:
            sb = sbs[name]
            t = time.perf_counter()
            r = await sb.commands.run(["true"])
            dt = ms(time.perf_counter() - t)
            assert r.exit_code == 0
            t = time.perf_counter()
            r2 = await sb.commands.run("echo hi")
            de = ms(time.perf_counter() - t)
            assert r2.stdout == "hi\n"
            agent = sb._agent
            assert agent is not None
            t = time.perf_counter()
            await agent.call("ping")
            dp = ms(time.perf_counter() - t)
            if i >= 5:
                out.setdefault(f"{name}_true", []).append(dt)
                out.setdefault(f"{name}_echo", []).append(de)
                out.setdefault(f"{name}_ping", []).append(dp)
    return out


async def guest_info(sb: AsyncSandbox) -> dict[str, Any]:
    agent = sb._agent
    assert agent is not None
    pid = agent.info["pid"]
    r = await sb.commands.run(
        f"grep -E '^(VmRSS|RssAnon|RssFile)' /proc/{pid}/status /proc/1/status; "
        "grep -E '^(MemTotal|MemFree|MemAvailable|Cached|AnonPages):' /proc/meminfo"
    )
    return {"agent_pid": pid, "lines": r.stdout.splitlines()}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"host": host_info(), "runs": args.runs, "metrics": {}}
    m = report["metrics"]
    # 1. restore -> answered / first output, interleaved (order alternates per round)
    raw: dict[str, dict[str, list[float]]] = {a: {} for a in AGENTS}
    for i in range(args.runs + 1):
        order = list(AGENTS) if i % 2 == 0 else list(reversed(AGENTS))
        for agent in order:
            res = await restore_once(AGENTS[agent])
            if i == 0:
                continue  # warm-up round
            for k, v in res.items():
                raw[agent].setdefault(k, []).append(v)
        print(f"restore round {i} done", file=sys.stderr)
    for agent, d in raw.items():
        for k, vals in d.items():
            m[f"restore_{k}_{agent}"] = summarize(vals, "ms")
    # 2. round trips in running sandboxes; 3. spawn costs inside the guests
    sbs = {a: await AsyncSandbox.create(t) for a, t in AGENTS.items()}
    try:
        for k, vals in (await round_trips(sbs, args.runs)).items():
            m[f"roundtrip_{k}"] = summarize(vals, "ms")
        for agent, sb in sbs.items():
            r = await sb.commands.run(["python3", "-S", "-c", PY_SPAWN, str(args.runs)])
            for k, vals in json.loads(r.stdout).items():
                m[f"guest_spawn_{k}_in_{agent}"] = summarize(vals, "ms")
            m[f"guest_memory_{agent}"] = await guest_info(sb)
        r = await sbs["go"].commands.run(["/opt/novasandbox/init", "spawnbench", str(args.runs)])
        for k, vals in json.loads(r.stdout).items():
            m[f"guest_spawn_{k}_in_go"] = summarize(vals, "ms")
    finally:
        for sb in sbs.values():
            await sb.kill()
    # 4. PSS of idle restored QEMUs (both agents' sandboxes alive at once)
    live: list[tuple[str, AsyncSandbox]] = []
    try:
        for _ in range(args.memory_count):
            for agent, tpl in AGENTS.items():
                live.append((agent, await AsyncSandbox.create(tpl)))
        await asyncio.sleep(1.0)
        ticks0 = {id(sb): cpu_ticks(sb) for _, sb in live}
        await asyncio.sleep(args.idle)
        hz = os.sysconf("SC_CLK_TCK")
        idle_cpu: dict[str, list[float]] = {}
        for agent, sb in live:
            used = (cpu_ticks(sb) - ticks0[id(sb)]) / hz
            idle_cpu.setdefault(agent, []).append(100.0 * used / args.idle)
        for agent in AGENTS:
            m[f"idle_qemu_cpu_percent_{agent}"] = summarize(idle_cpu[agent], "%")
        pss: dict[str, list[float]] = {}
        rss: dict[str, list[float]] = {}
        for agent, sb in live:
            assert sb._vm is not None
            p, r = smaps_pss_mib(sb._vm.pid)
            pss.setdefault(agent, []).append(p)
            rss.setdefault(agent, []).append(r)
        for agent in AGENTS:
            m[f"idle_pss_{agent}"] = summarize(pss[agent], "MiB")
            m[f"idle_rss_{agent}"] = summarize(rss[agent], "MiB")
    finally:
        for _, sb in live:
            await sb.kill()
    # 5. the template snapshots' memory images
    cache = Path(os.environ["NOVASANDBOX_CACHE_DIR"])
    for agent, tpl in AGENTS.items():
        m[f"memory_bin_bytes_{agent}"] = {
            str(p.relative_to(cache)): p.stat().st_size
            for p in sorted((cache / "templates" / tpl).glob("*/snapshots/*/memory.bin"))
        } or {
            str(p.relative_to(cache)): p.stat().st_size
            for p in sorted((cache / "templates" / tpl).rglob("memory.bin"))
        }
    return report


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--memory-count", type=int, default=3)
    ap.add_argument("--idle", type=float, default=5.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report = asyncio.run(main_async(args))
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
