"""MCP, fast: the SDK's own client against a real ``novasandbox mcp`` subprocess (stdio)
and a real ``novasandbox serve`` (streamable HTTP at /mcp), with the in-process provider
(the real guest agent on this host, no VM: commands run on this host, so they are
harmless and files live in this test's temporary directory).
``tests/integration/test_mcp.py`` runs them on real VMs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mcp import Client, MCPError

from novasandbox.records import sandboxes_dir
from tests.mcp_support import check_tools, exercise, fails, http_client, ok, stdio_params
from tests.server_support import Server, error_of, iter_wait, make_key

INPROCESS = {"NOVASANDBOX_ALLOW_INPROCESS": "1", "NOVASANDBOX_PROVIDER": "inprocess"}
PROTOCOL = "2025-11-25"
ACCEPT = {"accept": "application/json, text/event-stream"}


def entries(state: Path) -> list[str]:
    base = sandboxes_dir(state)
    return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


def test_stdio_tools_and_the_session_sandbox_dies_with_the_session(tmp_path: Path) -> None:
    state = tmp_path / "state"
    where = tmp_path / "files"
    where.mkdir()
    env = {**os.environ, **INPROCESS, "NOVASANDBOX_STATE_DIR": str(state)}

    async def main() -> tuple[str, str]:
        async with Client(stdio_params(env)) as client:
            check_tools(await client.list_tools())
            session = await exercise(client, str(where))
            assert entries(state) == [session]
            made = await ok(client, "create_sandbox", {"timeout_seconds": 120})
            other = made["sandbox_id"]
            assert other != session and made["template"] == "python"
            assert made["expires_at"] is not None
            await exercise(client, str(where / "other"), other)
            await ok(client, "kill_sandbox", {"sandbox_id": other})
            await fails(
                client, "list_files", {"path": str(where), "sandbox_id": other}, "sandbox-not-found"
            )
            # killing the session's own sandbox: the next call makes a new one
            await ok(client, "kill_sandbox", {"sandbox_id": session})
            r = await ok(client, "run_command", {"command": "true"})
            assert r["sandbox_id"] not in (session, other)
            # a call the client abandons (its timeout) is cancelled: so is its command
            marker = where / "marker"
            with pytest.raises(MCPError):
                await client.call_tool(
                    "run_command",
                    {"command": f"echo $$ > {where}/pid; sleep 3; touch {marker}"},
                    read_timeout_seconds=1.0,
                )
            await asyncio.sleep(4)
            assert (where / "pid").exists() and not marker.exists()
            kept = await ok(client, "create_sandbox", {})  # left for the end of the session
            assert sorted(entries(state)) == sorted([r["sandbox_id"], kept["sandbox_id"]])
            return r["sandbox_id"], kept["sandbox_id"]

    asyncio.run(main())
    assert entries(state) == [], "sandboxes outlived the MCP session"


class Setup:
    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.files = root / "files"
        self.files.mkdir()
        self.alice_key = make_key(self.state, "alice")
        self.bob_key = make_key(self.state, "bob")
        env = {**os.environ, **INPROCESS}
        env.pop("NOVASANDBOX_STATE_DIR", None)
        self.server = Server(self.state, "--log-level", "debug", env=env)
        self.url = self.server.url
        self.alice = self.server.client(self.alice_key)
        self.bob = self.server.client(self.bob_key)

    def listed(self, client: httpx.Client) -> dict[str, dict[str, object]]:
        return {sb["id"]: sb for sb in client.get("/v1/sandboxes").json()["sandboxes"]}

    def running(self, client: httpx.Client) -> list[str]:
        """The ids listed that did not end (ones that ended on their own stay listed)."""
        return [i for i, sb in self.listed(client).items() if sb["state"] != "killed"]

    def close(self) -> None:
        self.alice.close()
        self.bob.close()
        self.server.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    s = Setup(tmp_path_factory.mktemp("mcp"))
    try:
        yield s
    finally:
        s.close()
    assert entries(s.state) == [], "the server left sandbox state behind"


def test_http_needs_the_key(setup: Setup) -> None:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL,
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": setup.alice_key}):
        for method in ("POST", "GET", "DELETE"):
            r = httpx.request(method, f"{setup.url}/mcp", json=init, headers={**ACCEPT, **headers})
            assert r.status_code == 401, (method, headers, r.text)
            assert error_of(r)["code"] == "unauthorized"
    r = setup.alice.post("/mcp", json=init, headers=ACCEPT)
    assert r.status_code == 200, r.text
    assert "/mcp" not in setup.alice.get("/openapi.json").json()["paths"]

    # a session is the key's: another key presenting its id is told it does not exist
    session = r.headers["mcp-session-id"]
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    of_session = {**ACCEPT, "mcp-session-id": session, "mcp-protocol-version": PROTOCOL}
    r = setup.bob.post("/mcp", json=call, headers=of_session)
    assert r.status_code == 404, r.text
    r = setup.alice.delete("/mcp", headers=of_session)
    assert r.status_code == 200, r.text
    r = setup.alice.post("/mcp", json=call, headers=of_session)
    assert r.status_code == 404, r.text


def test_http_session_sandbox_is_the_keys_and_dies_with_the_session(setup: Setup) -> None:
    where = str(setup.files)

    async def main() -> str:
        async with http_client(setup.url, setup.alice_key) as client:
            check_tools(await client.list_tools())
            session = await exercise(client, where)
            secret = {"path": f"{where}/secret", "content": "file-data-never-logged"}
            await ok(client, "write_file", secret)
            r = await ok(
                client, "run_command", {"command": "true", "env": {"T": "env-never-logged"}}
            )
            mine = setup.listed(setup.alice)
            assert mine[session]["labels"] == {"mcp": "session"}
            assert mine[session]["state"] == "running"
            assert session not in setup.listed(setup.bob)

            # the REST API and MCP share the sandboxes of a key
            r = setup.alice.post("/v1/sandboxes", json={"timeout": 120})
            assert r.status_code == 201, r.text
            rest = r.json()["id"]
            await exercise(client, f"{where}/rest", rest)
            made = await ok(client, "create_sandbox", {"timeout_seconds": 120})
            assert setup.listed(setup.alice)[made["sandbox_id"]]["labels"] == {"mcp": "tool"}
            await ok(client, "kill_sandbox", {"sandbox_id": rest})
            assert rest not in setup.listed(setup.alice)

            # another key's sandboxes do not exist for this one, and the other way round
            async with http_client(setup.url, setup.bob_key) as bob:
                for sid in (session, made["sandbox_id"]):
                    await fails(
                        bob,
                        "run_command",
                        {"command": "true", "sandbox_id": sid},
                        "sandbox-not-found",
                    )
                    await fails(bob, "kill_sandbox", {"sandbox_id": sid}, "sandbox-not-found")
                r = await ok(bob, "run_command", {"command": "true"})
                assert r["sandbox_id"] not in (session, made["sandbox_id"])
                assert r["sandbox_id"] in setup.listed(setup.bob)
                bobs = r["sandbox_id"]
            for _ in iter_wait("bob's session sandbox killed when his session ended"):
                if bobs not in setup.listed(setup.bob):
                    break
            assert session in setup.listed(setup.alice)
            r = setup.alice.delete(f"/v1/sandboxes/{made['sandbox_id']}")
            assert r.status_code == 204

            # the session's sandbox reaches the end of its lifetime: said once, then a new one
            r = setup.alice.put(f"/v1/sandboxes/{session}/timeout", json={"timeout": 0.2})
            assert r.status_code == 200, r.text
            for _ in iter_wait("the session sandbox expired"):
                if setup.listed(setup.alice)[session]["state"] == "killed":
                    break
            said = await fails(client, "run_command", {"command": "true"}, "sandbox-expired")
            assert "new session sandbox" in said
            r = await ok(client, "run_command", {"command": "true"})
            assert r["sandbox_id"] != session
            return str(r["sandbox_id"])

    session = asyncio.run(main())
    for _ in iter_wait("the session sandbox killed when the session ended"):
        if session not in setup.listed(setup.alice):
            break
    assert setup.running(setup.alice) == []
    logged = setup.server.log()  # at debug level
    assert "mcp" in logged and "tool failed" in logged
    for never in ("file-data-never-logged", "env-never-logged", setup.alice_key, setup.bob_key):
        assert never not in logged


def metric(setup: Setup, line_start: str) -> float:
    for line in setup.alice.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {line_start}")


def test_http_sessionless_clients_pass_a_sandbox_id(setup: Setup) -> None:
    """The SDK's default client speaks the 2026-07-28 revision: no MCP session. Creates
    and commands count in the server's metrics."""
    creates = 'novasandbox_sandbox_creates_total{outcome="ok"}'
    before = metric(setup, creates), metric(setup, "novasandbox_commands_total")

    async def main() -> None:
        async with http_client(setup.url, setup.alice_key, mode="auto") as client:
            assert client.protocol_version == "2026-07-28"
            check_tools(await client.list_tools())
            text = await fails(client, "run_command", {"command": "true"}, "invalid-config")
            assert "sandbox_id" in text
            made = await ok(client, "create_sandbox", {"timeout_seconds": 120})
            sid = made["sandbox_id"]
            r = await ok(client, "run_command", {"command": "echo hi", "sandbox_id": sid})
            assert r["stdout"] == "hi\n"
            await ok(client, "kill_sandbox", {"sandbox_id": sid})

    asyncio.run(main())
    assert setup.running(setup.alice) == []
    after = metric(setup, creates), metric(setup, "novasandbox_commands_total")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    assert 'route="/mcp"' in setup.alice.get("/metrics").text
