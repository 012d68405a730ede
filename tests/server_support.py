"""Test support: a real ``novasandbox serve`` process, keys made by the real CLI, and
the API spoken over real HTTP (httpx).

``Server`` starts ``python -m novasandbox.cli serve --port 0 --state-dir DIR`` (the code
under test, through ``PYTHONPATH``), learns its URL from its "listening" log line, and
stops it at ``close`` (SIGTERM, then SIGKILL if it does not end), whatever happened. Its
log (stderr and stdout) goes to a file the tests read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

CLI = [sys.executable, "-m", "novasandbox.cli"]
START_WAIT = 60.0
"""Seconds a server may take to say it listens (imports under load are slow)."""
STOP_WAIT = 60.0


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def make_key(state: Path, name: str) -> str:
    done = cli("keys", "create", name, "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class Server:
    """One ``novasandbox serve`` subprocess."""

    def __init__(
        self, state: Path, *args: str, env: dict[str, str] | None = None, log: Path | None = None
    ) -> None:
        self.state = state
        self.log_path = log or state.parent / f"{state.name}-server.log"
        self.env = dict(os.environ if env is None else env)
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [*CLI, "serve", "--port", "0", "--state-dir", str(state), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        self.url = ""
        try:
            self.url = self._wait_listening()
        except BaseException:
            self.close()
            raise

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("message") == "listening":
                    url = str(event["url"])
                    if self._healthy(url):
                        return url
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"the server did not start listening:\n{self.log()}")

    @staticmethod
    def _healthy(url: str) -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """The log's JSON lines (others are skipped)."""
        out = []
        for line in self.log().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
        return out

    def client(self, key: str | None = None, timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the server and wait for it to end; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=STOP_WAIT)

    def close(self) -> None:
        """Stop it whatever state it is in (the teardown of every test)."""
        if self.proc.poll() is None:
            try:
                self.stop()
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        else:
            try:  # anything it started in its session (its group) goes too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ndjson(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines() if line]


def stream_events(
    client: httpx.Client,
    sandbox_id: str,
    into: list[dict[str, Any]] | None = None,
    **body: Any,
) -> list[dict[str, Any]]:
    """Run a command and read its events as they come (line by line), appending each to
    ``into`` as it arrives (a test on another thread watches it)."""
    events = [] if into is None else into
    with client.stream("POST", f"/v1/sandboxes/{sandbox_id}/commands", json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            if line:
                events.append(json.loads(line))
    return events


def error_of(response: httpx.Response) -> dict[str, str]:
    """The error of an error response, checked to be the one shape (and nothing else)."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    return dict(body["error"])


def iter_wait(what: str, limit: float = 60.0, step: float = 0.1) -> Iterator[None]:
    """Yields until the caller breaks out; fails after ``limit`` seconds (waits for an
    event, not a bound on how fast it comes)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        yield
        time.sleep(step)
    raise AssertionError(f"gave up waiting: {what}")
