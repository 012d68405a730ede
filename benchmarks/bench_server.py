"""The HTTP server (``novasandbox serve``) against the library in-process.

Usage: .venv/bin/python benchmarks/bench_server.py [--runs 20] [--commands 200]
       [--concurrency 8] [--sandboxes 50] [--out FILE]

Starts a real ``novasandbox serve`` (a private state directory and key, a free loopback
port) and measures, over real HTTP (httpx, one keep-alive client per thread):

- ``remote_create_to_first_output`` vs ``inprocess_create_to_first_output`` (ms), taken
  interleaved in one run: ``POST /v1/sandboxes`` then ``POST .../commands`` of
  ``echo hi`` until its first ``stdout`` event, against ``AsyncSandbox.create`` then
  ``commands.run("echo hi")`` until its first ``on_stdout``; the kill is not timed.
  ``remote_over_inprocess_p50`` is the ratio of their medians.
- commands per second on one sandbox (``true``, argv form, the NDJSON stream read to its
  ``exit`` event): one client in sequence, and ``--concurrency`` clients at once (a
  thread and a keep-alive connection each), against ``commands.run(["true"])`` in
  process (in sequence, interleaved one by one with the remote ones; and
  ``--concurrency`` coroutines at once).
- memory of the server process (``/proc/PID/smaps_rollup``: RSS and PSS, MiB): idle
  (after the first sandbox was created and killed, so the imports are done), then with
  ``--sandboxes`` sandboxes alive (or the most that fit: the report says how many), with
  the PSS of all their QEMU processes beside it.

Prints one JSON document and writes it to ``--out`` (default
``benchmarks/results/server-<timestamp>.json``). Everything it starts is stopped before it
exits, on errors too (the server kills its sandboxes at SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from bench import BenchError, host_info, log, setup_logging, summarize, write_report

from novasandbox import AsyncSandbox
from novasandbox.gc import vmm_pids_under

CLI = [sys.executable, "-m", "novasandbox.cli"]


class Served:
    """A ``novasandbox serve`` subprocess with its own state directory and key."""

    def __init__(self, *args: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nsbench-", dir="/tmp"))
        env = {k: v for k, v in os.environ.items() if k != "NOVASANDBOX_STATE_DIR"}
        made = subprocess.run(
            [*CLI, "keys", "create", "bench", "--state-dir", str(self.root)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if made.returncode != 0:
            raise BenchError(f"keys create failed: {made.stderr}")
        self.key = made.stdout.strip()
        self.log_path = self.root.with_suffix(".log")
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [*CLI, "serve", "--port", "0", "--state-dir", str(self.root), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        try:
            self.url = self._wait_listening()
        except BaseException:
            self.close()
            raise

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and event.get("message") == "listening":
                    return str(event["url"])
            if self.proc.poll() is not None:
                raise BenchError(f"the server exited: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        raise BenchError("the server did not start listening")

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=120
        )

    def memory_mib(self, pid: int | None = None) -> dict[str, float]:
        """RSS and PSS (MiB) of the server process (or ``pid``)."""
        found = {}
        text = Path(f"/proc/{pid or self.proc.pid}/smaps_rollup").read_text()
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss"):
                found[name.lower() + "_mib"] = round(int(rest.split()[0]) / 1024, 1)
        return found

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server process used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(120)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)


def create(c: httpx.Client, attempts: int = 20) -> str:
    """A new sandbox's id; waits out ``server-busy`` refusals (``Retry-After``)."""
    for _ in range(attempts):
        r = c.post("/v1/sandboxes", json={})
        if r.status_code == 201:
            return str(r.json()["id"])
        if r.status_code == 503 and r.json()["error"]["code"] == "server-busy":
            time.sleep(float(r.headers.get("retry-after", "1")))
            continue
        raise BenchError(f"create: {r.status_code} {r.text[:500]}")
    raise BenchError("create: still refused")


