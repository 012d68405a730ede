"""Admission control of the server (server/admission.py): what it cannot take now is
refused at once with 503, ``Retry-After`` and ``server-busy``, and changes nothing.

The bounds themselves on their own (asyncio, no server), then through a real
``novasandbox serve`` process with the in-process provider (see test_server.py).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from novasandbox.errors import ServerBusy
from novasandbox.records import sandboxes_dir
from novasandbox.server.admission import Admission, Limits, RequestLimit
from tests.server_support import Server, error_of, iter_wait, make_key

from .test_server import server_env


def busy(r: httpx.Response) -> bool:
    """Whether ``r`` is the admission refusal, in full (status, header, error body)."""
    if r.status_code != 503:
        return False
    assert int(r.headers["retry-after"]) > 0, r.headers
    assert error_of(r)["code"] == "server-busy", r.text
    return True


def test_creates_beyond_the_start_slots_queue_then_are_refused() -> None:
    async def main() -> None:
        limits = Limits(max_sandboxes=100, max_starting=1, max_queue_wait=0.2)
        admission = Admission(limits, alive=lambda: 0)
        release = asyncio.Event()
        outcomes: list[str] = []

        async def create() -> None:
            try:
                async with admission.create():
                    await release.wait()
                outcomes.append("ok")
            except ServerBusy as exc:
                outcomes.append(exc.message)

        first = asyncio.ensure_future(create())
        await asyncio.sleep(0)
        assert admission.starting == 1
        queued = [asyncio.ensure_future(create()) for _ in range(limits.max_queued)]
        await asyncio.sleep(0)
        assert admission.queued == limits.max_queued
        with pytest.raises(ServerBusy, match="creates already wait to start") as info:
            async with admission.create():
                pass
        assert info.value.code == "server-busy"
        await asyncio.gather(*queued)  # their wait ran out
        assert all("no start slot came free" in o for o in outcomes)
        release.set()
        await first
        assert outcomes[-1] == "ok"
        assert (admission.starting, admission.queued) == (0, 0)
        async with admission.create():  # the slot is free again
            assert admission.starting == 1

    asyncio.run(main())


def test_a_create_cancelled_while_queued_gives_back_its_place() -> None:
    async def main() -> None:
        admission = Admission(Limits(max_sandboxes=10, max_starting=1), alive=lambda: 0)
        release = asyncio.Event()

        async def create() -> None:
            async with admission.create():
                await release.wait()

        holder = asyncio.ensure_future(create())
        await asyncio.sleep(0)
        queued = asyncio.ensure_future(create())
        await asyncio.sleep(0)
        assert (admission.starting, admission.queued) == (2, 1)
        release.set()  # the slot comes free while the queued one is cancelled
        queued.cancel()
        await holder
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert (admission.starting, admission.queued) == (0, 0)
        release.clear()
        first = asyncio.ensure_future(create())
        await asyncio.sleep(0)
        assert admission.starting == 1 and admission.queued == 0  # the slot was not lost
        release.set()
        await first

    asyncio.run(main())


def test_the_sandbox_bound_counts_the_creates_in_flight() -> None:
    async def main() -> None:
        alive = [1]
        admission = Admission(Limits(max_sandboxes=2, max_starting=4), alive=lambda: alive[0])
        async with admission.create():
            with pytest.raises(ServerBusy, match="maximum of 2 sandboxes"):
                async with admission.create():
                    pass
        alive[0] = 2
        with pytest.raises(ServerBusy):
            async with admission.create():
                pass
        alive[0] = 1
        async with admission.create():
            pass

    asyncio.run(main())


def test_the_request_bound_refuses_through_its_response() -> None:
    async def main() -> None:
        admission = Admission(Limits(max_sandboxes=1, max_starting=1, max_requests=1), lambda: 0)
        entered = asyncio.Event()
        leave = asyncio.Event()
        sent: list[Any] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            entered.set()
            await leave.wait()

        def refuse(error: ServerBusy) -> Any:
            async def respond(scope: Any, receive: Any, send: Any) -> None:
                sent.append(error.code)

            return respond

        limit = RequestLimit(app, admission, refuse, frozenset({"/healthz"}))
        scope = {"type": "http", "path": "/v1/sandboxes"}
        held = asyncio.ensure_future(limit(scope, None, None))
        await entered.wait()
        await limit(scope, None, None)
        assert sent == ["server-busy"]
        entered.clear()
        health = asyncio.ensure_future(limit({**scope, "path": "/healthz"}, None, None))
        await entered.wait()  # never refused
        leave.set()
        await asyncio.gather(held, health)
        assert admission.requests == 0

    asyncio.run(main())


def _entries(state: Path) -> list[str]:
    base = sandboxes_dir(state)
    return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


def test_a_server_at_its_sandbox_limit_refuses_creates_and_changes_nothing(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    key = make_key(state, "k")
    server = Server(state, "--max-sandboxes", "2", env=server_env())
    try:
        with server.client(key) as c:
            ids = []
            for _ in range(2):
                r = c.post("/v1/sandboxes", json={"timeout": 120})
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            before = _entries(state)
            r = c.post("/v1/sandboxes", json={"timeout": 120})
            assert busy(r), r.text
            assert "maximum of 2 sandboxes" in error_of(r)["message"]
            assert _entries(state) == before
            assert sorted(s["id"] for s in c.get("/v1/sandboxes").json()["sandboxes"]) == sorted(
                ids
            )
            assert c.delete(f"/v1/sandboxes/{ids.pop()}").status_code == 204
            r = c.post("/v1/sandboxes", json={"timeout": 120})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
            metrics = c.get("/metrics").text
            assert 'novasandbox_errors_total{code="server-busy"} 1.0' in metrics
            for i in ids:
                assert c.delete(f"/v1/sandboxes/{i}").status_code == 204
        assert server.stop() == 0
        assert _entries(state) == []
    finally:
        server.close()


def test_requests_beyond_the_bound_get_503_and_healthz_still_answers(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = make_key(state, "k")
    server = Server(state, "--max-requests", "1", env=server_env())
    try:
        with server.client(key) as c, server.client(key) as holder:
            sid = c.post("/v1/sandboxes", json={"timeout": 120}).json()["id"]
            with holder.stream(
                "POST",
                f"/v1/sandboxes/{sid}/commands",
                json={"cmd": "echo go; sleep 1000", "timeout": None},
            ) as r:
                assert r.status_code == 200
                next(r.iter_lines())  # the command runs: its request is in progress
                refused = c.get("/v1/sandboxes")
                assert busy(refused), refused.text
                assert "requests are in progress" in error_of(refused)["message"]
                assert httpx.get(f"{server.url}/healthz").status_code == 200
            # the stream's client went away: its request ends, the next one is served
            for _ in iter_wait("the held request to end"):
                if c.get(f"/v1/sandboxes/{sid}").status_code == 200:
                    break
            assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204
    finally:
        server.close()
    assert _entries(state) == []


def test_concurrent_creates_succeed_or_are_refused_never_anything_else(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = make_key(state, "k")
    server = Server(state, "--max-starting", "1", "--max-sandboxes", "6", env=server_env())
    try:
        with server.client(key, timeout=60) as c:

            def create(_: int) -> httpx.Response:
                return c.post("/v1/sandboxes", json={"timeout": 120})

            with ThreadPoolExecutor(16) as pool:
                responses = list(pool.map(create, range(16)))
            made = [r.json()["id"] for r in responses if r.status_code == 201]
            refused = [r for r in responses if busy(r)]
            assert len(made) + len(refused) == 16, [r.text for r in responses]
            assert 1 <= len(made) <= 6
            assert len(refused) >= 10
            listed = [s["id"] for s in c.get("/v1/sandboxes").json()["sandboxes"]]
            assert sorted(listed) == sorted(made)
            for i in made:
                assert c.delete(f"/v1/sandboxes/{i}").status_code == 204
    finally:
        server.close()
    assert _entries(state) == []
