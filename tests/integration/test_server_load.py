"""The server under load, on real VMs: 50 clients at once, each creating a sandbox,
running a command in it and killing it, against a real ``novasandbox serve`` with its
default admission bounds (``--max-starting`` the CPU count, a short queue).

Every answer is a success or the admission refusal (503, ``Retry-After``, code
``server-busy``): no other error, and no hang (each request has a timeout, and a client
that times out fails the test). A refused client waits what ``Retry-After`` says and
tries again, a bounded number of times. Afterwards nothing of any sandbox is left.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.server_support import error_of, ndjson

from .conftest import qemu_processes_under
from .test_server import Served

pytestmark = pytest.mark.integration

CLIENTS = 50
ATTEMPTS = 4
"""Creates a client tries (the first and its retries after ``Retry-After``)."""
REQUEST_TIMEOUT = 120.0
"""Seconds any one request may take (a create waits at most 30 s for a start slot)."""


@dataclass
class Outcome:
    created: bool = False
    ran: bool = False
    killed: bool = False
    refusals: int = 0
    problems: list[str] = field(default_factory=list)


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    try:
        yield s
    finally:
        s.close()


def refused(r: httpx.Response) -> bool:
    """Whether ``r`` is the admission refusal (checked in full: status, header, body)."""
    if r.status_code != 503:
        return False
    assert int(r.headers["retry-after"]) > 0, r.headers
    assert error_of(r) == {**error_of(r), "code": "server-busy"}, r.text
    return True


def client_run(served: Served, n: int, start: threading.Barrier, out: Outcome) -> None:
    with served.server.client(served.alice_key, timeout=REQUEST_TIMEOUT) as c:
        start.wait()
        try:
            sid = None
            for _ in range(ATTEMPTS):
                r = c.post("/v1/sandboxes", json={"labels": {"load": str(n)}})
                if r.status_code == 201:
                    sid = r.json()["id"]
                    out.created = True
                    break
                if not refused(r):
                    out.problems.append(f"create: {r.status_code} {r.text[:300]}")
                    return
                out.refusals += 1
                time.sleep(int(r.headers["retry-after"]))
            if sid is None:
                return
            r = c.post(f"/v1/sandboxes/{sid}/commands", json={"cmd": f"echo hi-{n}"})
            if r.status_code != 200:
                out.problems.append(f"command: {r.status_code} {r.text[:300]}")
            else:
                events = ndjson(r)
                stdout = "".join(e["data"] for e in events if e["type"] == "stdout")
                if stdout != f"hi-{n}\n" or events[-1].get("exit_code") != 0:
                    out.problems.append(f"command output: {events}")
                else:
                    out.ran = True
            r = c.delete(f"/v1/sandboxes/{sid}")
            if r.status_code == 204:
                out.killed = True
            else:
                out.problems.append(f"kill: {r.status_code} {r.text[:300]}")
        except (httpx.HTTPError, AssertionError) as exc:
            out.problems.append(f"{type(exc).__name__}: {exc}")


def test_50_clients_create_run_kill_only_succeed_or_are_refused(served: Served) -> None:
    outcomes = [Outcome() for _ in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)
    threads = [
        threading.Thread(target=client_run, args=(served, n, start, outcomes[n]), daemon=True)
        for n in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        # a client's worst case: every attempt's request runs to its timeout
        t.join(ATTEMPTS * (REQUEST_TIMEOUT + 10) + 3 * REQUEST_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a client hung"

    problems = [(n, p) for n, o in enumerate(outcomes) for p in o.problems]
    assert problems == []
    done = [o for o in outcomes if o.created]
    assert all(o.ran and o.killed for o in done)
    summary = Counter("done" if o.created else "refused" for o in outcomes) + Counter(
        refusals=sum(o.refusals for o in outcomes)
    )
    print(f"load: {dict(summary)}")
    assert len(done) >= 1, summary
    # every refusal was one the server counted, and nothing else went wrong in it
    metrics = served.alice.get("/metrics").text
    busy = [line for line in metrics.splitlines() if 'code="server-busy"' in line]
    counted = int(float(busy[0].split()[-1])) if busy else 0
    assert counted == summary["refusals"], busy
    assert not [e for e in served.server.events() if e.get("message") == "internal error"]
    assert served.alice.get("/v1/sandboxes").json() == {"sandboxes": []}
    assert qemu_processes_under(served.root) == []
    assert len(served.made()) == len(done)  # a refused create made nothing
