"""Test support for MCP: the official SDK's own client (``mcp.Client``) over stdio (a
real ``novasandbox mcp`` subprocess) and over streamable HTTP (a real ``novasandbox
serve``), and checks shared by the fast tests (in-process provider) and the VM tests.
"""

from __future__ import annotations

import base64
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import mcp.client.stdio
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, ListToolsResult, TextContent

from novasandbox.server.mcp import MAX_OUTPUT, MAX_READ

TOOL_NAMES = {
    "create_sandbox",
    "run_command",
    "write_file",
    "read_file",
    "list_files",
    "kill_sandbox",
}
SESSION_TOOLS = TOOL_NAMES - {"create_sandbox", "kill_sandbox"}

# The SDK's client closes the server's stdin, then waits 2 s before SIGTERM: under load
# (other VMs on two cores) killing the sandboxes may take longer, and the test is about
# our cleanup at the end of stdin, not the SDK's escalation.
mcp.client.stdio.PROCESS_TERMINATION_TIMEOUT = 60.0


def stdio_params(env: dict[str, str]) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "novasandbox.cli", "mcp"], env=env
    )


@contextlib.asynccontextmanager
async def http_client(url: str, key: str, mode: str = "legacy") -> AsyncIterator[Client]:
    """A client of ``url``/mcp with ``key``. ``mode="legacy"``: the initialize handshake
    (protocol 2025-11-25: an MCP session, ``Mcp-Session-Id``); ``"auto"``: the SDK's
    default, the session-less 2026-07-28 revision against our server."""
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(60, read=300)) as http,
        Client(streamable_http_client(f"{url}/mcp", http_client=http), mode=mode) as client,
    ):
        yield client


