"""NovaSandbox snapshot benchmarks: restore, pool, concurrency, memory, snapshots, fork.

Restore vs cold boot vs pool acquire (-> first output), concurrent restores, host memory
per idle sandbox, snapshot size and save time, fork; compared with the issue's targets.

Usage::

    .venv/bin/python benchmarks/bench_snapshots.py [--runs N] [--pool-size N]
        [--pool-settle S] [--concurrency 10,50] [--concurrent-rounds N] [--memory-count N]
        [--memory-cold N] [--idle S] [--snapshot-runs N] [--fork-runs N]
        [--fork-children N] [--out FILE] [-v]

Prints one JSON document to stdout and writes it to ``--out`` (default:
``benchmarks/results/bench-snapshots-<UTC timestamp>.json``). Progress goes to stderr.
Every sandbox is killed before the script returns, also on errors; at the end the script
checks that no QEMU process of its own is left (exit status 1 if one is). Reuses the
statistics helpers of ``bench.py`` (run it as a script: its directory is then on
``sys.path``). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# bench.py lives beside this script; running a script puts its directory on sys.path.
from bench import (
    BenchError,
    check_echo,
    host_info,
    ms,
    processes_matching,
    setup_logging,
    summarize,
    write_report,
)

from novasandbox import AsyncSandbox, Pool, Sandbox, TemplateManager, delete_snapshot
from novasandbox.snapshots import template_snapshot
from novasandbox.vm import get_provider

log = logging.getLogger("bench")

TEMPLATE = "python"
USER_FILE_BYTES = 1000 * 1000  # 1 MB written before each user snapshot
USER_FILE = "/home/user/bench-snapshot-1MB.bin"  # on the root disk (ext4), not on tmpfs
FORK_MARKER = "/home/user/bench-fork-marker"
MIB = 1024 * 1024

OURS: set[str] = set()
"""Ids of every sandbox this script got hold of (for the leftover check at the end)."""


class FirstOutput:
    """An ``on_stdout`` callback that remembers when it first fired (on the loop thread)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, _text: str) -> None:
        if self.at is None:
            self.at = time.perf_counter()

    def since(self, t0: float) -> float:
        if self.at is None:
            raise BenchError("echo hi produced no on_stdout callback")
        return ms(self.at - t0)


def expect_restored(sb: Sandbox | AsyncSandbox, restored: bool) -> None:
    if sb.restored != restored:
        want, got = ("a restore", "a cold boot") if restored else ("a cold boot", "a restore")
        raise BenchError(f"sandbox {sb.id}: expected {want}, got {got}")


# ---------------------------------------------------------------------------- 1. create


def timed_echo(sb: Sandbox) -> float:
    """One more ``echo hi`` in the same sandbox: what a command costs once the guest has
    run one (with TCG the first one after a restore is slower, probably because QEMU's
    translated-code cache starts empty: it is not part of a snapshot)."""
    t0 = time.perf_counter()
    check_echo(sb.commands.run("echo hi"))
    return ms(time.perf_counter() - t0)