def run_command(c: httpx.Client, sid: str, cmd: str | list[str], first: bool = False) -> str:
    """Run ``cmd``; its stdout (with ``first``: returns at the first stdout event)."""
    out = []
    with c.stream("POST", f"/v1/sandboxes/{sid}/commands", json={"cmd": cmd}) as r:
        if r.status_code != 200:
            raise BenchError(f"command: {r.status_code} {r.read()[:500]!r}")
        for line in r.iter_lines():
            if not line:
                continue
            event = json.loads(line)
            if event["type"] == "stdout":
                out.append(event["data"])
                if first:
                    return "".join(out)
            elif event["type"] == "exit":
                if event["exit_code"] != 0:
                    raise BenchError(f"{cmd!r} exited {event['exit_code']}")
                return "".join(out)
            elif event["type"] == "error":
                raise BenchError(f"command error: {event}")
    raise BenchError("the command's stream ended without exit")


def bench_create(served: Served, loop: asyncio.AbstractEventLoop, runs: int) -> dict[str, Any]:
    remote, local = [], []

    async def inprocess() -> float:
        t0 = time.monotonic()
        sb = await AsyncSandbox.create("python")
        try:
            first = asyncio.get_running_loop().create_future()

            def on_stdout(data: str) -> None:
                if not first.done():
                    first.set_result(time.monotonic())

            result = await sb.commands.run("echo hi", on_stdout=on_stdout)
            if result.stdout != "hi\n":
                raise BenchError(f"echo hi gave {result.stdout!r}")
            return (await first - t0) * 1000
        finally:
            await sb.kill()

    with served.client() as c:
        cpu = 0.0
        for i in range(runs + 1):  # the first pair warms up (imports, page cache)
            cpu0 = served.cpu_s()
            t0 = time.monotonic()
            sid = create(c)
            out = run_command(c, sid, "echo hi", first=True)
            took = (time.monotonic() - t0) * 1000
            if out != "hi\n":
                raise BenchError(f"echo hi gave {out!r}")
            if c.delete(f"/v1/sandboxes/{sid}").status_code != 204:
                raise BenchError("kill failed")
            if i:
                cpu += served.cpu_s() - cpu0
            here = loop.run_until_complete(inprocess())
            if i:
                remote.append(took)
                local.append(here)
            log.info("create %d: remote %.0f ms, in-process %.0f ms", i, took, here)
    r, l_ = summarize(remote, "ms"), summarize(local, "ms")
    return {
        "remote_create_to_first_output": r,
        "inprocess_create_to_first_output": l_,
        "remote_over_inprocess_p50": {"unit": "ratio", "value": round(r["p50"] / l_["p50"], 3)},
        "server_cpu_per_create_run_kill": {"unit": "ms", "value": round(cpu * 1000 / runs, 1)},
    }


def bench_commands(
    served: Served, loop: asyncio.AbstractEventLoop, count: int, concurrency: int
) -> dict[str, Any]:
    """``true`` (argv) in one sandbox: remote and in-process interleaved one by one, then
    ``concurrency`` at once each way."""
    metrics: dict[str, Any] = {}
    sb = loop.run_until_complete(AsyncSandbox.create("python"))
    with served.client() as c:
        sid = create(c)
        try:
            for _ in range(10):  # warm-up: both paths, TCG's translation cache
                run_command(c, sid, ["true"])
                loop.run_until_complete(sb.commands.run(["true"]))
            remote, local = [], []
            cpu0 = served.cpu_s()
            for _ in range(count):
                t = time.monotonic()
                run_command(c, sid, ["true"])
                remote.append((time.monotonic() - t) * 1000)
                t = time.monotonic()
                loop.run_until_complete(sb.commands.run(["true"]))
                local.append((time.monotonic() - t) * 1000)
            metrics["server_cpu_per_command"] = {
                "unit": "ms",
                "value": round((served.cpu_s() - cpu0) * 1000 / count, 2),
            }
            metrics["remote_command_true_ms"] = summarize(remote, "ms")
            metrics["inprocess_command_true_ms"] = summarize(local, "ms")
            metrics["remote_commands_per_s_sequential"] = {
                "unit": "1/s",
                "value": round(count / (sum(remote) / 1000), 1),
            }
            metrics["inprocess_commands_per_s_sequential"] = {
                "unit": "1/s",
                "value": round(count / (sum(local) / 1000), 1),
            }
            errors: list[BaseException] = []
            per = max(1, count // concurrency)

            def worker() -> None:
                try:
                    with served.client() as own:
                        for _ in range(per):
                            run_command(own, sid, ["true"])
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=worker) for _ in range(concurrency)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.monotonic() - t0
            if errors:
                raise BenchError(f"concurrent commands failed: {errors[0]!r}")
            metrics[f"remote_commands_per_s_concurrency{concurrency}"] = {
                "unit": "1/s",
                "value": round(per * concurrency / wall, 1),
            }

            async def local_workers() -> float:
                async def one() -> None:
                    for _ in range(per):
                        await sb.commands.run(["true"])

                t0 = time.monotonic()
                await asyncio.gather(*(one() for _ in range(concurrency)))
                return time.monotonic() - t0

            wall = loop.run_until_complete(local_workers())
            metrics[f"inprocess_commands_per_s_concurrency{concurrency}"] = {
                "unit": "1/s",
                "value": round(per * concurrency / wall, 1),
            }
        finally:
            c.delete(f"/v1/sandboxes/{sid}")
            loop.run_until_complete(sb.kill())
    return metrics


