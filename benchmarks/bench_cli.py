"""The CLI as a whole process: ``novasandbox run -- true`` (start-up, a restore, one
command, the kill) and stdin streamed through ``novasandbox run -- sha256sum``.

Usage: .venv/bin/python benchmarks/bench_cli.py [--runs 10] [--mb 32] [--out FILE]

Prints one JSON document (metrics with p50/p95) and writes it to ``--out`` (default
``benchmarks/results/cli-<timestamp>.json``). Every run is a separate process, as a user
starts it; the checksum the guest computes must match what was sent, or the run fails.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import BenchError, host_info, setup_logging, summarize, write_report

CLI = [sys.executable, "-m", "novasandbox.cli"]


def timed(argv: list[str], data: bytes | None = None) -> tuple[float, str]:
    t0 = time.monotonic()
    done = subprocess.run(
        argv,
        input=data,
        stdin=None if data is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
    )
    took = time.monotonic() - t0
    if done.returncode != 0:
        raise BenchError(f"{argv} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return took, done.stdout.decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--mb", type=int, default=32, help="MB piped into the command")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("-v", action="store_true")
    args = parser.parse_args()
    setup_logging(args.v)
    timed([*CLI, "run", "--", "true"])  # warm-up: page cache, bytecode
    true_s, pipe_mbps, pipe_s = [], [], []
    payload = os.urandom(args.mb * 1_000_000)
    digest = hashlib.sha256(payload).hexdigest()
    for _ in range(args.runs):  # interleaved
        took, _ = timed([*CLI, "run", "--", "true"])
        true_s.append(took * 1000)
        took, out = timed([*CLI, "run", "--", "sha256sum"], payload)
        if out.split()[:1] != [digest]:
            raise BenchError(f"the guest's checksum differs: {out!r}")
        pipe_s.append(took * 1000)
        pipe_mbps.append(args.mb / took)
    metrics: dict[str, Any] = {
        "cli_run_true_ms": summarize(true_s, "ms"),
        f"cli_pipe_{args.mb}MB_sha256sum_ms": summarize(pipe_s, "ms"),
        f"cli_pipe_{args.mb}MB_MBps_whole_process": summarize(pipe_mbps, "MB/s"),
    }
    report = {
        "host": host_info(),
        "params": vars(args) | {"out": str(args.out)},
        "metrics": metrics,
    }
    write_report(report, args.out, "cli")
    return 0


if __name__ == "__main__":
    sys.exit(main())