def bench_create(mode: str, runs: int, metrics: dict[str, Any], extra: dict[str, Any]) -> None:
    """``Sandbox.create`` (cold or restore) -> first stdout of ``echo hi``; kill untimed."""
    cold = mode == "cold"
    log.info("%s create: 1 warm-up + %d runs", mode, runs)
    first_output, ready, done, kills, seconds = [], [], [], [], []
    phases: dict[str, list[float]] = {}
    for i in range(runs + 1):
        first = FirstOutput()
        t0 = time.perf_counter()
        sb = Sandbox.create(TEMPLATE, cold=cold)
        OURS.add(sb.id)
        try:
            t_ready = time.perf_counter()
            result = sb.commands.run("echo hi", on_stdout=first)
            t_done = time.perf_counter()
            check_echo(result)
            expect_restored(sb, not cold)
            fo = first.since(t0)
            timings = dict(sb.timings)  # the library's own start-up steps (ms)
            second = timed_echo(sb)
        finally:
            t_kill = time.perf_counter()
            sb.kill()
            t_killed = time.perf_counter()
        if i == 0:
            extra[f"{mode}_warmup_create_to_first_output_ms"] = round(fo, 1)
            continue
        first_output.append(fo)
        ready.append(ms(t_ready - t0))
        done.append(ms(t_done - t0))
        kills.append(ms(t_killed - t_kill))
        seconds.append(second)
        steps = ["vmm_started", "agent_connected", "agent_answered", "ready"]
        previous = 0.0
        for step in steps:
            phases.setdefault(step, []).append(timings[step] - previous)
            previous = timings[step]
        phases.setdefault("first_command", []).append(fo - ms(t_ready - t0))
        log.info("  run %d: ready %.0f ms, first output %.0f ms", i, ready[-1], fo)
    metrics[f"{mode}_create_to_first_output"] = summarize(first_output, "ms")
    metrics[f"{mode}_create_ready"] = summarize(ready, "ms")
    metrics[f"{mode}_create_to_command_done"] = summarize(done, "ms")
    metrics[f"{mode}_second_echo"] = summarize(seconds, "ms")
    metrics[f"{mode}_kill"] = summarize(kills, "ms")
    # where the time goes: each step since the one before (vmm_started counts from the
    # start of the boot: overlay copy + QEMU exec; agent_connected: QEMU listening;
    # agent_answered: memory image loaded or kernel booted, plus the guest's handshake)
    for step, values in phases.items():
        metrics[f"{mode}_phase_{step}"] = summarize(values, "ms")


