"""Template snapshot memory: image size, PSS per idle restored sandbox, restore -> first
output; two checkouts compared, interleaved, in one run.

Usage::

    .venv/bin/python benchmarks/bench_memimg.py \\
        --side old=/path/to/old/src:/path/to/old/cache \\
        --side new=/path/to/new/src:/path/to/new/cache[:VAR=VALUE,...] \\
        [--rounds 4] [--runs 5] [--memory-count 4] [--idle 2] [--out FILE]

Each side is a source tree (put first on PYTHONPATH) and a cache directory
(``NOVASANDBOX_CACHE_DIR``) whose "python" template is already built. Every round runs
one worker process per side, alternating which side goes first; a worker restores
``--runs`` sandboxes one after the other (``create`` -> first stdout of ``echo hi``,
then a second ``echo hi``), then ``--memory-count`` at once, lets them idle and reads
each QEMU's ``/proc/PID/smaps_rollup``, and reports the template snapshot's files.
Prints one JSON document (p50/p95/min/max per side and each side's p50s over the first
side's). ``VAR=VALUE`` pairs go into that side's environment.
Every sandbox a worker starts is killed before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TEMPLATE = "python"


# ---------------------------------------------------------------------------- worker


def _worker(runs: int, count: int, idle: float) -> dict[str, Any]:
    from novasandbox import AsyncSandbox, Sandbox, TemplateManager
    from novasandbox.snapshots import template_snapshot
    from novasandbox.vm import get_provider

    out: dict[str, Any] = {"first_output_ms": [], "ready_ms": [], "second_echo_ms": []}
    for _ in range(runs):
        first: list[float] = []

        def on_stdout(_text: str, first: list[float] = first) -> None:
            if not first:
                first.append(time.perf_counter())

        t0 = time.perf_counter()
        sb = Sandbox.create(TEMPLATE)
        try:
            t_ready = time.perf_counter()
            res = sb.commands.run("echo hi", on_stdout=on_stdout)
            if res.stdout != "hi\n" or not first or not sb.restored:
                raise RuntimeError(f"bad echo or not restored: {res!r}")
            t1 = time.perf_counter()
            if sb.commands.run("echo hi").stdout != "hi\n":
                raise RuntimeError("bad second echo")
            out["second_echo_ms"].append((time.perf_counter() - t1) * 1000)
            out["first_output_ms"].append((first[0] - t0) * 1000)
            out["ready_ms"].append((t_ready - t0) * 1000)
        finally:
            sb.kill()

    async def memory() -> list[dict[str, int]]:
        live: list[AsyncSandbox] = []
        try:
            for sb in await asyncio.gather(*(AsyncSandbox.create(TEMPLATE) for _ in range(count))):
                live.append(sb)
            await asyncio.sleep(idle)
            pids = {info.id: info.pid for info in await AsyncSandbox.list()}
            rollups = []
            for sb in live:
                fields: dict[str, int] = {}
                text = Path(f"/proc/{pids[sb.id]}/smaps_rollup").read_text()
                for line in text.splitlines()[1:]:
                    name, _, rest = line.partition(":")
                    parts = rest.split()
                    if len(parts) == 2 and parts[1] == "kB":
                        fields[name.strip()] = int(parts[0])
                rollups.append(fields)
            for r in await asyncio.gather(*(sb.commands.run("echo hi") for sb in live)):
                if r.stdout != "hi\n":
                    raise RuntimeError("bad echo after idling")
            return rollups
        finally:
            await asyncio.gather(*(sb.kill() for sb in live), return_exceptions=True)

    rollups = asyncio.run(memory())
    out["pss_mib"] = [r["Pss"] / 1024 for r in rollups]
    out["rss_mib"] = [r["Rss"] / 1024 for r in rollups]
    out["anon_mib"] = [r.get("Anonymous", 0) / 1024 for r in rollups]
    manager = TemplateManager()
    built = manager.require_built(TEMPLATE)
    tpl = built.template
    snap = template_snapshot(manager, built, tpl.vcpus, tpl.memory_mib, get_provider().engine())
    if snap is None:
        raise RuntimeError("the template has no snapshot (run: novasandbox template build)")
    st = (snap.directory / "memory.bin").stat()
    out["memory_bin_bytes"] = st.st_size
    out["memory_bin_allocated_bytes"] = st.st_blocks * 512
    return out


# ---------------------------------------------------------------------------- driver


def summarize(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {}

    def pct(q: float) -> float:
        return v[min(len(v) - 1, round(q * (len(v) - 1)))]

    return {
        "n": len(v),
        "p50": round(pct(0.5), 1),
        "p95": round(pct(0.95), 1),
        "min": round(v[0], 1),
        "max": round(v[-1], 1),
    }


def run_side(src: str, cache: str, extra: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=src, NOVASANDBOX_CACHE_DIR=cache)
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        env[key] = value
    argv = [sys.executable, __file__, "--worker"]
    argv += ["--runs", str(args.runs), "--memory-count", str(args.memory_count)]
    argv += ["--idle", str(args.idle)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"worker failed ({src}): {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--side", action="append", default=[], help="NAME=SRC:CACHE[:VAR=VALUE,...] (repeat)"
    )
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--runs", type=int, default=5, help="restores per worker (5)")
    p.add_argument("--memory-count", type=int, default=4, help="idle sandboxes per worker (4)")
    p.add_argument("--idle", type=float, default=2.0, help="s idle before reading PSS (2)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.runs, args.memory_count, args.idle)))
        return 0
    sides: dict[str, tuple[str, str, str]] = {}
    for spec in args.side:
        name, _, rest = spec.partition("=")
        src, _, rest = rest.partition(":")
        cache, _, extra = rest.partition(":")
        if not (name and src and cache):
            p.error(f"--side wants NAME=SRC:CACHE[:VAR=VALUE,...], got {spec!r}")
        sides[name] = (src, cache, extra)
    if not sides:
        p.error("give at least one --side")
    merged: dict[str, dict[str, list[float]]] = {name: {} for name in sides}
    images: dict[str, dict[str, int]] = {}
    names = list(sides)
    for rnd in range(args.rounds):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            res = run_side(*sides[name], args)
            images[name] = {k: v for k, v in res.items() if k.startswith("memory_bin")}
            for key, values in res.items():
                if isinstance(values, list):
                    merged[name].setdefault(key, []).extend(values)
            print(f"round {rnd} {name}: {json.dumps(res)}", file=sys.stderr)
    report: dict[str, Any] = {
        "params": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "sides": {
            name: {"image": images[name], **{k: summarize(v) for k, v in merged[name].items()}}
            for name in names
        },
    }
    # each side against the first
    a = names[0]
    report["ratio_p50"] = {}
    for b in names[1:]:
        for key in merged[a]:
            if report["sides"][a][key].get("p50"):
                report["ratio_p50"][f"{b}/{a} {key}"] = round(
                    report["sides"][b][key]["p50"] / report["sides"][a][key]["p50"], 3
                )
        report["ratio_p50"][f"{b}/{a} memory_bin_bytes"] = round(
            images[b]["memory_bin_bytes"] / images[a]["memory_bin_bytes"], 3
        )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