def qemu_pss_mib(root: Path) -> float:
    total = 0
    for pid in vmm_pids_under(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return round(total / 1024, 1)


def bench_memory(served: Served, wanted: int) -> dict[str, Any]:
    idle = served.memory_mib()
    ids: list[str] = []
    stopped_by = None
    with served.client() as c:
        try:
            while len(ids) < wanted:
                r = c.post("/v1/sandboxes", json={"timeout": 1800})
                if r.status_code == 201:
                    ids.append(r.json()["id"])
                    continue
                code = r.json()["error"]["code"] if r.status_code >= 400 else ""
                if code == "server-busy" and "maximum" not in r.text:
                    time.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                stopped_by = f"{r.status_code} {code}"
                break
            time.sleep(2)  # let the server settle (the last create's buffers)
            full = served.memory_mib()
            qemu = qemu_pss_mib(served.root)
            run_command(c, ids[-1], "echo alive")
        finally:
            for sid in ids:
                c.delete(f"/v1/sandboxes/{sid}")
    after = served.memory_mib()
    return {
        "server_memory_idle": {"unit": "MiB", **idle},
        "server_memory_with_sandboxes": {"unit": "MiB", "sandboxes": len(ids), **full},
        "server_memory_after_killing_them": {"unit": "MiB", **after},
        "qemu_pss_total_with_sandboxes": {"unit": "MiB", "value": qemu},
        "sandboxes_wanted": wanted,
        "sandboxes_stopped_by": stopped_by,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="create pairs (interleaved)")
    parser.add_argument("--commands", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sandboxes", type=int, default=50)
    parser.add_argument(
        "--parts",
        default="create,memory,commands",
        help="which measurements, comma-separated (create, memory, commands)",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("-v", action="store_true")
    args = parser.parse_args()
    setup_logging(args.v)
    host = host_info()
    loop = asyncio.new_event_loop()
    started = time.monotonic()
    served = Served("--max-sandboxes", str(max(args.sandboxes, 2)))
    try:
        metrics: dict[str, Any] = {"server_memory_fresh": {"unit": "MiB", **served.memory_mib()}}
        parts = set(args.parts.split(","))
        if "create" in parts:
            log.info("create -> first output, remote and in-process, %d pairs", args.runs)
            metrics |= bench_create(served, loop, args.runs)
        if "memory" in parts:
            log.info("memory with up to %d sandboxes", args.sandboxes)
            metrics |= bench_memory(served, args.sandboxes)
        if "commands" in parts:
            log.info("commands per second (%d commands)", args.commands)
            metrics |= bench_commands(served, loop, args.commands, args.concurrency)
    finally:
        served.close()
        loop.close()
    report = {
        "host": host | {"loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "params": vars(args) | {"out": str(args.out)},
        "metrics": metrics,
        "total_wall_s": round(time.monotonic() - started, 1),
    }
    write_report(report, args.out, "server")
    return 0


if __name__ == "__main__":
    sys.exit(main())