def wait_pool_full(pool: Pool, size: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pool.ready < size:
        if time.monotonic() > deadline:
            raise BenchError(f"the pool did not refill to {size} in {timeout:.0f} s")
        time.sleep(0.01)


def bench_pool(
    runs: int, size: int, settle: float, metrics: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Full pool -> ``acquire()`` -> first stdout of ``echo hi``; kill and refill untimed."""
    log.info("pool (size %d): 1 warm-up + %d acquires", size, runs)
    first_output, acquire, done, seconds = [], [], [], []
    t_start = time.perf_counter()
    with Pool(TEMPLATE, size=size) as pool:
        wait_pool_full(pool, size, 120)
        extra["pool_initial_fill_ms"] = round(ms(time.perf_counter() - t_start), 1)
        for i in range(runs + 1):
            wait_pool_full(pool, size, 60)
            time.sleep(settle)  # let the last refill's restore finish its own work
            first = FirstOutput()
            t0 = time.perf_counter()
            sb = pool.acquire(timeout=60)
            t_acquired = time.perf_counter()
            OURS.add(sb.id)
            try:
                result = sb.commands.run("echo hi", on_stdout=first)
                t_done = time.perf_counter()
                check_echo(result)
                expect_restored(sb, True)
                fo = first.since(t0)
                second = timed_echo(sb)
            finally:
                sb.kill()
            if i == 0:
                extra["pool_warmup_acquire_to_first_output_ms"] = round(fo, 1)
                continue
            first_output.append(fo)
            acquire.append(ms(t_acquired - t0))
            done.append(ms(t_done - t0))
            seconds.append(second)
            log.info("  run %d: acquire %.2f ms, first output %.1f ms", i, acquire[-1], fo)
    metrics["pool_acquire_to_first_output"] = summarize(first_output, "ms")
    metrics["pool_acquire"] = summarize(acquire, "ms")
    metrics["pool_acquire_to_command_done"] = summarize(done, "ms")
    metrics["pool_second_echo"] = summarize(seconds, "ms")


# ---------------------------------------------------------------------------- 2. concurrent


async def kill_all(sandboxes: Sequence[AsyncSandbox]) -> None:
    results = await asyncio.gather(*(sb.kill() for sb in sandboxes), return_exceptions=True)
    for sb, r in zip(sandboxes, results, strict=True):
        if isinstance(r, BaseException):
            log.error("could not kill sandbox %s: %r", sb.id, r)


def first_failure(results: Sequence[object]) -> None:
    for r in results:
        if isinstance(r, BaseException):
            raise r


async def concurrent_restores(count: int) -> tuple[float, float, list[float], list[float]]:
    """``count`` ``AsyncSandbox.create()`` under one gather, each then runs ``echo hi``.
    Returns (wall all ready, wall all answered, per-sandbox ready, per-sandbox answered)."""
    live: list[AsyncSandbox] = []
    t0 = time.perf_counter()

    async def one() -> tuple[float, float]:
        sb = await AsyncSandbox.create(TEMPLATE)
        t_ready = time.perf_counter()
        live.append(sb)
        OURS.add(sb.id)
        expect_restored(sb, True)
        check_echo(await sb.commands.run("echo hi"))
        return ms(t_ready - t0), ms(time.perf_counter() - t0)

    try:
        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        wall = ms(time.perf_counter() - t0)
    finally:
        await kill_all(live)
    first_failure(results)
    pairs = [r for r in results if isinstance(r, tuple)]
    ready = [p[0] for p in pairs]
    answered = [p[1] for p in pairs]
    return max(ready), wall, ready, answered


def bench_concurrent(counts: Sequence[int], rounds: int, metrics: dict[str, Any]) -> None:
    for count in counts:
        walls_ready, walls, ready, answered = [], [], [], []
        for r in range(rounds):
            log.info("concurrent restores: %d at once, round %d", count, r + 1)
            w_ready, wall, per_ready, per_answered = asyncio.run(concurrent_restores(count))
            walls_ready.append(w_ready)
            walls.append(wall)
            ready.extend(per_ready)
            answered.extend(per_answered)
            log.info("  all ready in %.0f ms, all answered echo in %.0f ms", w_ready, wall)
        metrics[f"concurrent{count}_restore_wall"] = summarize(walls, "ms")
        metrics[f"concurrent{count}_restore_wall_all_ready"] = summarize(walls_ready, "ms")
        metrics[f"concurrent{count}_restore_per_sandbox_ready"] = summarize(ready, "ms")
        metrics[f"concurrent{count}_restore_per_sandbox_echo"] = summarize(answered, "ms")


# ---------------------------------------------------------------------------- 3. memory


def smaps_rollup(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/smaps_rollup (Rss, Pss, Private_Dirty, ...)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name.strip()] = int(parts[0])
    return fields


async def idle_memory(count: int, cold: bool, idle_s: float) -> list[dict[str, int]]:
    """Start ``count`` sandboxes at once, let them idle, read each QEMU's smaps_rollup."""
    live: list[AsyncSandbox] = []

    async def one() -> None:
        sb = await AsyncSandbox.create(TEMPLATE, cold=cold)
        live.append(sb)
        OURS.add(sb.id)
        expect_restored(sb, not cold)

    try:
        first_failure(await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True))
        await asyncio.sleep(idle_s)
        pids = {info.id: info.pid for info in await AsyncSandbox.list()}
        rollups = []
        for sb in live:
            pid = pids.get(sb.id)
            if pid is None:
                raise BenchError(f"sandbox {sb.id} is not in Sandbox.list() (or has no pid)")
            rollups.append(smaps_rollup(pid))
        # still alive and answering after the measurement (not timed)
        for r in await asyncio.gather(*(sb.commands.run("echo hi") for sb in live)):
            check_echo(r)
        return rollups
    finally:
        await kill_all(live)


def bench_memory(count: int, cold_count: int, idle_s: float, metrics: dict[str, Any]) -> None:
    for mode, n in (("restored", count), ("cold", cold_count)):
        if n < 1:
            continue
        log.info("memory: %d %s sandboxes, idle %.1f s", n, mode, idle_s)
        rollups = asyncio.run(idle_memory(n, mode == "cold", idle_s))
        pss = [r["Pss"] / 1024 for r in rollups]
        rss = [r["Rss"] / 1024 for r in rollups]
        uss = [(r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)) / 1024 for r in rollups]
        metrics[f"memory_{mode}_pss"] = summarize(pss, "MiB")
        metrics[f"memory_{mode}_rss"] = summarize(rss, "MiB")
        metrics[f"memory_{mode}_private"] = summarize(uss, "MiB")
        log.info(
            "  PSS p50 %.1f MiB, RSS p50 %.1f MiB",
            metrics[f"memory_{mode}_pss"]["p50"],
            metrics[f"memory_{mode}_rss"]["p50"],
        )


