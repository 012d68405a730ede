"""Speed under emulation (issue 13): two checkouts compared, interleaved, in one run.

Usage::

    .venv/bin/python benchmarks/bench_speed.py \\
        --side old=/path/to/old/src:/path/to/old/cache \\
        --side new=/path/to/new/src:/path/to/new/cache[:VAR=VALUE,...] \\
        [--rounds 2] [--runs 3] [--spawn-runs 10] [--spawn-sandboxes 1] \\
        [--pool-runs 3] [--pool-size 2] [--pool-settle 0.5] [--concurrency 10] \\
        [--memory-count 4] [--idle 2] [--out FILE]

The full comparison (about 10 minutes on 2 cores under TCG)::

    .venv/bin/python benchmarks/bench_speed.py --rounds 4 --runs 6 --spawn-runs 30 \\
        --pool-runs 6 --concurrency 10 --memory-count 10 --idle 2 \\
        --side old=OLD_CHECKOUT/src:OLD_CACHE --side new=src:NEW_CACHE --out FILE

Each side is a source tree (put first on PYTHONPATH) and a cache directory
(``NOVASANDBOX_CACHE_DIR``) whose "python" template is built with its snapshot;
``VAR=VALUE`` pairs go into that side's environment; ``NOVASANDBOX_BENCH_PRESTART=N``
there makes that side's worker keep N VMMs started ahead (``Sandbox.prestart``) for its
one-after-the-other creates (waiting before each until all N are up again) and as many
as ``--concurrency`` for the concurrent ones. Every round runs one worker
process per side, alternating which side goes first. A worker measures, in this order:

1. restores one after the other (one discarded warm-up, then ``--runs``): ``create()``
   -> first stdout of ``echo hi``, ``create()`` returned, a second ``echo hi``, and
   the sandbox's own ``sb.timings`` (ms since the restore began, as the library
   records them; ``guest_hello`` only where the library reports it);
2. in ``--spawn-sandboxes`` restored sandboxes: argv ``["true"]`` round trips
   (3 warm-up, then ``--spawn-runs``), then in the same sandbox a python3 script
   timing ``os.posix_spawn`` + ``os.waitpid`` of ``/bin/true`` (3 warm-up, then
   ``--spawn-runs``), and per sandbox the round trip's p50 minus the spawn's p50;
3. a ``Pool`` of ``--pool-size``: wait until it is full, ``--pool-settle`` s more,
   ``acquire()`` -> first stdout of ``echo hi`` (one discarded warm-up, then
   ``--pool-runs``);
4. ``--concurrency`` ``AsyncSandbox.create()`` under one ``asyncio.gather``, each then
   running ``echo hi``: start -> the last create returned, and -> the last echo answered;
5. ``--memory-count`` restored sandboxes at once, idle ``--idle`` s: each QEMU's
   ``/proc/PID/smaps_rollup`` (PSS, RSS, anonymous); and the template snapshot's
   ``memory.bin`` (file size and allocated bytes).

Prints one JSON document (p50/p95/min/max per side and metric, each side's p50 over
the first side's) and writes it to ``--out``. Progress goes to stderr. Every sandbox a
worker starts is killed before it exits, on errors too (a worker that outlives its
time gets SIGTERM, which unwinds the same way); a worker that leaves one behind fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMPLATE = "python"
WARMUP_CALLS = 3

# Runs in the guest: os.posix_spawn + os.waitpid of /bin/true, timed in the guest.
GUEST_SPAWN = """
import json, os, statistics, sys, time
n = int(sys.argv[1])
ms = []
for i in range(n + 3):
    t0 = time.perf_counter()
    pid = os.posix_spawn("/bin/true", ["/bin/true"], os.environ)
    os.waitpid(pid, 0)
    if i >= 3:
        ms.append((time.perf_counter() - t0) * 1000)
