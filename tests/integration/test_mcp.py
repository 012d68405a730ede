"""MCP on real VMs, driven by the official SDK's own client: ``novasandbox mcp`` over
stdio (a subprocess), and ``novasandbox serve`` at /mcp over streamable HTTP. The
sandboxes a session made without a sandbox id die with the session; nothing is left.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mcp import Client

from tests.mcp_support import check_tools, exercise, fails, http_client, ok, stdio_params
from tests.server_support import error_of, iter_wait

from .conftest import assert_no_leftovers, ids_of_this_test
from .test_server import Served

pytestmark = pytest.mark.integration


def test_stdio(state_root: Path) -> None:
    async def main() -> None:
        async with Client(stdio_params(dict(os.environ))) as client:
            check_tools(await client.list_tools())
            session = await exercise(client, "/home/user/work")
            made = await ok(client, "create_sandbox", {"timeout_seconds": 300})
            other = made["sandbox_id"]
            assert other != session
            # another sandbox: the session's files are not there
            await fails(
                client,
                "read_file",
                {"path": "/home/user/work/blob", "sandbox_id": other},
                "file-not-found",
            )
            r = await ok(client, "run_command", {"command": "hostname", "sandbox_id": other})
            assert r["stdout"] == f"{other}\n"
            await ok(client, "kill_sandbox", {"sandbox_id": other})
            await fails(
                client, "run_command", {"command": "true", "sandbox_id": other}, "sandbox-not-found"
            )
            kept = await ok(client, "create_sandbox", {})  # left for the end of the session
            assert set(ids_of_this_test()) == {session, other, kept["sandbox_id"]}

    asyncio.run(main())
    assert_no_leftovers(state_root)  # the session's sandbox and the one left running


@pytest.fixture
def served() -> Iterator[Served]:
    s = Served()
    try:
        yield s
    finally:
        s.close()  # checks that nothing of its sandboxes is left


def test_streamable_http(served: Served) -> None:
    url = served.server.url
    r = httpx.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert r.status_code == 401 and error_of(r)["code"] == "unauthorized"

    def listed(client: httpx.Client) -> dict[str, dict[str, object]]:
        return {sb["id"]: sb for sb in client.get("/v1/sandboxes").json()["sandboxes"]}

    async def main() -> str:
        async with http_client(url, served.alice_key) as client:
            check_tools(await client.list_tools())
            r = await ok(client, "run_command", {"command": "echo hi"})
            session = r["sandbox_id"]
            assert r["stdout"] == "hi\n"
            mine = listed(served.alice)
            assert mine[session]["labels"] == {"mcp": "session"}
            assert mine[session]["state"] == "running"
            assert listed(served.bob) == {}
            await ok(client, "write_file", {"path": "notes.txt", "content": "hello"})
            got = await ok(client, "read_file", {"path": "/home/user/notes.txt"})
            assert (got["sandbox_id"], got["content"]) == (session, "hello")

            # a sandbox made with the REST API, used through MCP: one registry
            r = served.alice.post("/v1/sandboxes", json={"template": "python"})
            assert r.status_code == 201, r.text
            rest = r.json()["id"]
            await exercise(client, "/tmp/work", rest)
            async with http_client(url, served.bob_key) as bob:
                await fails(
                    bob, "run_command", {"command": "true", "sandbox_id": rest}, "sandbox-not-found"
                )
            await ok(client, "kill_sandbox", {"sandbox_id": rest})
            assert set(listed(served.alice)) == {session}
            return str(session)

    session = asyncio.run(main())
    for _ in iter_wait("the session sandbox killed when the MCP session ended"):
        if session not in listed(served.alice):
            break