# ---------------------------------------------------------------------------- 4. snapshots


def file_sizes(directory: Path) -> dict[str, int]:
    out = {}
    for name in ("memory.bin", "disk.qcow2"):
        st = (directory / name).stat()
        out[f"{name}_bytes"] = st.st_size
        out[f"{name}_allocated_bytes"] = st.st_blocks * 512
    return out


def template_snapshot_info() -> dict[str, Any]:
    manager = TemplateManager()
    built = manager.require_built(TEMPLATE)
    tpl = built.template
    engine = get_provider().engine()
    snap = template_snapshot(manager, built, tpl.vcpus, tpl.memory_mib, engine)
    if snap is None:
        raise BenchError(
            f"template {TEMPLATE!r} has no snapshot for {engine.accel} "
            f"(run: novasandbox template build {TEMPLATE})"
        )
    return {
        "id": snap.id,
        "vcpus": snap.vcpus,
        "memory_mib": snap.memory_mib,
        "size_bytes": snap.size_bytes,
        "save_seconds": snap.save_seconds,
        **file_sizes(snap.directory),
    }


def bench_user_snapshots(runs: int, metrics: dict[str, Any], extra: dict[str, Any]) -> None:
    """Write 1 MB to the root disk, then time ``sb.snapshot()``; each snapshot is restored
    once (create -> first output, and the file checked), then deleted."""
    log.info("user snapshots: 1 warm-up + %d runs", runs)
    took, saved, sizes, restores = [], [], [], []
    payload = os.urandom(USER_FILE_BYTES)
    digest = hashlib.sha256(payload).hexdigest()
    with Sandbox.create(TEMPLATE) as sb:
        OURS.add(sb.id)
        sb.files.write(USER_FILE, payload)
        guest = sb.commands.run(["sha256sum", USER_FILE], check=True).stdout.split()[0]
        if guest != digest:
            raise BenchError(f"guest sha256 {guest} != host sha256 {digest}")
        for i in range(runs + 1):
            t0 = time.perf_counter()
            snap = sb.snapshot()
            t1 = time.perf_counter()
            try:
                files = file_sizes(snap.directory)
                on_disk = files["memory.bin_bytes"] + files["disk.qcow2_bytes"]
                if on_disk != snap.size_bytes:
                    log.warning(
                        "snapshot %s: size_bytes %d, files %d", snap.id, snap.size_bytes, on_disk
                    )
                first = FirstOutput()
                t2 = time.perf_counter()
                with Sandbox.create(from_snapshot=snap) as child:
                    OURS.add(child.id)
                    check_echo(child.commands.run("echo hi", on_stdout=first))
                    restore_ms = first.since(t2)
                    expect_restored(child, True)
                    back = child.commands.run(["sha256sum", USER_FILE], check=True).stdout
                    if back.split()[0] != digest:
                        raise BenchError(f"restored snapshot has a different {USER_FILE}")
            finally:
                delete_snapshot(snap)
            if snap.directory.exists():
                raise BenchError(f"delete_snapshot left {snap.directory}")
            if i == 0:
                extra["user_snapshot_warmup_ms"] = round(ms(t1 - t0), 1)
                extra["user_snapshot_files"] = files
                continue
            took.append(ms(t1 - t0))
            saved.append(snap.save_seconds * 1000)
            sizes.append(on_disk / MIB)
            restores.append(restore_ms)
            log.info("  run %d: snapshot() %.0f ms, %.1f MiB", i, took[-1], sizes[-1])
        # the sandbox keeps running after its snapshots
        check_echo(sb.commands.run("echo hi"))
    metrics["user_snapshot_call"] = summarize(took, "ms")
    metrics["user_snapshot_save_seconds_field"] = summarize(saved, "ms")
    metrics["user_snapshot_size"] = summarize(sizes, "MiB")
    metrics["user_snapshot_restore_to_first_output"] = summarize(restores, "ms")