print(json.dumps({"median_ms": statistics.median(ms), "ms": ms}))
"""


class BenchError(RuntimeError):
    pass


def _ms(seconds: float) -> float:
    return seconds * 1000


def _first_output() -> tuple[list[float], Callable[[str], None]]:
    first: list[float] = []

    def on_stdout(_text: str) -> None:
        if not first:
            first.append(time.perf_counter())

    return first, on_stdout


def _check_echo(stdout: str, what: str) -> None:
    if stdout != "hi\n":
        raise BenchError(f"{what}: echo answered {stdout[:200]!r}")


# ---------------------------------------------------------------------------- worker


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    from novasandbox import AsyncSandbox, Pool, Sandbox, TemplateManager
    from novasandbox.snapshots import template_snapshot
    from novasandbox.vm import get_provider

    out: dict[str, Any] = {}

    def add(key: str, value: float) -> None:
        out.setdefault(key, []).append(value)

    prestart = int(os.environ.get("NOVASANDBOX_BENCH_PRESTART", "0"))

    def wait_prestarted() -> None:
        """Until this worker's VMMs started ahead are all up again (the one a create took
        is replaced in the background): ``prestart`` returns once they are."""
        if Sandbox.prestart(TEMPLATE, prestart) != prestart:
            raise BenchError(f"{prestart} VMMs started ahead did not come up")

    # 1. create (template snapshot restore) one after the other
    if prestart:
        Sandbox.prestart(TEMPLATE, prestart)
    for i in range(args.runs + 1):
        if prestart:
            wait_prestarted()
        first, on_stdout = _first_output()
        t0 = time.perf_counter()
        sb = Sandbox.create(TEMPLATE)
        try:
            t_ready = time.perf_counter()
            res = sb.commands.run("echo hi", on_stdout=on_stdout)
            _check_echo(res.stdout, "first echo")
            if not first or not sb.restored:
                raise BenchError(f"no stdout callback or not restored: {res!r}")
            t1 = time.perf_counter()
            _check_echo(sb.commands.run("echo hi").stdout, "second echo")
            t2 = time.perf_counter()
            timings = dict(sb.timings)
        finally:
            sb.kill()
        if i == 0:
            continue  # warm-up: the worker's first restore pays for imports and caches
        add("create_to_first_output_ms", _ms(first[0] - t0))
        add("create_returns_ms", _ms(t_ready - t0))
        add("second_echo_ms", _ms(t2 - t1))
        for key, value in timings.items():
            add(f"timings_{key}_ms", value)
    if prestart:
        Sandbox.prestart(TEMPLATE, 0)

    # 2. argv true round trip vs the guest's own posix_spawn, in the same sandbox
    for _ in range(args.spawn_sandboxes):
        sb = Sandbox.create(TEMPLATE)
        try:
            if not sb.restored:
                raise BenchError("spawn sandbox not restored")
            trips = []
            for j in range(WARMUP_CALLS + args.spawn_runs):
                t0 = time.perf_counter()
                res = sb.commands.run(["true"])
                t1 = time.perf_counter()
                if res.exit_code != 0:
                    raise BenchError(f"true failed: {res!r}")
                if j >= WARMUP_CALLS:
                    trips.append(_ms(t1 - t0))
            res = sb.commands.run(
                ["python3", "-c", GUEST_SPAWN, str(args.spawn_runs)], max_output=1 << 20
            )
            if res.exit_code != 0:
                raise BenchError(f"guest spawn script failed: {res.stderr[-2000:]!r}")
            guest = json.loads(res.stdout)
            spawns = [float(x) for x in guest["ms"]]
            if len(spawns) != args.spawn_runs:
                raise BenchError(f"guest spawn script gave {len(spawns)} samples")
        finally:
            sb.kill()
        out.setdefault("exec_true_roundtrip_ms", []).extend(trips)
        out.setdefault("guest_posix_spawn_ms", []).extend(spawns)
        add("exec_true_minus_guest_spawn_ms", statistics.median(trips) - float(guest["median_ms"]))

    # 3. pool acquire -> first output
    if args.pool_runs > 0:
        with Pool(TEMPLATE, size=args.pool_size) as pool:
            for i in range(args.pool_runs + 1):
                deadline = time.monotonic() + 120
                while pool.ready < args.pool_size:
                    if time.monotonic() > deadline:
                        raise BenchError(f"the pool did not refill to {args.pool_size}")
                    time.sleep(0.01)
                time.sleep(args.pool_settle)
                first, on_stdout = _first_output()
                t0 = time.perf_counter()
                sb = pool.acquire(timeout=60)
                try:
                    t_acq = time.perf_counter()
                    res = sb.commands.run("echo hi", on_stdout=on_stdout)
                    _check_echo(res.stdout, "pool echo")
                    if not first or not sb.restored:
                        raise BenchError("pool: no stdout callback or not restored")
                finally:
                    sb.kill()
                if i == 0:
                    continue
                add("pool_acquire_to_first_output_ms", _ms(first[0] - t0))
                add("pool_acquire_ms", _ms(t_acq - t0))

    # 4. concurrent creates, each then echo
    async def concurrent(n: int) -> tuple[float, float]:
        live: list[AsyncSandbox] = []
        ready_at: list[float] = []

        async def one() -> float:
            sb = await AsyncSandbox.create(TEMPLATE)
            live.append(sb)
            ready_at.append(time.perf_counter())
            if not sb.restored:
                raise BenchError("concurrent sandbox not restored")
            _check_echo((await sb.commands.run("echo hi")).stdout, "concurrent echo")
            return time.perf_counter()

        try:
            if prestart:  # as many started ahead as the burst
                await AsyncSandbox.prestart(TEMPLATE, n)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            done = [r for r in results if isinstance(r, float)]
            return _ms(max(ready_at) - t0), _ms(max(done) - t0)
        finally:
            if prestart:
                await AsyncSandbox.prestart(TEMPLATE, 0)
            await asyncio.gather(*(sb.kill() for sb in live), return_exceptions=True)

    if args.concurrency > 0:
        all_ready, all_echo = asyncio.run(concurrent(args.concurrency))
        add(f"concurrent{args.concurrency}_all_ready_wall_ms", all_ready)
        add(f"concurrent{args.concurrency}_all_echo_wall_ms", all_echo)

    # 5. memory of idle restored sandboxes, and the template's memory image
    async def memory(count: int) -> list[dict[str, int]]:
        live: list[AsyncSandbox] = []

        async def one() -> None:
            live.append(await AsyncSandbox.create(TEMPLATE))

        try:
            for r in await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True):
                if isinstance(r, BaseException):
                    raise r
            await asyncio.sleep(args.idle)
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
                _check_echo(r.stdout, "echo after idling")
            return rollups
        finally:
            await asyncio.gather(*(sb.kill() for sb in live), return_exceptions=True)

    if args.memory_count > 0:
        rollups = asyncio.run(memory(args.memory_count))
        out["idle_pss_mib"] = [r["Pss"] / 1024 for r in rollups]
        out["idle_rss_mib"] = [r["Rss"] / 1024 for r in rollups]
        out["idle_anon_mib"] = [r.get("Anonymous", 0) / 1024 for r in rollups]

    manager = TemplateManager()
    built = manager.require_built(TEMPLATE)
    tpl = built.template
    snap = template_snapshot(manager, built, tpl.vcpus, tpl.memory_mib, get_provider().engine())
    if snap is None:
        raise BenchError("the template has no snapshot (run: novasandbox template build)")
    st = (snap.directory / "memory.bin").stat()
    out["memory_bin_bytes"] = st.st_size
    out["memory_bin_allocated_bytes"] = st.st_blocks * 512

    left = [i.id for i in Sandbox.list() if i.owner_pid == os.getpid()]
    if left:
        raise BenchError(f"sandboxes left behind: {left}")
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


WORKER_OPTS = (
    "runs",
    "spawn_runs",
    "spawn_sandboxes",
    "pool_runs",
    "pool_size",
    "pool_settle",
    "concurrency",
    "memory_count",
    "idle",
)


def run_side(src: str, cache: str, extra: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=src, NOVASANDBOX_CACHE_DIR=cache)
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        env[key] = value
    argv = [sys.executable, __file__, "--worker"]
    for opt in WORKER_OPTS:
        argv += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the worker unwinds and kills its sandboxes
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        raise SystemExit(f"worker timed out ({src}): {stderr[-3000:]}") from None
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({src}): {stderr[-3000:]}")
    result: dict[str, Any] = json.loads(stdout)
    return result


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--side", action="append", default=[], help="NAME=SRC:CACHE[:VAR=VALUE,...] (repeat)"
    )
    p.add_argument("--rounds", type=int, default=2, help="worker processes per side (2)")
    p.add_argument("--runs", type=int, default=3, help="restores one by one per worker (3)")
    p.add_argument("--spawn-runs", type=int, default=10, help="true round trips and spawns (10)")
    p.add_argument("--spawn-sandboxes", type=int, default=1, help="sandboxes for those (1)")
    p.add_argument("--pool-runs", type=int, default=3, help="pool acquires per worker (3)")
    p.add_argument("--pool-size", type=int, default=2)
    p.add_argument("--pool-settle", type=float, default=0.5, help="s after the pool is full")
    p.add_argument("--concurrency", type=int, default=10, help="concurrent creates (10)")
    p.add_argument("--memory-count", type=int, default=4, help="idle sandboxes per worker (4)")
    p.add_argument("--idle", type=float, default=2.0, help="s idle before reading PSS (2)")
    p.add_argument("--worker-timeout", type=float, default=900.0, help="s per worker (900)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.worker:
        signal.signal(signal.SIGTERM, _on_sigterm)
        print(json.dumps(_worker(args)))
        return 0
    sides: dict[str, tuple[str, str, str]] = {}
    for spec in args.side:
        name, _, rest = spec.partition("=")
        src, _, rest = rest.partition(":")
        cache, _, extra = rest.partition(":")
        if not (name and src and cache):
            p.error(f"--side wants NAME=SRC:CACHE[:VAR=VALUE,...], got {spec!r}")
        sides[name] = (str(Path(src).resolve()), str(Path(cache).resolve()), extra)
    if not sides:
        p.error("give at least one --side")
    load_start = [round(x, 2) for x in os.getloadavg()]
    t_start = time.perf_counter()
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
        "loadavg_start": load_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - t_start, 1),
        "sides": {
            name: {"image": images[name], **{k: summarize(v) for k, v in merged[name].items()}}
            for name in names
        },
    }
    # each side's p50 over the first side's
    a = names[0]
    report["ratio_p50"] = {}
    for b in names[1:]:
        for key in merged[a]:
            base = report["sides"][a][key].get("p50")
            other = report["sides"][b].get(key, {}).get("p50")
            if base and other is not None:
                report["ratio_p50"][f"{b}/{a} {key}"] = round(other / base, 3)
        for key in images[a]:
            report["ratio_p50"][f"{b}/{a} {key}"] = round(images[b][key] / images[a][key], 3)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
