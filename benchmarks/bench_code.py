"""The code interpreter (issue 14): ``run_code`` round trips.

Usage::

    .venv/bin/python benchmarks/bench_code.py [--template NAME] [--fresh N] [--runs N]
        [--out FILE] [-v]

Measures, in restored sandboxes of ``--template`` (default ``python``):

1. ``--fresh`` times, in a new sandbox each: ``run_code("1 + 1")`` as the first call
   (it starts the default context: a process of the guest's interpreter script) and the
   second call after it (``code_first_call_ms``, ``code_second_call_ms``);
2. in one sandbox, after 3 warm-up calls, ``--runs`` round trips of
   ``run_code("1 + 1")`` in the warm default context (``code_trivial_ms``), of
   ``print('hi')`` (``code_print_ms``), and of ``echo hi`` in a bash context
   (``code_bash_echo_ms``); and for comparison ``commands.run(["true"])``
   (``command_true_ms``, a process per call);
3. with ``--template code-interpreter`` (numpy, pandas, matplotlib) also, in each fresh
   sandbox after its first call, the first plot (``import matplotlib.pyplot``, a line
   plot, ``plt.show()``: ``code_first_plot_ms``) and the first DataFrame
   (``import pandas``: ``code_first_dataframe_ms``); and in the warm sandbox the PNG
   round trip of a new plot (``code_plot_png_ms``, the PNG checked: magic bytes and
   IHDR size) and a numpy sum (``code_numpy_ms``).

Each result is checked (a wrong answer fails the run). Prints one JSON document (p50,
p95, min, max, mean per metric) and writes it to ``--out`` (default
``benchmarks/results/bench-code-<UTC timestamp>.json``). Every sandbox is killed before
the script returns, also on errors.
"""

from __future__ import annotations

import argparse
import base64
import struct
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import BenchError, host_info, log, ms, setup_logging, summarize, write_report

from novasandbox import Execution, Sandbox

WARMUP = 3
DATA_TEMPLATE = "code-interpreter"
PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"
FRAME = "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})"


def check(execution: Execution, text: str | None = None, stdout: str | None = None) -> None:
    if execution.error is not None:
        raise BenchError(f"the code failed: {execution.error}")
    if text is not None and execution.text != text:
        raise BenchError(f"expected {text!r}, got {execution.text!r}")
    if stdout is not None and "".join(execution.logs.stdout) != stdout:
        raise BenchError(f"expected stdout {stdout!r}, got {execution.logs.stdout!r}")


def png_size(execution: Execution) -> tuple[int, int]:
    """The width and height of the execution's one PNG result (``BenchError`` if it has
    none or it is not a PNG)."""
    check(execution)
    pngs = [r.png for r in execution.results if r.png]
    if len(pngs) != 1:
        raise BenchError(f"expected one PNG result, got {execution.results!r}")
    data = base64.b64decode(pngs[0])
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise BenchError(f"not a PNG: {data[:16]!r}")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def check_frame(execution: Execution) -> None:
    check(execution)
    html = execution.results[-1].html if execution.results else None
    if not html or "<table" not in html:
        raise BenchError(f"expected a DataFrame's HTML, got {execution.results!r}")


def timed(fn: Callable[[], Any], runs: int) -> list[float]:
    for _ in range(WARMUP):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(ms(time.perf_counter() - t0))
    return out


def bench_fresh(template: str, count: int, metrics: dict[str, Any]) -> None:
    first, second, plot, frame = [], [], [], []
    for i in range(count):
        with Sandbox.create(template) as sb:
            t0 = time.perf_counter()
            execution = sb.run_code("1 + 1")
            first.append(ms(time.perf_counter() - t0))
            check(execution, "2")
            t0 = time.perf_counter()
            check(sb.run_code("1 + 1"), "2")
            second.append(ms(time.perf_counter() - t0))
            if template == DATA_TEMPLATE:
                t0 = time.perf_counter()
                png_size(sb.run_code(PLOT))
                plot.append(ms(time.perf_counter() - t0))
                t0 = time.perf_counter()
                check_frame(sb.run_code(FRAME))
                frame.append(ms(time.perf_counter() - t0))
        log.info("fresh %d/%d: first call %.0f ms", i + 1, count, first[-1])
    metrics["code_first_call_ms"] = summarize(first, "ms")
    metrics["code_second_call_ms"] = summarize(second, "ms")
    if plot:
        metrics["code_first_plot_ms"] = summarize(plot, "ms")
        metrics["code_first_dataframe_ms"] = summarize(frame, "ms")


def bench_warm(template: str, runs: int, metrics: dict[str, Any]) -> None:
    with Sandbox.create(template) as sb:
        metrics["code_trivial_ms"] = summarize(
            timed(lambda: check(sb.run_code("1 + 1"), "2"), runs), "ms"
        )
        metrics["code_print_ms"] = summarize(
            timed(lambda: check(sb.run_code("print('hi')"), stdout="hi\n"), runs), "ms"
        )
        metrics["code_bash_echo_ms"] = summarize(
            timed(lambda: check(sb.run_code("echo hi", language="bash"), stdout="hi\n"), runs),
            "ms",
        )

        def true() -> None:
            if sb.commands.run(["true"]).exit_code != 0:
                raise BenchError("true failed")

        metrics["command_true_ms"] = summarize(timed(true, runs), "ms")
        if template == DATA_TEMPLATE:
            metrics["code_plot_png_ms"] = summarize(
                timed(lambda: png_size(sb.run_code(PLOT)), runs), "ms"
            )
            metrics["code_numpy_ms"] = summarize(
                timed(
                    lambda: check(
                        sb.run_code("import numpy as np\nint(np.arange(10).sum())"), "45"
                    ),
                    runs,
                ),
                "ms",
            )
        log.info("warm: %s", {k: v["p50"] for k, v in metrics.items()})


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--template", default="python", help="template (default python)")
    p.add_argument("--fresh", type=int, default=5, help="fresh sandboxes (default 5)")
    p.add_argument("--runs", type=int, default=50, help="warm round trips (default 50)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: results/...)")
    p.add_argument("-v", "--verbose", action="store_true", help="library logs too")
    args = p.parse_args(argv)
    if args.fresh < 1 or args.runs < 1:
        p.error("--fresh and --runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    started = time.perf_counter()
    report: dict[str, Any] = {"host": host_info()}
    report["params"] = {"template": args.template, "fresh": args.fresh, "runs": args.runs}
    metrics: dict[str, Any] = {}
    bench_warm(args.template, args.runs, metrics)
    bench_fresh(args.template, args.fresh, metrics)
    report["metrics"] = metrics
    report["total_wall_s"] = round(time.perf_counter() - started, 2)
    write_report(report, args.out, "bench-code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