# ---------------------------------------------------------------------------- 5. fork


async def fork_runs(runs: int, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"fork": [], "all_echo": [], "leftover_snapshots": []}
    parent = await AsyncSandbox.create(TEMPLATE)
    OURS.add(parent.id)
    try:
        await parent.files.write(FORK_MARKER, "forked\n")
        for i in range(runs + 1):
            children: list[AsyncSandbox] = []
            t0 = time.perf_counter()
            try:
                children = await parent.fork(n)
                t_forked = time.perf_counter()
                OURS.update(c.id for c in children)
                for r in await asyncio.gather(*(c.commands.run("echo hi") for c in children)):
                    check_echo(r)
                t_all = time.perf_counter()
                for c in children:  # each child continues from the parent's state
                    expect_restored(c, True)
                    check_echo(await c.commands.run(["cat", FORK_MARKER]), "forked\n")
            finally:
                await kill_all(children)
            snap = children[0].source_snapshot if children else None
            leftover = snap is not None and snap.directory.exists()
            if leftover:
                log.warning("fork snapshot %s still exists after its children were killed", snap)
            if i == 0:
                continue
            out["fork"].append(ms(t_forked - t0))
            out["all_echo"].append(ms(t_all - t0))
            out["leftover_snapshots"].append(float(leftover))
            log.info(
                "  run %d: fork(%d) %.0f ms, all echo %.0f ms",
                *(i, n, out["fork"][-1], out["all_echo"][-1]),
            )
        check_echo(await parent.commands.run("echo hi"))
    finally:
        await parent.kill()
    return out


def bench_fork(runs: int, n: int, metrics: dict[str, Any], extra: dict[str, Any]) -> None:
    log.info("fork(%d): 1 warm-up + %d runs", n, runs)
    out = asyncio.run(fork_runs(runs, n))
    metrics[f"fork{n}_call"] = summarize(out["fork"], "ms")
    metrics[f"fork{n}_to_all_echo"] = summarize(out["all_echo"], "ms")
    extra["fork_snapshots_left_after_kill"] = int(sum(out["leftover_snapshots"]))


# ---------------------------------------------------------------------------- targets


def target(value: float | None, limit: float, **more: Any) -> dict[str, Any]:
    return {
        "target_ms": limit,
        "value_ms": value,
        "met": None if value is None else value <= limit,
        **more,
    }


def targets(metrics: dict[str, Any]) -> dict[str, Any]:
    def p50(name: str) -> float | None:
        m = metrics.get(name)
        return None if m is None else m["p50"]

    c10 = metrics.get("concurrent10_restore_wall")
    return {
        "restore_create_to_first_output_p50": target(p50("restore_create_to_first_output"), 100),
        "pool_acquire_to_first_output_p50": target(
            p50("pool_acquire_to_first_output"), 10, acquire_alone_p50_ms=p50("pool_acquire")
        ),
        "concurrent10_restores_all_ready": target(
            p50("concurrent10_restore_wall"),
            1000,
            measured="p50 over rounds of: start -> all 10 ready and answered echo",
            worst_round_ms=None if c10 is None else c10["max"],
            all_ready_without_echo_p50_ms=p50("concurrent10_restore_wall_all_ready"),
        ),
    }


# ---------------------------------------------------------------------------- main


def our_qemu_processes() -> list[str]:
    """``pid command line`` of the QEMU processes of this process's sandboxes (children
    or by id)."""
    ours = []
    for pid, cmdline in processes_matching("qemu-system"):
        line = f"{pid} {cmdline}"
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            ppid = -1
        if ppid == os.getpid() or any(f"novasandbox-{sid}" in line for sid in OURS):
            ours.append(line)
    return ours


