"""Network benchmarks: what a network costs at create, and NAT throughput both ways.

    .venv/bin/python benchmarks/bench_network.py [--runs 10] [--mb 32] [--out FILE]

- create: restore -> ready and -> first output, interleaved so that all modes see the
  same host load: ``network="none"``, ``"nat"`` with ``allow=[]``, with an allow list
  enforced by nftables (root) and by the seccomp guard (no root, or
  ``NOVASANDBOX_DROP_PRIVILEGES=0``; ``allow=[]`` too), and (as root, in a network
  namespace of its own) ``"tap"`` with a TAP from the pool against one made at create
  (no pool);
- guest -> host: the guest downloads ``--mb`` MB over HTTP from a server on the host's
  loopback (through 10.0.2.2, allowed by the policy), timed inside the guest;
- host -> guest: the host downloads ``--mb`` MB from a server in the guest through an
  exposed port (``get_host``).

Prints a JSON report (p50/p95) and writes it to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# bench.py lives beside this script; running a script puts its directory on sys.path.
from bench import (
    BenchError,
    check_echo,
    host_info,
    ms,
    setup_logging,
    summarize,
    write_report,
)

from novasandbox import Sandbox
from novasandbox.host import tap
from novasandbox.network import GATEWAY

log = logging.getLogger("bench")

DOWNLOAD = """
import sys, time, urllib.request
t = time.monotonic()
n = 0
with urllib.request.urlopen(sys.argv[1], timeout=120) as r:
    while chunk := r.read(1 << 20):
        n += len(chunk)
print(n, time.monotonic() - t)
"""


class Payload(http.server.BaseHTTPRequestHandler):
    size = 0

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(self.size))
        self.end_headers()
        block = b"x" * (1 << 20)
        left = self.size
        while left:
            n = min(left, len(block))
            self.wfile.write(block[:n])
            left -= n

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def bench_netns() -> Iterator[str]:
    """A network namespace of the benchmark's own for the TAPs."""
    name = f"nsbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(
        ["nsenter", f"--net=/run/netns/{name}", "ip", "link", "set", "lo", "up"], check=True
    )
    old = os.environ.get("NOVASANDBOX_NETNS")
    os.environ["NOVASANDBOX_NETNS"] = name
    try:
        yield name
    finally:
        tap.release()
        os.environ.pop("NOVASANDBOX_NETNS", None)
        if old is not None:
            os.environ["NOVASANDBOX_NETNS"] = old
        subprocess.run(["ip", "netns", "del", name], check=False)


def bench_create(runs: int, port: int, metrics: dict[str, Any]) -> None:
    """Restores per network mode, interleaved. "tap_pooled" leases a TAP made beforehand
    (``tap.prepare(1)``, not timed); "tap_fresh" finds no pool and makes its TAP."""
    modes: dict[str, dict[str, Any]] = {
        "none": {},
        "nat_no_egress": {"network": "nat", "allow": []},
    }
    root = os.geteuid() == 0
    # without root (here: VMMs kept unprivileged), the seccomp guard enforces the list,
    # and allow=[] too
    modes["nat_guard"] = {"network": "nat", "allow": [f"127.0.0.1:{port}"]}
    modes["nat_no_egress_guard"] = {"network": "nat", "allow": []}
    if root:
        modes["nat_policy"] = {"network": "nat", "allow": [f"127.0.0.1:{port}"]}
        modes["tap_pooled"] = {"network": "tap", "allow": []}
        modes["tap_fresh"] = {"network": "tap", "allow": []}
    ready: dict[str, list[float]] = {m: [] for m in modes}
    first: dict[str, list[float]] = {m: [] for m in modes}
    with contextlib.ExitStack() as stack:
        if root:
            stack.enter_context(bench_netns())
        for run in range(runs):
            for mode, kwargs in modes.items():
                if mode == "tap_pooled":
                    tap.prepare(1)
                elif mode == "tap_fresh":
                    tap.release()
                one_create(mode, kwargs, ready, first)
            log.info("create run %d/%d", run + 1, runs)
    for mode in modes:
        metrics[f"create_{mode}_ready"] = summarize(ready[mode], "ms")
        metrics[f"create_{mode}_to_first_output"] = summarize(first[mode], "ms")


def one_create(
    mode: str, kwargs: dict[str, Any], ready: dict[str, list[float]], first: dict[str, list[float]]
) -> None:
    unprivileged = mode.endswith("_guard") and os.geteuid() == 0
    if unprivileged:
        os.environ["NOVASANDBOX_DROP_PRIVILEGES"] = "0"
    t0 = time.monotonic()
    try:
        sb = Sandbox.create(**kwargs)
    finally:
        if unprivileged:
            del os.environ["NOVASANDBOX_DROP_PRIVILEGES"]
    with sb:
        if not sb.restored:
            raise BenchError(f"{mode}: booted cold, no snapshot for it")
        ready[mode].append(ms(time.monotonic() - t0))
        check_echo(sb.commands.run("echo hi"))
        first[mode].append(ms(time.monotonic() - t0))


def bench_throughput(runs: int, mb: int, port: int, metrics: dict[str, Any]) -> None:
    size = mb * 1000 * 1000
    allow = [f"127.0.0.1:{port}"] if os.geteuid() == 0 else None
    if allow is None:
        log.info("not root: no egress policy, so no guest -> host download")
    with Sandbox.create(network="nat", allow=allow or [], ports=[8000]) as sb:
        if allow is not None:
            rates = []
            for _ in range(runs):
                r = sb.commands.run(
                    ["python3", "-c", DOWNLOAD, f"http://{GATEWAY}:{port}/"], timeout=300
                )
                n, seconds = r.stdout.split()
                if r.exit_code != 0 or int(n) != size:
                    raise BenchError(f"guest download failed: {r.stdout} {r.stderr}")
                rates.append(size / float(seconds) / 1e6)
            metrics["nat_guest_downloads_from_host"] = summarize(rates, "MB/s")
        sb.commands.run(f"head -c {size} /dev/zero > /tmp/payload", timeout=120, check=True)
        sb.commands.start(["python3", "-m", "http.server", "8000", "--directory", "/tmp"])
        url = f"http://{sb.get_host(8000)}/payload"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url.replace("payload", ""), timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        rates = []
        for _ in range(runs):
            t0 = time.monotonic()
            n = 0
            with urllib.request.urlopen(url, timeout=300) as resp:
                while chunk := resp.read(1 << 20):
                    n += len(chunk)
            if n != size:
                raise BenchError(f"host download got {n} bytes, not {size}")
            rates.append(size / (time.monotonic() - t0) / 1e6)
        metrics["nat_host_downloads_from_guest_port"] = summarize(rates, "MB/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10, help="create runs per mode (10)")
    p.add_argument("--transfers", type=int, default=5, help="downloads each way (5)")
    p.add_argument("--mb", type=int, default=32, help="MB per download (32)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="library logs too")
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    Payload.size = args.mb * 1000 * 1000
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Payload)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    metrics: dict[str, Any] = {}
    try:
        bench_create(args.runs, port, metrics)
        bench_throughput(args.transfers, args.mb, port, metrics)
    finally:
        server.shutdown()
    report = {"benchmark": "network", "host": host_info(), "metrics": metrics}
    write_report(report, args.out, "network")
    return 0


if __name__ == "__main__":
    sys.exit(main())
