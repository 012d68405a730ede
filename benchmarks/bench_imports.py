"""Start-up as whole processes: ``import novasandbox``, ``from novasandbox import
Sandbox``, ``novasandbox --help`` and ``novasandbox run -- true`` (a local sandbox:
start-up, a restore, one command, the kill), each a new process as a user starts it;
``python -c pass`` is the floor (the interpreter alone).

Usage: .venv/bin/python benchmarks/bench_imports.py [--runs 30] [--vm-runs 10]
       [--base OTHER/src] [--out FILE]

``--base`` times a second source tree (another checkout's ``src``) the same way,
interleaved run by run (A B A B ...), and reports the ratio this/base of each pair (its
p50): the machine's drift cancels out. Both trees are byte-compiled first, as an install
is (with PYTHONDONTWRITEBYTECODE set nothing else writes the .pyc files, and compiling the
sources on each start would be timed instead). Every command must succeed (``--help``
prints the usage, ``run`` exits 0) or the run fails. Prints one JSON document (metrics
with p50/p95/min/max in ms) and writes it to ``--out`` (default
``benchmarks/results/imports-<timestamp>.json``).
"""

from __future__ import annotations

import argparse
import compileall
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import BenchError, host_info, setup_logging, summarize, write_report

SRC = Path(__file__).resolve().parents[1] / "src"


def console_script() -> list[str]:
    """``novasandbox`` as a user runs it: the console script next to this interpreter (it
    imports ``novasandbox_entry`` from PYTHONPATH first), else its module."""
    script = Path(sys.executable).parent / "novasandbox"
    return [str(script)] if script.exists() else [sys.executable, "-m", "novasandbox_entry"]


def commands(vm_runs: int) -> dict[str, tuple[list[str], str | None]]:
    """metric -> (argv, a text its stdout must contain)."""
    cli = console_script()
    found: dict[str, tuple[list[str], str | None]] = {
        "python_pass_ms": ([sys.executable, "-c", "pass"], None),
        "import_novasandbox_ms": ([sys.executable, "-c", "import novasandbox"], None),
        "from_novasandbox_import_Sandbox_ms": (
            [sys.executable, "-c", "from novasandbox import Sandbox"],
            None,
        ),
        "novasandbox_help_ms": ([*cli, "--help"], "Usage: novasandbox"),
        "novasandbox_run_help_ms": ([*cli, "run", "--help"], "Usage: novasandbox run"),
    }
    if vm_runs:
        found["novasandbox_run_true_ms"] = ([*cli, "run", "--", "true"], None)
    return found


def timed(argv: list[str], src: Path, expect: str | None) -> float:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NOVASANDBOX_SERVER", "NOVASANDBOX_API_KEY")
    }
    env["PYTHONPATH"] = str(src)
    t0 = time.perf_counter()
    done = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=300, check=False
    )
    took = (time.perf_counter() - t0) * 1000
    if done.returncode != 0:
        raise BenchError(f"{argv} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    if expect is not None and expect not in done.stdout.decode():
        raise BenchError(f"{argv} printed no {expect!r}: {done.stdout.decode()[:300]!r}")
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs of each start-up")
    parser.add_argument("--vm-runs", type=int, default=10, help="runs of run -- true (0: none)")
    parser.add_argument("--base", type=Path, default=None, help="another tree's src, to compare")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("-v", action="store_true")
    args = parser.parse_args()
    setup_logging(args.v)
    trees = {"this": SRC} | ({"base": args.base.resolve()} if args.base else {})
    for src in trees.values():
        compileall.compile_dir(src, quiet=1)
    cmds = commands(args.vm_runs)
    times: dict[str, dict[str, list[float]]] = {t: {m: [] for m in cmds} for t in trees}
    for name, (argv, expect) in cmds.items():  # warm-up: page cache
        for src in trees.values():
            timed(argv, src, expect)
        runs = args.vm_runs if name == "novasandbox_run_true_ms" else args.runs
        for _ in range(runs):  # interleaved: this, base, this, base, ...
            for tree, src in trees.items():
                times[tree][name].append(timed(argv, src, expect))
    metrics: dict[str, Any] = {m: summarize(v, "ms") for m, v in times["this"].items()}
    report: dict[str, Any] = {
        "host": host_info(),
        "params": vars(args) | {"out": str(args.out), "base": str(args.base), "src": str(SRC)},
        "commands": {m: " ".join(argv) for m, (argv, _) in cmds.items()},
        "metrics": metrics,
    }
    if args.base:
        report["base_metrics"] = {m: summarize(v, "ms") for m, v in times["base"].items()}
        report["ratio_this_over_base"] = {
            m: summarize(
                [a / b for a, b in zip(times["this"][m], times["base"][m], strict=True)], "x"
            )
            for m in cmds
        }
    write_report(report, args.out, "imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
