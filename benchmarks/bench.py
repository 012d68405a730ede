"""NovaSandbox benchmarks: cold create, exec round trips, file throughput, concurrent creates.

Usage::

    .venv/bin/python benchmarks/bench.py [--runs N] [--exec-runs N] [--file-runs N]
                                         [--concurrency N] [--concurrent-rounds N]
                                         [--out FILE] [-v]

Prints one JSON document to stdout and writes it to ``--out`` (default:
``benchmarks/results/bench-<UTC timestamp>.json``). Progress goes to stderr. Every
sandbox is killed before the script returns, also on errors. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import novasandbox
from novasandbox import AsyncSandbox, Sandbox
from novasandbox.vm.qemu import choose_accel, qemu_version

log = logging.getLogger("bench")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FILE_PAYLOAD_BYTES = 20 * 1000 * 1000  # 20 MB (decimal, so MB/s means 10**6 bytes/s)
GUEST_FILE = "/tmp/bench-payload.bin"
EXEC_WARMUP = 3


class BenchError(RuntimeError):
    """A benchmark produced a wrong result (the run is invalid, not just slow)."""


# ---------------------------------------------------------------------------- statistics


def processes_matching(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose command line contains ``text``, read
    from /proc (what ``pgrep -af`` prints, without needing procps)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            found.append((int(entry.name), cmdline.strip()))
    return found


def write_report(report: dict[str, Any], out: Path | None, name: str) -> None:
    """Print the JSON report and write it to ``out`` (default: a timestamped file in
    benchmarks/results/)."""
    text = json.dumps(report, indent=2)
    print(text)
    if out is None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        out = RESULTS_DIR / f"{name}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    log.info("wrote %s", out)


def setup_logging(verbose: bool) -> None:
    """Progress on stderr; the library's own INFO logs only with ``verbose``."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    logging.getLogger("novasandbox").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("qemu").setLevel(logging.WARNING)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of pre-sorted values."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: Sequence[float], unit: str) -> dict[str, Any]:
    s = sorted(values)
    return {
        "unit": unit,
        "n": len(s),
        "p50": round(percentile(s, 0.50), 3),
        "p95": round(percentile(s, 0.95), 3),
        "min": round(s[0], 3),
        "max": round(s[-1], 3),
        "mean": round(sum(s) / len(s), 3),
    }


def ms(seconds: float) -> float:
    return seconds * 1000.0


# ---------------------------------------------------------------------------- benchmarks


def check_echo(result: novasandbox.CommandResult, expected: str = "hi\n") -> None:
    if result.exit_code != 0 or result.stdout != expected:
        raise BenchError(
            f"unexpected command result: exit {result.exit_code}, stdout {result.stdout!r}, "
            f"stderr {result.stderr!r}"
        )


def bench_cold_create(runs: int, metrics: dict[str, Any], extra: dict[str, Any]) -> None:
    """Create -> first stdout chunk of ``echo hi``; then ``kill`` timed on its own."""
    log.info("cold create: 1 warm-up + %d runs", runs)
    first_output, completed, ready, kills = [], [], [], []
    for i in range(runs + 1):
        first: list[float] = []  # when on_stdout first fired (on the library's loop thread)

        def on_stdout(_text: str, first: list[float] = first) -> None:
            if not first:
                first.append(time.perf_counter())

        t0 = time.perf_counter()
        sb = Sandbox.create("python", cold=True)
        try:
            t_ready = time.perf_counter()
            result = sb.commands.run("echo hi", on_stdout=on_stdout)
            t_done = time.perf_counter()
            check_echo(result)
            if not first:
                raise BenchError("echo hi produced no on_stdout callback")
            if i == 0:
                extra["guest_kernel"] = sb.guest_kernel
                extra["sandbox"] = {"vcpus": sb.config.vcpus, "memory_mib": sb.config.memory_mib}
        finally:
            t_kill = time.perf_counter()
            sb.kill()
            t_killed = time.perf_counter()
        if i == 0:  # page cache, imports, the portal thread: not what "cold create" means
            extra["warmup_create_to_first_output_ms"] = round(ms(first[0] - t0), 1)
            continue
        first_output.append(ms(first[0] - t0))
        completed.append(ms(t_done - t0))
        ready.append(ms(t_ready - t0))
        kills.append(ms(t_killed - t_kill))
        log.info("  run %d: first output %.0f ms, kill %.0f ms", i, first_output[-1], kills[-1])
    metrics["cold_create_to_first_output"] = summarize(first_output, "ms")
    metrics["cold_create_to_command_done"] = summarize(completed, "ms")
    metrics["cold_create_ready"] = summarize(ready, "ms")
    metrics["kill"] = summarize(kills, "ms")


def timed_runs(fn: Callable[[], None], runs: int) -> list[float]:
    for _ in range(EXEC_WARMUP):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(ms(time.perf_counter() - t0))
    return out


def bench_exec(sb: Sandbox, runs: int, metrics: dict[str, Any]) -> None:
    log.info("exec round trips: %d runs each (after %d warm-up)", runs, EXEC_WARMUP)

    def run_true() -> None:
        r = sb.commands.run(["true"])
        if r.exit_code != 0:
            raise BenchError(f"`true` exited {r.exit_code}: {r.stderr!r}")

    def run_echo() -> None:
        check_echo(sb.commands.run("echo hi"))

    metrics["exec_true_argv"] = summarize(timed_runs(run_true, runs), "ms")
    metrics["exec_echo_shell"] = summarize(timed_runs(run_echo, runs), "ms")


