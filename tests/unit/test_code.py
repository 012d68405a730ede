"""The host side of the code interpreter (``code.py``) against a guest that misbehaves:
a stand-in for ``sandbox.commands`` whose context process writes what each test wants
(the real script is tested in ``test_interp.py``, the whole in integration tests)."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from typing import Any

import pytest

from novasandbox import code as code_module
from novasandbox.code import CodeInterpreter
from novasandbox.errors import CodeInterpreterError, CodeTimeout, ConfigError
from novasandbox.results import CommandResult, ProcessInfo

Responder = Callable[[dict[str, Any]], list[str]]
"""What the fake context writes for a request (raw text, garbage allowed)."""


def line(**event: Any) -> str:
    return json.dumps(event) + "\n"


def well_behaved(request: dict[str, Any]) -> list[str]:
    rid = request["id"]
    if request.get("op") == "ping":
        return [line(type="pong", id=rid)]
    return [
        line(type="stdout", id=rid, text="out\n"),
        line(type="result", id=rid, main=True, data={"text": "1"}),
        line(type="done", id=rid, execution_count=1),
    ]


class FakeHandle:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ended: asyncio.Future[CommandResult] = asyncio.get_running_loop().create_future()

    def done(self) -> bool:
        return self.ended.done()

    def disconnect(self) -> None:
        if not self.ended.done():
            self.ended.cancel()

    async def wait(self, *, check: bool = False) -> CommandResult:
        return await self.ended

    def exit(self, code: int) -> None:
        self.ended.set_result(CommandResult(argv=(), exit_code=code, stdout="", stderr=""))


class FakeCommands:
    def __init__(self, respond: Responder, ready: bool = True) -> None:
        self.respond = respond
        self.ready = ready
        self.handles: dict[int, FakeHandle] = {}
        self.out: dict[int, Any] = {}
        self.err: dict[int, Any] = {}
        self.tags: dict[int, str] = {}
        self.signals: list[tuple[int, int]] = []
        self.killed: list[int] = []
        self.next_pid = 100

    async def start(self, cmd: Any, **kw: Any) -> FakeHandle:
        pid = self.next_pid = self.next_pid + 1
        handle = self.handles[pid] = FakeHandle(pid)
        self.out[pid], self.err[pid], self.tags[pid] = kw["on_stdout"], kw["on_stderr"], kw["tag"]
        assert kw["max_output"] == 0 and kw["open_stdin"] and kw["background"]
        if self.ready:
            await self.out[pid](line(type="ready", id=None, cwd="/home/user", user="user"))
        return handle

    async def list(self) -> list[ProcessInfo]:
        return [
            ProcessInfo(pid, ("python3",), "/home/user", "user", self.tags[pid], True, 0.0)
            for pid, h in self.handles.items()
            if not h.done()
        ]

    async def connect(self, pid: int, **kw: Any) -> FakeHandle:
        raise AssertionError("not used here")

    async def send_signal(self, pid: int, sig: int) -> bool:
        self.signals.append((pid, sig))
        return True

    async def kill(self, pid: int) -> bool:
        self.killed.append(pid)
        if not self.handles[pid].done():
            self.handles[pid].exit(-9)
        return True

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        request = json.loads(data)
        pieces = self.respond(request)

        async def feed() -> None:
            for piece in pieces:
                await self.out[pid](piece)

        asyncio.get_running_loop().create_task(feed())


async def run(commands: FakeCommands, code: str = "x", **kw: Any) -> Any:
    interpreter = CodeInterpreter(commands)
    args: dict[str, Any] = {
        "language": None,
        "context": None,
        "env": None,
        "on_stdout": None,
        "on_stderr": None,
        "on_result": None,
        "on_error": None,
        "timeout": 10,
    }
    args.update(kw)
    return await interpreter.run(code, **args)


def test_a_well_behaved_context() -> None:
    async def main() -> None:
        commands = FakeCommands(well_behaved)
        execution = await run(commands)
        assert execution.text == "1" and execution.logs.stdout == ["out\n"]
        assert list(commands.tags.values()) == ["code-context:default-python:python"]

    asyncio.run(main())


@pytest.mark.parametrize(
    "bad",
    [
        "not json\n",
        "[1, 2]\n",
        '{"no": "type"}\n',
        '{"type": "bogus", "id": "RID"}\n',
        '{"type": "stdout", "id": "RID", "text": 5}\n',
        '{"type": "result", "id": "RID", "main": true, "data": {"png": 5}}\n',
        '{"type": "result", "id": "RID", "main": "yes", "data": {}}\n',
        '{"type": "error", "id": "RID", "name": "E"}\n',
    ],
)
def test_garbage_is_a_typed_error_and_the_context_stays_usable(bad: str) -> None:
    async def main() -> None:
        calls = 0

        def respond(request: dict[str, Any]) -> list[str]:
            nonlocal calls
            calls += 1
            rid = request["id"]
            if calls == 1:
                return [bad.replace("RID", rid), line(type="done", id=rid, execution_count=1)]
            return well_behaved(request)

        commands = FakeCommands(respond)
        interpreter = CodeInterpreter(commands)
        args = (None, None, None, None, None, None, None, 10)
        with pytest.raises(CodeInterpreterError) as info:
            await interpreter.run("x", *args)
        assert info.value.code == "code-interpreter-error"
        assert (await interpreter.run("x", *args)).text == "1"

    asyncio.run(main())


def test_an_overlong_line_is_dropped_with_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(code_module, "MAX_LINE", 1000)

    async def main() -> None:
        calls = 0

        def respond(request: dict[str, Any]) -> list[str]:
            nonlocal calls
            calls += 1
            rid = request["id"]
            if calls == 1:  # 5000 characters without a newline, in pieces, then a line
                return ["x" * 500] * 10 + ["tail\n", line(type="done", id=rid)]
            return well_behaved(request)

        interpreter = CodeInterpreter(FakeCommands(respond))
        args = (None, None, None, None, None, None, None, 10)
        with pytest.raises(CodeInterpreterError, match="over 1000"):
            await interpreter.run("x", *args)
        assert (await interpreter.run("x", *args)).text == "1"

    asyncio.run(main())


def test_events_of_other_requests_are_ignored() -> None:
    def respond(request: dict[str, Any]) -> list[str]:
        return [
            line(type="stdout", id="someone-else", text="not mine\n"),
            line(type="done", id="someone-else"),
            line(type="stdout", id=None, text="late\n"),
            *well_behaved(request),
        ]

    execution = asyncio.run(run(FakeCommands(respond)))
    assert execution.logs.stdout == ["out\n"]


def test_what_an_execution_keeps_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(code_module, "MAX_LOG_ENTRIES", 3)
    monkeypatch.setattr(code_module, "MAX_RESULTS", 2)

    def respond(request: dict[str, Any]) -> list[str]:
        rid = request["id"]
        return [
            *(line(type="stdout", id=rid, text=f"{i}\n") for i in range(10)),
            *(line(type="result", id=rid, main=False, data={"text": str(i)}) for i in range(5)),
            line(type="done", id=rid, execution_count=1),
        ]

    seen: list[str] = []
    results: list[Any] = []
    execution = asyncio.run(
        run(FakeCommands(respond), on_stdout=seen.append, on_result=results.append)
    )
    assert execution.logs.stdout == ["0\n", "1\n", "2\n"] and execution.logs.dropped == 7
    assert len(seen) == 10 and len(results) == 5  # the callbacks got everything
    assert [r.text for r in execution.results] == ["0", "1"]


def test_a_context_that_dies_mid_execution_says_why() -> None:
    async def main() -> None:
        commands = FakeCommands(lambda request: [])

        async def die() -> None:
            await asyncio.sleep(0.05)
            pid = next(iter(commands.handles))
            await commands.err[pid]("MemoryError: out of memory\n")
            commands.handles[pid].exit(1)

        asyncio.get_running_loop().create_task(die())
        with pytest.raises(CodeInterpreterError, match="status 1: MemoryError"):
            await run(commands)

    asyncio.run(main())


def test_a_context_that_never_gets_ready_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(code_module, "START_TIMEOUT", 0.1)

    async def main() -> None:
        commands = FakeCommands(well_behaved, ready=False)
        with pytest.raises(CodeInterpreterError, match="did not start"):
            await run(commands)
        assert commands.killed == list(commands.handles)
        assert await commands.list() == []

    asyncio.run(main())


def test_code_that_ignores_the_interrupt_still_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(code_module, "INTERRUPT_GRACE", 0.1)

    def respond(request: dict[str, Any]) -> list[str]:
        return [line(type="stdout", id=request["id"], text="stuck\n")]  # and no done

    async def main() -> None:
        commands = FakeCommands(respond)
        with pytest.raises(CodeTimeout, match="did not end") as info:
            await run(commands, timeout=0.2)
        assert info.value.execution.logs.stdout == ["stuck\n"]
        assert commands.signals == [(next(iter(commands.handles)), signal.SIGINT)]

    asyncio.run(main())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"language": "python", "context": "default-python"},
        {"language": "js"},
        {"context": "UPPER"},
        {"context": ""},
        {"timeout": 0},
        {"env": {"BAD=NAME": "x"}},
        {"on_result": 3},
    ],
)
def test_bad_input_is_refused_before_anything_starts(kwargs: dict[str, Any]) -> None:
    commands = FakeCommands(well_behaved)
    with pytest.raises(ConfigError):
        asyncio.run(run(commands, **kwargs))
    assert commands.handles == {}


def test_code_must_be_text_of_a_bounded_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(code_module, "MAX_CODE", 10)
    commands = FakeCommands(well_behaved)
    with pytest.raises(ConfigError, match="at most 10"):
        asyncio.run(run(commands, "x" * 11))
    with pytest.raises(ConfigError, match="must be a string"):
        asyncio.run(run(commands, b"x"))  # type: ignore[arg-type]
    assert commands.handles == {}
