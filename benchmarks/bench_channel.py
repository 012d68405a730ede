"""Agent channel benchmarks: small round trips, stdout and file throughput, create.

    .venv/bin/python benchmarks/bench_channel.py [--rounds 40] [--big-rounds 3] [--creates 8]
                                                 [--out FILE] [-v]

One restored sandbox (``Sandbox.create()``), then, each after untimed warm-up calls:
``run(["true"])``, ``files.exists``, a small ``files.read`` (``--rounds`` each); 256 MiB
of stdout with and without an ``on_stdout`` callback, a 64 MiB ``files.write`` and
``files.read`` back (``--big-rounds`` each); then ``--creates`` creates, one at a time,
timed to the first output of ``echo hi``. Only the public API, so that it also runs
against an older library (``PYTHONPATH=/other/src``). Prints a JSON report and writes it
to benchmarks/results/.
"""

from __future__ import annotations

import argparse
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
from bench import BenchError, check_echo, host_info, ms, setup_logging, summarize, write_report

import novasandbox
from novasandbox import Sandbox

log = logging.getLogger("bench")

STDOUT_BYTES = 256 * 1024 * 1024
FILE_BYTES = 64 * 1024 * 1024
BIG_FILE = "/home/user/big"  # the ext4 root disk, not /tmp (RAM)
WARMUP = 10  # untimed calls before each latency series (TCG translates the path first)


def latencies(fn: Callable[[], None], rounds: int) -> dict[str, Any]:
    for _ in range(WARMUP):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(ms(time.perf_counter() - t0))
    return summarize(out, "ms")


def bench_small(sb: Sandbox, rounds: int, metrics: dict[str, Any]) -> None:
    log.info("small round trips: %d each", rounds)
    os_release = sb.files.read("/etc/os-release")

    def run_true() -> None:
        if sb.commands.run(["true"]).exit_code != 0:
            raise BenchError("`true` failed")

    def exists() -> None:
        if not sb.files.exists("/etc/hostname"):
            raise BenchError("/etc/hostname does not exist")

    def read_small() -> None:
        if sb.files.read("/etc/os-release") != os_release:
            raise BenchError("/etc/os-release changed between reads")

    metrics["exec_true_argv"] = latencies(run_true, rounds)
    metrics["files_exists"] = latencies(exists, rounds)
    metrics["files_read_small"] = latencies(read_small, rounds)


def bench_stdout(sb: Sandbox, rounds: int, metrics: dict[str, Any]) -> None:
    log.info("stdout throughput: %d x %d bytes, without and with a callback", rounds, STDOUT_BYTES)
    argv = ["head", "-c", str(STDOUT_BYTES), "/dev/zero"]
    plain: list[float] = []
    callback: list[float] = []
    sb.commands.run(["head", "-c", str(STDOUT_BYTES // 16), "/dev/zero"], max_output=0)  # warm-up
    for _ in range(rounds):  # interleaved, so that drift hits both
        for out, on_stdout in ((plain, None), (callback, lambda _t: None)):
            t0 = time.perf_counter()
            r = sb.commands.run(argv, max_output=1 << 20, on_stdout=on_stdout)
            seconds = time.perf_counter() - t0
            if r.exit_code != 0 or len(r.stdout) + r.stdout_dropped != STDOUT_BYTES:
                raise BenchError(f"head: exit {r.exit_code}, {len(r.stdout)}+{r.stdout_dropped}")
            out.append(STDOUT_BYTES / 1e6 / seconds)
    metrics["stdout_256MiB"] = summarize(plain, "MB/s")
    metrics["stdout_256MiB_callback"] = summarize(callback, "MB/s")


def bench_files(sb: Sandbox, rounds: int, metrics: dict[str, Any]) -> None:
    log.info("files: %d x write + read of %d bytes to %s", rounds, FILE_BYTES, BIG_FILE)
    writes, reads = [], []
    sb.files.write(BIG_FILE, os.urandom(FILE_BYTES // 16))  # warm-up
    sb.files.read(BIG_FILE, format="bytes")
    for _ in range(rounds):
        payload = os.urandom(FILE_BYTES)
        t0 = time.perf_counter()
        size = sb.files.write(BIG_FILE, payload)
        t1 = time.perf_counter()
        back = sb.files.read(BIG_FILE, format="bytes")
        t2 = time.perf_counter()
        if size != FILE_BYTES or hashlib.sha256(back).digest() != hashlib.sha256(payload).digest():
            raise BenchError(f"file round trip: wrote {size}, read back {len(back)} bytes")
        del payload, back
        sb.commands.run(["rm", "-f", BIG_FILE], check=True)
        writes.append(FILE_BYTES / 1e6 / (t1 - t0))
        reads.append(FILE_BYTES / 1e6 / (t2 - t1))
    metrics["files_write_64MiB"] = summarize(writes, "MB/s")
    metrics["files_read_64MiB"] = summarize(reads, "MB/s")


def bench_create(creates: int, metrics: dict[str, Any]) -> None:
    log.info("create -> first output of echo hi: %d creates", creates)
    ready, first_output = [], []
    for _ in range(creates):
        first: list[float] = []

        def on_stdout(_text: str, first: list[float] = first) -> None:
            if not first:
                first.append(time.perf_counter())

        t0 = time.perf_counter()
        with Sandbox.create() as sb:
            t_ready = time.perf_counter()
            check_echo(sb.commands.run("echo hi", on_stdout=on_stdout))
        if not first:
            raise BenchError("echo hi produced no on_stdout callback")
        ready.append(ms(t_ready - t0))
        first_output.append(ms(first[0] - t0))
    metrics["create_ready"] = summarize(ready, "ms")
    metrics["create_to_first_output"] = summarize(first_output, "ms")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40, help="small round trips (default 40)")
    p.add_argument("--big-rounds", type=int, default=3, help="stdout/file transfers (default 3)")
    p.add_argument("--creates", type=int, default=8, help="creates timed (default 8)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: results/...)")
    p.add_argument("-v", "--verbose", action="store_true", help="library logs too")
    args = p.parse_args(argv)
    for name in ("rounds", "big_rounds", "creates"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    started = time.perf_counter()
    report: dict[str, Any] = {"host": host_info()}
    report["host"]["library"] = str(Path(novasandbox.__file__).parent)
    report["params"] = vars(args) | {"out": str(args.out)}
    metrics: dict[str, Any] = {}
    report["metrics"] = metrics

    with Sandbox.create() as sb:
        for _ in range(3):
            check_echo(sb.commands.run("echo hi"))
        bench_small(sb, args.rounds, metrics)
        bench_stdout(sb, args.big_rounds, metrics)
        bench_files(sb, args.big_rounds, metrics)
    bench_create(args.creates, metrics)

    report["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["total_wall_s"] = round(time.perf_counter() - started, 1)
    write_report(report, args.out, "bench-channel")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
