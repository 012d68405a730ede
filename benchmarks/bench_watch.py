"""Watch event latency: a write in the guest -> its event on the host (``files.watch_dir``).

    .venv/bin/python benchmarks/bench_watch.py [--rounds 200] [--out FILE] [-v]

One restored sandbox (``Sandbox.create()``) watches ``/tmp/watched``. A guest process
started once (``python3``, stdin open) creates ``/tmp/watched/N`` each time the host sends
it the line ``N``, then prints ``N``. Per round, from the host's send of the line:

* ``event_ms``: until the ``create`` event of ``N`` reaches ``on_event`` on the host (the
  watch latency, plus the stdin hop into the guest);
* ``echo_ms``: until the process's ``N`` line reaches ``on_stdout`` (the same hop in and a
  hop out, without inotify: the baseline);
* ``event_minus_echo_ms``: the difference, what the watch adds over the command channel.

Untimed warm-up rounds first (TCG translates the path before it runs fast). Prints a JSON
report and writes it to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# bench.py lives beside this script; running a script puts its directory on sys.path.
from bench import BenchError, host_info, ms, setup_logging, summarize, write_report

import novasandbox
from novasandbox import FilesystemEvent, Sandbox

log = logging.getLogger("bench")

WATCHED = "/tmp/watched"
WARMUP = 20
WRITER = (
    "import sys\n"
    "for line in sys.stdin:\n"
    "    n = line.strip()\n"
    f"    open('{WATCHED}/' + n, 'w').close()\n"
    "    print(n, flush=True)\n"
)


class Arrivals:
    """When each name's event and each output line reached the host."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.events: dict[str, float] = {}
        self.lines: dict[str, float] = {}
        self.pending = ""

    def on_event(self, event: FilesystemEvent) -> None:
        now = time.perf_counter()
        if event.type == "create":
            with self.cond:
                self.events[event.name] = now
                self.cond.notify_all()

    def on_stdout(self, text: str) -> None:
        now = time.perf_counter()
        with self.cond:
            self.pending += text
            *done, self.pending = self.pending.split("\n")
            for line in done:
                self.lines[line] = now
            self.cond.notify_all()

    def wait(self, name: str, timeout: float = 30.0) -> tuple[float, float]:
        with self.cond:
            if not self.cond.wait_for(
                lambda: name in self.events and name in self.lines, timeout=timeout
            ):
                raise BenchError(f"no event or no output for {name} within {timeout} s")
            return self.events[name], self.lines[name]


def bench_watch(sb: Sandbox, rounds: int, metrics: dict[str, Any]) -> None:
    sb.files.make_dir(WATCHED)
    arrivals = Arrivals()
    handle = sb.files.watch_dir(WATCHED, on_event=arrivals.on_event)
    writer = sb.commands.start(
        ["python3", "-u", "-c", WRITER], open_stdin=True, on_stdout=arrivals.on_stdout, timeout=None
    )
    try:
        event_ms, echo_ms, diff_ms = [], [], []
        for i in range(WARMUP + rounds):
            name = str(i)
            t0 = time.perf_counter()
            writer.send_stdin(name + "\n")
            t_event, t_echo = arrivals.wait(name)
            if i >= WARMUP:
                event_ms.append(ms(t_event - t0))
                echo_ms.append(ms(t_echo - t0))
                diff_ms.append(ms(t_event - t_echo))
        metrics["event_ms"] = summarize(event_ms, "ms")
        metrics["echo_ms"] = summarize(echo_ms, "ms")
        metrics["event_minus_echo_ms"] = summarize(diff_ms, "ms")
        metrics["dropped"] = handle.dropped
    finally:
        writer.kill()
        handle.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200, help="timed writes (default 200)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: results/...)")
    p.add_argument("-v", "--verbose", action="store_true", help="library logs too")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
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
        log.info("watch latency: %d warm-up + %d rounds", WARMUP, args.rounds)
        bench_watch(sb, args.rounds, metrics)
    report["host"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["total_wall_s"] = round(time.perf_counter() - started, 1)
    write_report(report, args.out, "bench-watch")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
