"""The CLI through a server with a warm pool against the local CLI: ``novasandbox run --
true`` as a whole process, both ways, interleaved.

Usage: .venv/bin/python benchmarks/bench_cli_server.py [--runs 20] [--pool 2] [--settle 0.5]
    [--out FILE]

Starts ``novasandbox serve --port 0 --pool python=N`` with a key of its own in a
temporary state directory, waits until the pool is full, then runs in turn (A B A B ...):

- remote: ``novasandbox run -- true`` with ``NOVASANDBOX_SERVER`` and
  ``NOVASANDBOX_API_KEY`` set (the create takes a pooled sandbox; the kill is the
  server's, after it answered);
- local: ``novasandbox run -- true`` without them (a restore in the process, the
  command, the kill).

Each is the console script exactly as installed (``from novasandbox_entry import main``)
in a new process, with bytecode caching on (a warm-up run writes it), stdin /dev/null.
Before each remote run the pool is full again and ``--settle`` seconds have passed (its
refill is not timed: "a warm pool" is the premise). Prints one JSON document with p50/p95
of each and the ratio remote/local of the p50s, and writes it to ``--out`` (default
``benchmarks/results/cli-server-<timestamp>.json``). The server is stopped (SIGTERM) at
the end, whatever happened.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import BenchError, host_info, setup_logging, summarize, write_report

CONSOLE_SCRIPT = "import sys\nfrom novasandbox_entry import main\nsys.exit(main())"
"""What the installed ``novasandbox`` script runs."""
NOVASANDBOX = [sys.executable, "-c", CONSOLE_SCRIPT]


def clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NOVASANDBOX_SERVER", "NOVASANDBOX_API_KEY", "PYTHONDONTWRITEBYTECODE")
    }
    return env


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.monotonic()
    done = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=300, check=False
    )
    took = time.monotonic() - t0
    if done.returncode != 0:
        raise BenchError(f"{argv[3:]} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return took * 1000


class Served:
    def __init__(self, pool: int, env: dict[str, str]) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nsb-", dir="/tmp"))
        made = subprocess.run(
            [*NOVASANDBOX, "keys", "create", "bench", "--state-dir", str(self.root)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            raise BenchError(f"keys create failed: {made.stderr}")
        self.key = made.stdout.strip()
        self.log = self.root.with_suffix(".log")
        pool_args = ["--pool", f"python={pool}"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*NOVASANDBOX, "serve", "--port", "0", "--state-dir", str(self.root), *pool_args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.url = self._wait_url()
        self.host, self.port = re.fullmatch(r"http://([^:]+):(\d+)", self.url).groups()  # type: ignore[union-attr]

    def _wait_url(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in self.log.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("message") == "listening":
                    return str(event["url"])
            if self.proc.poll() is not None:
                raise BenchError(f"the server exited: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        raise BenchError("the server did not start")

    def pool_ready(self) -> int:
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=10)
        try:
            conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {self.key}"})
            text = conn.getresponse().read().decode()
        except ConnectionRefusedError:  # logged "listening" before uvicorn listens
            return 0
        finally:
            conn.close()
        m = re.search(r'^novasandbox_pool_size\{template="python"\} ([0-9.]+)$', text, re.M)
        return int(float(m.group(1))) if m else 0

    def wait_full(self, size: int, settle: float) -> None:
        deadline = time.monotonic() + 120
        while self.pool_ready() < size:
            if time.monotonic() > deadline:
                raise BenchError("the pool did not fill in 120 s")
            time.sleep(0.05)
        time.sleep(settle)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.log.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--pool", type=int, default=2, help="warm sandboxes in the pool")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds after a refill")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("-v", action="store_true")
    args = parser.parse_args()
    setup_logging(args.v)
    local_env = clean_env()
    served = Served(args.pool, local_env)
    try:
        remote_env = {**local_env, "NOVASANDBOX_SERVER": served.url}
        remote_env["NOVASANDBOX_API_KEY"] = served.key
        run_true = [*NOVASANDBOX, "run", "--", "true"]
        served.wait_full(args.pool, args.settle)
        timed(run_true, remote_env)  # warm-up: bytecode, page cache
        timed(run_true, local_env)
        remote, local = [], []
        for _ in range(args.runs):
            served.wait_full(args.pool, args.settle)
            remote.append(timed(run_true, remote_env))
            local.append(timed(run_true, local_env))
    finally:
        served.close()
    metrics: dict[str, Any] = {
        "cli_server_run_true_ms": summarize(remote, "ms"),
        "cli_local_run_true_ms": summarize(local, "ms"),
    }
    ratios = sorted(r / loc for r, loc in zip(remote, local, strict=True))
    metrics["remote_over_local"] = summarize(ratios, "ratio")
    report = {
        "host": host_info(),
        "params": vars(args) | {"out": str(args.out)},
        "commands": {
            "remote": "NOVASANDBOX_SERVER=URL NOVASANDBOX_API_KEY=KEY novasandbox run -- true",
            "local": "novasandbox run -- true",
        },
        "metrics": metrics,
    }
    write_report(report, args.out, "cli-server")
    return 0


if __name__ == "__main__":
    sys.exit(main())