def parse_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from exc
    if any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError("concurrency levels must be at least 1")
    return counts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="runs per create mode (default 20)")
    p.add_argument("--pool-size", type=int, default=2, help="Pool size (default 2)")
    p.add_argument(
        "--pool-settle", type=float, default=0.5, help="s to wait once the pool is full (0.5)"
    )
    p.add_argument(
        "--concurrency", type=parse_counts, default=[10, 50], help='levels (default "10,50")'
    )
    p.add_argument("--concurrent-rounds", type=int, default=3, help="rounds per level (3)")
    p.add_argument("--memory-count", type=int, default=10, help="restored sandboxes (10)")
    p.add_argument("--memory-cold", type=int, default=3, help="cold-booted sandboxes (3)")
    p.add_argument("--idle", type=float, default=2.0, help="idle s before reading memory (2)")
    p.add_argument("--snapshot-runs", type=int, default=5, help="user snapshots (default 5)")
    p.add_argument("--fork-runs", type=int, default=3, help="fork runs (default 3)")
    p.add_argument("--fork-children", type=int, default=3, help="children per fork (3)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: results/...)")
    p.add_argument("-v", "--verbose", action="store_true", help="library logs too")
    args = p.parse_args(argv)
    for name in (
        "runs",
        "pool_size",
        "concurrent_rounds",
        "memory_count",
        "snapshot_runs",
        "fork_runs",
        "fork_children",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.memory_cold < 0 or args.idle < 0 or args.pool_settle < 0:
        p.error("--memory-cold, --idle and --pool-settle cannot be negative")
    return args


def run_all(args: argparse.Namespace, report: dict[str, Any]) -> None:
    metrics: dict[str, Any] = report["metrics"]
    extra: dict[str, Any] = report["extra"]
    steps: list[tuple[str, Callable[[], object]]] = [
        ("cold", lambda: bench_create("cold", args.runs, metrics, extra)),
        ("restore", lambda: bench_create("restore", args.runs, metrics, extra)),
        ("pool", lambda: bench_pool(args.runs, args.pool_size, args.pool_settle, metrics, extra)),
        ("concurrent", lambda: bench_concurrent(args.concurrency, args.concurrent_rounds, metrics)),
        ("memory", lambda: bench_memory(args.memory_count, args.memory_cold, args.idle, metrics)),
        ("snapshots", lambda: bench_user_snapshots(args.snapshot_runs, metrics, extra)),
        ("fork", lambda: bench_fork(args.fork_runs, args.fork_children, metrics, extra)),
    ]
    timings: dict[str, float] = {}
    extra["section_wall_s"] = timings
    extra["template_snapshot"] = template_snapshot_info()
    for name, step in steps:
        t0 = time.perf_counter()
        step()
        timings[name] = round(time.perf_counter() - t0, 1)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)

    started = time.perf_counter()
    host = host_info()
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        host["mem_total_mib"] = int(meminfo[0].split()[1]) // 1024
    report: dict[str, Any] = {"host": host}
    report["params"] = {
        "template": TEMPLATE,
        "runs": args.runs,
        "pool_size": args.pool_size,
        "pool_settle_s": args.pool_settle,
        "concurrency": args.concurrency,
        "concurrent_rounds": args.concurrent_rounds,
        "memory_count": args.memory_count,
        "memory_cold": args.memory_cold,
        "idle_s": args.idle,
        "snapshot_runs": args.snapshot_runs,
        "user_file_bytes": USER_FILE_BYTES,
        "fork_runs": args.fork_runs,
        "fork_children": args.fork_children,
    }
    report["metrics"] = {}
    report["extra"] = {}
    try:
        run_all(args, report)
    finally:
        leftovers = our_qemu_processes()
        if leftovers:
            log.error("QEMU processes of this run are still alive: %s", leftovers)
    report["targets"] = targets(report["metrics"])
    report["extra"]["leftover_qemu_processes"] = leftovers
    report["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["total_wall_s"] = round(time.perf_counter() - started, 1)
    write_report(report, args.out, "bench-snapshots")
    return 1 if leftovers else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