def bench_files(sb: Sandbox, runs: int, metrics: dict[str, Any]) -> None:
    log.info("file throughput: %d runs of %d bytes", runs, FILE_PAYLOAD_BYTES)
    writes, reads = [], []
    mb = FILE_PAYLOAD_BYTES / 1e6
    for i in range(runs):
        payload = os.urandom(FILE_PAYLOAD_BYTES)
        digest = hashlib.sha256(payload).hexdigest()
        t0 = time.perf_counter()
        size = sb.files.write(GUEST_FILE, payload)
        t1 = time.perf_counter()
        back = sb.files.read(GUEST_FILE, format="bytes")
        t2 = time.perf_counter()
        if size != len(payload):
            raise BenchError(f"write reported {size} bytes, sent {len(payload)}")
        back_digest = hashlib.sha256(back).hexdigest()
        if back_digest != digest:
            raise BenchError(
                f"file round trip corrupted data: sent {len(payload)} bytes sha256 {digest}, "
                f"read back {len(back)} bytes sha256 {back_digest}"
            )
        if i == 0:  # also check what actually landed in the guest, once (not timed)
            guest = sb.commands.run(["sha256sum", GUEST_FILE], check=True).stdout.split()[0]
            if guest != digest:
                raise BenchError(f"guest sha256 {guest} != host sha256 {digest}")
        sb.commands.run(["rm", "-f", GUEST_FILE], check=True)
        writes.append(mb / (t1 - t0))
        reads.append(mb / (t2 - t1))
        log.info("  run %d: write %.1f MB/s, read %.1f MB/s", i + 1, writes[-1], reads[-1])
    metrics["file_write_20MB"] = summarize(writes, "MB/s")
    metrics["file_read_20MB"] = summarize(reads, "MB/s")


def concurrent_threads(count: int) -> tuple[float, list[float]]:
    """``count`` threads each create a sync Sandbox and run echo; all killed afterwards."""
    live: list[Sandbox] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def one() -> float:
        sb = Sandbox.create("python", cold=True)
        with lock:
            live.append(sb)
        check_echo(sb.commands.run("echo hi"))
        return ms(time.perf_counter() - t0)

    try:
        with ThreadPoolExecutor(max_workers=count) as pool:
            futures = [pool.submit(one) for _ in range(count)]
            ready = [f.result() for f in futures]  # re-raises the first failure
        wall = ms(time.perf_counter() - t0)
    finally:
        with ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(lambda sb: sb.kill(), live))
    return wall, ready


async def concurrent_async(count: int) -> tuple[float, list[float]]:
    """``count`` AsyncSandboxes created at once with asyncio.gather; all killed afterwards."""
    live: list[AsyncSandbox] = []
    t0 = time.perf_counter()

    async def one() -> float:
        sb = await AsyncSandbox.create("python", cold=True)
        live.append(sb)
        check_echo(await sb.commands.run("echo hi"))
        return ms(time.perf_counter() - t0)

    try:
        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        wall = ms(time.perf_counter() - t0)
    finally:
        await asyncio.gather(*(sb.kill() for sb in live), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return wall, [r for r in results if isinstance(r, float)]


def bench_concurrent(count: int, rounds: int, metrics: dict[str, Any]) -> None:
    for name, runner in (
        ("threads", lambda: concurrent_threads(count)),
        ("asyncio", lambda: asyncio.run(concurrent_async(count))),
    ):
        walls, ready = [], []
        for r in range(rounds):
            log.info("concurrent create (%s): %d sandboxes, round %d", name, count, r + 1)
            wall, per_sandbox = runner()
            walls.append(wall)
            ready.extend(per_sandbox)
            log.info("  all %d ready in %.0f ms", count, wall)
        metrics[f"concurrent{count}_{name}_wall"] = summarize(walls, "ms")
        metrics[f"concurrent{count}_{name}_per_sandbox_ready"] = summarize(ready, "ms")


# ---------------------------------------------------------------------------- main


def host_info() -> dict[str, Any]:
    accel = choose_accel()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "novasandbox": novasandbox.__version__,
        "qemu": qemu_version(),
        "accelerator": {"name": accel.name, "reason": accel.reason},
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10, help="cold create runs (default 10)")
    p.add_argument("--exec-runs", type=int, default=50, help="exec round trips (default 50)")
    p.add_argument("--file-runs", type=int, default=3, help="20 MB file round trips (default 3)")
    p.add_argument("--concurrency", type=int, default=10, help="sandboxes created at once")
    p.add_argument("--concurrent-rounds", type=int, default=1, help="rounds per API (default 1)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: results/...)")
    p.add_argument("-v", "--verbose", action="store_true", help="library logs too")
    args = p.parse_args(argv)
    for name in ("runs", "exec_runs", "file_runs", "concurrency", "concurrent_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)

    started = time.perf_counter()
    report: dict[str, Any] = {"host": host_info()}
    report["params"] = {
        "template": "python",
        "cold_runs": args.runs,
        "exec_runs": args.exec_runs,
        "file_runs": args.file_runs,
        "file_payload_bytes": FILE_PAYLOAD_BYTES,
        "concurrency": args.concurrency,
        "concurrent_rounds": args.concurrent_rounds,
    }
    metrics: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    report["metrics"] = metrics
    report["extra"] = extra

    bench_cold_create(args.runs, metrics, extra)
    log.info("starting the sandbox for exec and file benchmarks")
    with Sandbox.create("python") as sb:
        bench_exec(sb, args.exec_runs, metrics)
        bench_files(sb, args.file_runs, metrics)
    bench_concurrent(args.concurrency, args.concurrent_rounds, metrics)

    report["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["total_wall_s"] = round(time.perf_counter() - started, 1)
    write_report(report, args.out, "bench")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