def text(result: CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


async def ok(client: Client, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Call ``tool``; it must succeed; its structured result."""
    r = await client.call_tool(tool, arguments)
    assert not r.is_error, text(r)
    assert isinstance(r.structured_content, dict)
    return r.structured_content


async def fails(client: Client, tool: str, arguments: dict[str, Any], code: str) -> str:
    """Call ``tool``; it must be a tool error whose text starts with ``code``."""
    r = await client.call_tool(tool, arguments)
    assert r.is_error, r
    assert text(r).startswith(f"{code}: "), text(r)
    return text(r)


def check_tools(listed: ListToolsResult) -> None:
    """The six tools, each described, with a typed JSON schema for its input."""
    tools = {t.name: t for t in listed.tools}
    assert set(tools) == TOOL_NAMES
    for t in tools.values():
        assert t.description and len(t.description) > 40, t.name
        schema = t.input_schema
        assert schema["type"] == "object"
        assert schema.get("additionalProperties") is False, t.name
        for name, prop in schema["properties"].items():
            assert prop.get("description"), f"{t.name}.{name} has no description"
        if t.name in SESSION_TOOLS:
            assert "sandbox_id" in schema["properties"]
            assert "sandbox_id" not in schema.get("required", [])
        assert t.output_schema is not None and t.output_schema["type"] == "object"
    run = tools["run_command"].input_schema
    assert run["required"] == ["command"]
    assert run["properties"]["command"]["type"] == "string"
    assert run["properties"]["timeout_seconds"]["type"] == "number"
    assert run["properties"]["max_output_bytes"]["type"] == "integer"
    assert run["properties"]["max_output_bytes"]["maximum"] == MAX_OUTPUT
    assert tools["kill_sandbox"].input_schema["required"] == ["sandbox_id"]
    assert set(tools["write_file"].input_schema["required"]) == {"path", "content"}
    assert tools["read_file"].annotations is not None
    assert tools["read_file"].annotations.read_only_hint is True
    assert tools["kill_sandbox"].annotations is not None
    assert tools["kill_sandbox"].annotations.destructive_hint is True


async def exercise(client: Client, where: str, sandbox_id: str | None = None) -> str:
    """Commands and files in one sandbox (``sandbox_id``, or the session's): the id of
    the sandbox used. ``where`` is a directory the sandbox may write in."""
    pick = {} if sandbox_id is None else {"sandbox_id": sandbox_id}
    r = await ok(
        client,
        "run_command",
        {"command": f"mkdir -p {where}; echo out; echo err >&2; exit 3", **pick},
    )
    sid = r["sandbox_id"]
    assert sandbox_id is None or sid == sandbox_id
    assert (r["exit_code"], r["stdout"], r["stderr"]) == (3, "out\n", "err\n")
    assert r["signal"] is None and r["stdout_truncated_bytes"] == 0

    # the same sandbox again (not a new one per call); stdin, env and cwd
    r = await ok(
        client,
        "run_command",
        {
            "command": 'cat; echo "$GREETING"; pwd',
            "stdin": "in\n",
            "env": {"GREETING": "hi"},
            "cwd": where,
            **pick,
        },
    )
    assert r["sandbox_id"] == sid
    assert r["stdout"] == f"in\nhi\n{where}\n"

    # bounded output
    r = await ok(
        client,
        "run_command",
        {"command": "head -c 100000 /dev/zero | tr '\\0' a", "max_output_bytes": 1000, **pick},
    )
    assert r["stdout"] == "a" * 1000 and r["stdout_truncated_bytes"] == 99000

    # the largest results pass the SDK client's limits (1 MiB per event over HTTP)
    r = await ok(
        client,
        "run_command",
        {
            "command": f"head -c {MAX_OUTPUT + 5} /dev/zero | tr '\\0' a | tee /dev/stderr",
            "max_output_bytes": MAX_OUTPUT,
            **pick,
        },
    )
    assert r["stdout"] == r["stderr"] == "a" * MAX_OUTPUT
    assert r["stdout_truncated_bytes"] == r["stderr_truncated_bytes"] == 5
    await ok(
        client,
        "run_command",
        {"command": f"mkdir -p {where}; head -c {MAX_READ} /dev/urandom > {where}/big", **pick},
    )
    rd = await ok(
        client,
        "read_file",
        {"path": f"{where}/big", "encoding": "base64", "max_bytes": MAX_READ, **pick},
    )
    assert len(base64.b64decode(rd["content"])) == MAX_READ

    # files: text, binary (base64), listing
    w = await ok(
        client, "write_file", {"path": f"{where}/sub/hello.txt", "content": "héllo\n", **pick}
    )
    assert w == {
        "sandbox_id": sid,
        "path": f"{where}/sub/hello.txt",
        "size": len("héllo\n".encode()),
    }
    rd = await ok(client, "read_file", {"path": f"{where}/sub/hello.txt", **pick})
    assert (rd["content"], rd["encoding"], rd["size"]) == ("héllo\n", "utf-8", 7)
    blob = bytes(range(256))
    b64 = base64.b64encode(blob).decode()
    await ok(
        client,
        "write_file",
        {"path": f"{where}/blob", "content": b64, "encoding": "base64", **pick},
    )
    rd = await ok(client, "read_file", {"path": f"{where}/blob", "encoding": "base64", **pick})
    assert base64.b64decode(rd["content"]) == blob and rd["size"] == 256
    r = await ok(client, "run_command", {"command": f"cat {where}/sub/hello.txt", **pick})
    assert r["stdout"] == "héllo\n"
    ls = await ok(client, "list_files", {"path": where, **pick})
    entries = {e["name"]: e for e in ls["entries"]}
    assert entries["sub"]["type"] == "dir" and entries["blob"] == {
        "name": "blob",
        "type": "file",
        "size": 256,
    }
    assert ls["truncated"] == 0

    # errors are tool errors with the NovaSandbox code
    await fails(client, "read_file", {"path": f"{where}/missing", **pick}, "file-not-found")
    await fails(
        client, "read_file", {"path": f"{where}/blob", "max_bytes": 10, **pick}, "file-too-large"
    )
    await fails(client, "list_files", {"path": f"{where}/missing", **pick}, "file-not-found")
    await fails(client, "run_command", {"command": "", **pick}, "invalid-config")
    await fails(client, "run_command", {"command": "true", "bogus": 1, **pick}, "invalid-config")
    await fails(
        client,
        "write_file",
        {"path": f"{where}/x", "content": "%%", "encoding": "base64", **pick},
        "invalid-config",
    )
    await fails(
        client,
        "run_command",
        {"command": "true", "sandbox_id": "sb-0000000000"},
        "sandbox-not-found",
    )
    await fails(client, "kill_sandbox", {"sandbox_id": "sb-0000000000"}, "sandbox-not-found")
    timed_out = await fails(
        client,
        "run_command",
        {"command": "echo started; sleep 30", "timeout_seconds": 0.5, **pick},
        "command-timeout",
    )
    assert "started" in timed_out
    return str(sid)
