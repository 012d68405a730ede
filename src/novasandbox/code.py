"""The code interpreter: ``run_code`` and code contexts, over the commands API.

A context is one long-running process of the guest's interpreter script
(``/opt/novasandbox/interp.py``, ``guest/interp.py`` here) started in the background
with its stdin open and tagged ``code-context:ID:LANGUAGE``, so any client finds it in
``commands.list()`` and reaches it by pid. Requests go to its stdin (``send_stdin``), its
events come back as JSON lines on its stdout (through the handle that started it, or a
``commands.connect``). Nothing here knows whether the sandbox is local or on a server:
it only uses ``sandbox.commands``.

The guest is not trusted: event lines, the events of an execution and the text kept are
bounded, and what is not the protocol raises ``CodeInterpreterError``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import re
import secrets
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from .commands import OutputCallback, _call_back
from .config import validate_env, validate_timeout, validate_user
from .errors import (
    CodeContextNotFound,
    CodeInterpreterError,
    CodeTimeout,
    ConfigError,
    NovaSandboxError,
    ProcessNotFound,
)
from .results import (
    CodeContext,
    CommandResult,
    Execution,
    ExecutionError,
    Logs,
    ProcessInfo,
    Result,
)

INTERP = "/opt/novasandbox/interp.py"
"""Where the image has the interpreter script (``templates.build.install_guest``)."""
LANGUAGES = ("python", "bash")
TAG_PREFIX = "code-context:"
DEFAULT_CODE_TIMEOUT = 300.0
"""Seconds an execution may run before it is interrupted (``CodeTimeout``)."""
MAX_CODE = 16 * 1024 * 1024
"""Characters of code one execution may send."""
MAX_LINE = 24 * 1024 * 1024
"""Bytes of one event line from the guest (a result of 8 MiB of base64 fits; the guest
leaves out larger representations)."""
MAX_LOG_ENTRIES = 100_000
"""Entries of each of stdout and stderr an ``Execution`` keeps (callbacks get them all)."""
MAX_LOG_CHARS = 16 * 1024 * 1024
"""Characters of each of stdout and stderr an ``Execution`` keeps."""
MAX_RESULTS = 1000
"""Results an ``Execution`` keeps."""
START_TIMEOUT = 60.0
"""Seconds a new context's interpreter has to say it is ready."""
INTERRUPT_GRACE = 10.0
"""Seconds an interrupted execution has to end before ``CodeTimeout`` is raised anyway."""
REMOVE_TIMEOUT = 10.0
"""Seconds a removed context's process has to leave ``commands.list()``."""
STDERR_TAIL = 4096
"""Characters of the interpreter process's own stderr kept to explain its end."""

_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_KINDS = ("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json", "javascript")

ResultCallback = Callable[[Result], Any]
ErrorCallback = Callable[[ExecutionError], Any]


class _Handle(Protocol):
    """What the code interpreter uses of a command handle (local or remote)."""

    @property
    def pid(self) -> int: ...

    def done(self) -> bool: ...

    def disconnect(self) -> None: ...

    async def wait(self, *, check: bool = False) -> CommandResult: ...


class CommandsLike(Protocol):
    """What the code interpreter uses of ``sandbox.commands`` (local or remote)."""

    async def start(
        self,
        cmd: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = ...,
        cwd: str | None = ...,
        timeout: float | None = ...,
        stdin: str | bytes | None = ...,
        open_stdin: bool = ...,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        max_output: int | None = ...,
        background: bool = ...,
        user: str | None = ...,
        tag: str | None = ...,
    ) -> Any: ...

    async def list(self) -> builtins.list[ProcessInfo]: ...

    async def connect(
        self,
        pid: int,
        *,
        on_stdout: OutputCallback | None = ...,
        on_stderr: OutputCallback | None = ...,
        max_output: int | None = ...,
    ) -> Any: ...

    async def send_signal(self, pid: int, sig: int) -> bool: ...

    async def kill(self, pid: int) -> bool: ...

    async def send_stdin(self, pid: int, data: str | bytes) -> None: ...


def validate_language(language: Any) -> str:
    if language not in LANGUAGES:
        raise ConfigError(f"language must be one of {', '.join(LANGUAGES)}, got {language!r}")
    return str(language)


def context_id(context: CodeContext | str) -> str:
    """The id of a context given as the object or its id."""
    if isinstance(context, CodeContext):
        return context.id
    if not isinstance(context, str) or not _ID.fullmatch(context):
        raise ConfigError(
            "context must be a CodeContext or a context id ([a-z0-9-], at most 63 "
            f"characters), got {context!r}"
        )
    return context


def _tag(ctx_id: str, language: str) -> str:
    return f"{TAG_PREFIX}{ctx_id}:{language}"


def _from_process(info: ProcessInfo) -> CodeContext | None:
    """The context a listed process is, if it is one."""
    if info.tag is None or not info.tag.startswith(TAG_PREFIX):
        return None
    ctx_id, _, language = info.tag[len(TAG_PREFIX) :].partition(":")
    if not _ID.fullmatch(ctx_id) or language not in LANGUAGES:
        return None
    return CodeContext(id=ctx_id, language=language, cwd=info.cwd, user=info.user, pid=info.pid)


class _Run:
    """One execution in progress: what it produced so far, and its end."""

    def __init__(
        self,
        run_id: str,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        on_result: ResultCallback | None,
        on_error: ErrorCallback | None,
    ) -> None:
        self.id = run_id
        self.execution = Execution()
        self.callbacks: dict[str, Callable[[Any], Any] | None] = {
            "stdout": on_stdout,
            "stderr": on_stderr,
            "result": on_result,
            "error": on_error,
        }
        self.kept = {"stdout": 0, "stderr": 0}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.failure: BaseException | None = None
        """What ends it with an exception: the interpreter's end or garbage, or the first
        exception a callback raised (callbacks are not called after it)."""

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        if not self.done.done():
            self.done.set_result(None)

    async def call_back(self, kind: str, value: Any) -> None:
        callback = self.callbacks[kind]
        if callback is None or self.failure is not None:
            return
        try:
            if kind in ("stdout", "stderr"):
                await _call_back(callback, value)
            else:
                outcome = callback(value)
                if asyncio.iscoroutine(outcome) or isinstance(outcome, asyncio.Future):
                    await outcome
        except Exception as exc:  # the caller's: raised from run_code once it ended
            self.failure = exc

    async def output(self, kind: str, text: str) -> None:
        logs = self.execution.logs
        entries = logs.stdout if kind == "stdout" else logs.stderr
        if len(entries) < MAX_LOG_ENTRIES and self.kept[kind] + len(text) <= MAX_LOG_CHARS:
            entries.append(text)
            self.kept[kind] += len(text)
        else:
            logs.dropped += 1
        await self.call_back(kind, text)


def _text(event: Mapping[str, Any], key: str) -> str:
    value = event.get(key)
    if not isinstance(value, str):
        raise CodeInterpreterError(f"a {event.get('type')!r} event without text {key!r}")
    return value


def _result(event: Mapping[str, Any]) -> Result:
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(event.get("main"), bool):
        raise CodeInterpreterError("a result event in an unknown shape")
    fields: dict[str, Any] = {}
    for kind in _KINDS:
        value = data.get(kind)
        if value is None:
            continue
        if kind != "json" and not isinstance(value, str):
            raise CodeInterpreterError(f"a result whose {kind!r} is not text")
        fields[kind] = value
    return Result(is_main_result=event["main"], **fields)


class _Live:
    """A context this client speaks to: the handle its events come through, and the
    execution they belong to."""

    def __init__(self, commands: CommandsLike, ctx: CodeContext | None, language: str) -> None:
        self.commands = commands
        self.ctx = ctx
        self.language = language
        self.handle: _Handle | None = None
        self.lock = asyncio.Lock()
        """One execution at a time from this client."""
        self.run: _Run | None = None
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        """Futures for ``ready`` (key ``""``) and ``pong`` events by request id."""
        self.synced = ctx is None
        """Whether old output is behind us: a started context's first line is its own; a
        connected one's replay ends at our ``pong``."""
        self._partial: list[str] = []
        self._partial_size = 0
        self._skipping = False
        self.stderr_tail = ""
        self.ended: str | None = None
        """Why it can no longer be used (its process ended, the stream broke)."""
        self._watch: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.ctx is not None
        return self.ctx.pid

    def attach(self, handle: _Handle) -> None:
        self.handle = handle
        self._watch = asyncio.get_running_loop().create_task(self._watch_end(handle))

    async def _watch_end(self, handle: _Handle) -> None:
        try:
            result = await handle.wait()
            why = f"its interpreter exited with status {result.exit_code}"
        except asyncio.CancelledError:
            why = "this client stopped reading it"
        except NovaSandboxError as exc:
            why = f"its stream ended: {exc}"
        tail = self.stderr_tail.strip()
        self.end(why + (f": {tail[-1000:]}" if tail else ""))

    def end(self, why: str) -> None:
        if self.ended is not None:
            return
        self.ended = why
        name = self.ctx.id if self.ctx is not None else "new"
        error = CodeInterpreterError(f"the code context {name!r} ended ({why})")
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(error)
        if self.run is not None:
            self.run.fail(error)

    def close(self) -> None:
        """Stop reading it (the process runs on)."""
        if self.handle is not None:
            self.handle.disconnect()
        self.end("this client stopped reading it")

    # --- the stream (in the handle's reader; must not raise)

    async def on_stderr(self, text: str) -> None:
        self.stderr_tail = (self.stderr_tail + text)[-STDERR_TAIL:]

    async def on_stdout(self, text: str) -> None:
        try:
            while text:
                head, newline, text = text.partition("\n")
                if self._skipping:
                    self._skipping = not newline
                    continue
                self._partial.append(head)
                self._partial_size += len(head)
                if self._partial_size > MAX_LINE:
                    self._partial, self._partial_size = [], 0
                    self._skipping = not newline
                    self._garbage(f"an event line over {MAX_LINE} bytes")
                    continue
                if newline:
                    line = "".join(self._partial)
                    self._partial, self._partial_size = [], 0
                    await self._line(line)
        except Exception as exc:  # a bug here must not end the stream: the run says it
            if self.run is not None:
                self.run.fail(exc)

    def _garbage(self, what: str) -> None:
        if self.synced and self.run is not None:
            self.run.fail(CodeInterpreterError(f"the code context wrote {what}"))

    async def _line(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            self._garbage("a line that is not JSON")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self._garbage("a line that is not an event")
            return
        kind, rid = event["type"], event.get("id")
        if kind == "ready" and "" in self.waiting:
            if not self.waiting[""].done():
                self.waiting[""].set_result(event)
            return
        if kind == "pong" and isinstance(rid, str) and rid in self.waiting:
            self.synced = True
            if not self.waiting[rid].done():
                self.waiting[rid].set_result(event)
            return
        run = self.run
        if run is None or rid != run.id or run.done.done():
            return  # old output, or another client's execution
        try:
            await self._event(run, kind, event)
        except CodeInterpreterError as exc:
            run.fail(exc)

    async def _event(self, run: _Run, kind: str, event: dict[str, Any]) -> None:
        execution = run.execution
        if kind in ("stdout", "stderr"):
            await run.output(kind, _text(event, "text"))
        elif kind == "result":
            result = _result(event)
            if len(execution.results) < MAX_RESULTS:
                execution.results.append(result)
            await run.call_back("result", result)
        elif kind == "error":
            error = ExecutionError(
                name=_text(event, "name"),
                value=_text(event, "value"),
                traceback=_text(event, "traceback"),
            )
            execution.error = error
            await run.call_back("error", error)
        elif kind == "done":
            count = event.get("execution_count")
            if isinstance(count, int) and not isinstance(count, bool):
                execution.execution_count = count
            if not run.done.done():
                run.done.set_result(None)
        else:
            raise CodeInterpreterError(f"an event of unknown type {kind!r}")

    # --- requests

    async def send(self, request: dict[str, Any]) -> None:
        line = json.dumps(request, separators=(",", ":")) + "\n"
        try:
            await self.commands.send_stdin(self.pid, line)
        except ProcessNotFound as exc:
            self.end("its process is gone")
            raise CodeContextNotFound(f"the code context {self.pid} is gone") from exc

    async def expect(self, key: str, timeout: float, what: str) -> dict[str, Any]:
        future = self.waiting[key]
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise CodeInterpreterError(
                f"the code context did not {what} within {timeout} s"
            ) from None
        finally:
            self.waiting.pop(key, None)

    async def sync(self) -> None:
        """Wait until what this connection replays of old output is behind us."""
        rid = secrets.token_hex(8)
        self.waiting[rid] = asyncio.get_running_loop().create_future()
        await self.send({"op": "ping", "id": rid})
        await self.expect(rid, START_TIMEOUT, "answer")

    async def execute(
        self,
        code: str,
        env: Mapping[str, str],
        timeout: float | None,
        callbacks: tuple[
            OutputCallback | None,
            OutputCallback | None,
            ResultCallback | None,
            ErrorCallback | None,
        ],
    ) -> Execution:
        async with self.lock:
            if self.ended is not None:
                raise CodeInterpreterError(f"the code context ended ({self.ended})")
            run = self.run = _Run(secrets.token_hex(8), *callbacks)
            try:
                await self.send({"id": run.id, "code": code, "env": dict(env)})
                try:
                    await asyncio.wait_for(asyncio.shield(run.done), timeout)
                except TimeoutError:
                    await self._interrupt(run, timeout)
                if run.failure is not None:
                    raise run.failure
                return run.execution
            finally:
                self.run = None

    async def _interrupt(self, run: _Run, timeout: float | None) -> None:
        """SIGINT to the context's process group: ``KeyboardInterrupt`` in Python, the
        bash function that runs the code returns. The context and its state survive."""
        with contextlib.suppress(ProcessNotFound):
            await self.commands.send_signal(self.pid, signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.done), INTERRUPT_GRACE)
        if run.failure is not None and not isinstance(run.failure, CodeInterpreterError):
            raise run.failure
        answered = "" if run.done.done() else f" (it did not end within {INTERRUPT_GRACE} s)"
        raise CodeTimeout(
            f"the code ran past its {timeout} s timeout and was interrupted{answered}",
            run.execution,
        )


class CodeInterpreter:
    """The code contexts of one sandbox, as this client sees them (``sandbox.run_code``
    and the ``*_code_context`` methods call it)."""

    def __init__(self, commands: CommandsLike) -> None:
        self._commands = commands
        self._live: dict[str, _Live] = {}
        self._opening: asyncio.Lock | None = None

    def _lock(self) -> asyncio.Lock:
        if self._opening is None:
            self._opening = asyncio.Lock()
        return self._opening

    async def run(
        self,
        code: str,
        language: str | None,
        context: CodeContext | str | None,
        env: Mapping[str, str] | None,
        on_stdout: OutputCallback | None,
        on_stderr: OutputCallback | None,
        on_result: ResultCallback | None,
        on_error: ErrorCallback | None,
        timeout: float | None,
    ) -> Execution:
        if not isinstance(code, str):
            raise ConfigError(f"code must be a string, got {type(code).__name__}")
        if len(code) > MAX_CODE:
            raise ConfigError(f"code must be at most {MAX_CODE} characters, got {len(code)}")
        if language is not None and context is not None:
            raise ConfigError("give a language or a context, not both (a context has one)")
        for name, callback in (
            ("on_stdout", on_stdout),
            ("on_stderr", on_stderr),
            ("on_result", on_result),
            ("on_error", on_error),
        ):
            if callback is not None and not callable(callback):
                raise ConfigError(f"{name} must be callable, got {callback!r}")
        env = validate_env(env)
        timeout = validate_timeout(timeout)
        if context is None:
            ctx_id = f"default-{validate_language(language or 'python')}"
        else:
            ctx_id = context_id(context)
        live = await self._open(ctx_id)
        return await live.execute(code, env, timeout, (on_stdout, on_stderr, on_result, on_error))

    async def _open(self, ctx_id: str) -> _Live:
        """This client's connection to context ``ctx_id``: the one it has, one to the
        context some client started, or (for a default context) a new context."""
        async with self._lock():
            live = self._live.get(ctx_id)
            if live is not None and live.ended is None:
                return live
            found = await self._find(ctx_id)
            if found is not None:
                live = await self._connect(found)
            elif ctx_id.startswith("default-"):
                language = ctx_id.removeprefix("default-")
                live = await self._start(ctx_id, language, None, None)
            else:
                raise CodeContextNotFound(f"no code context {ctx_id!r} runs in this sandbox")
            self._live[ctx_id] = live
            return live

    async def _find(self, ctx_id: str) -> CodeContext | None:
        found = [c for c in await self.list() if c.id == ctx_id]
        return found[0] if found else None

    async def _connect(self, ctx: CodeContext) -> _Live:
        live = _Live(self._commands, ctx, ctx.language)
        try:
            handle = await self._commands.connect(
                ctx.pid, on_stdout=live.on_stdout, on_stderr=live.on_stderr, max_output=0
            )
        except ProcessNotFound as exc:
            raise CodeContextNotFound(f"the code context {ctx.id!r} ended") from exc
        live.attach(handle)
        try:
            await live.sync()
        except BaseException:
            live.close()
            raise
        return live

    async def _start(self, ctx_id: str, language: str, cwd: str | None, user: str | None) -> _Live:
        live = _Live(self._commands, None, language)
        live.waiting[""] = asyncio.get_running_loop().create_future()
        env = {"MPLBACKEND": "Agg"} if language == "python" else {}
        handle = await self._commands.start(
            ["python3", INTERP, language],
            env=env,
            cwd=cwd,
            timeout=None,
            open_stdin=True,
            on_stdout=live.on_stdout,
            on_stderr=live.on_stderr,
            max_output=0,
            background=True,
            user=user,
            tag=_tag(ctx_id, language),
        )
        live.attach(handle)
        try:
            ready = await live.expect("", START_TIMEOUT, "start")
            live.ctx = CodeContext(
                id=ctx_id,
                language=language,
                cwd=str(ready.get("cwd", "")),
                user=str(ready.get("user", "")),
                pid=handle.pid,
            )
        except BaseException:
            live.close()
            with contextlib.suppress(NovaSandboxError):
                await self._commands.kill(handle.pid)
            raise
        return live

    async def create(self, cwd: str | None, language: str, user: str | None) -> CodeContext:
        language = validate_language(language)
        user = validate_user(user)
        if cwd is not None and (not isinstance(cwd, str) or not cwd):
            raise ConfigError(f"cwd must be a non-empty path, got {cwd!r}")
        ctx_id = f"ctx-{secrets.token_hex(6)}"
        async with self._lock():
            live = await self._start(ctx_id, language, cwd, user)
            self._live[ctx_id] = live
        assert live.ctx is not None
        return live.ctx

    async def list(self) -> builtins.list[CodeContext]:
        contexts = [_from_process(p) for p in await self._commands.list()]
        return sorted((c for c in contexts if c is not None), key=lambda c: c.pid)

    async def remove(self, context: CodeContext | str) -> CodeContext:
        """End the context's process (and its process group); returns what it was.
        ``CodeContextNotFound`` if it does not run."""
        ctx_id = context_id(context)
        async with self._lock():
            live = self._live.pop(ctx_id, None)
            ctx = await self._find(ctx_id)
            if live is not None:
                live.close()
            if ctx is None:
                raise CodeContextNotFound(f"no code context {ctx_id!r} runs in this sandbox")
            await self._commands.kill(ctx.pid)
            deadline = time.monotonic() + REMOVE_TIMEOUT
            while any(p.pid == ctx.pid for p in await self._commands.list()):
                if time.monotonic() >= deadline:
                    raise CodeInterpreterError(
                        f"the code context {ctx_id!r} (pid {ctx.pid}) did not end when killed"
                    )
                await asyncio.sleep(0.02)
            return ctx

    async def restart(self, context: CodeContext | str) -> CodeContext:
        """A fresh interpreter for the context (same id, language, directory and user):
        its state is gone."""
        old = await self.remove(context)
        async with self._lock():
            live = await self._start(old.id, old.language, old.cwd, old.user)
            self._live[old.id] = live
        assert live.ctx is not None
        return live.ctx


class CodeMethods:
    """The code interpreter's methods of a sandbox, local (``AsyncSandbox``) or remote
    (``RemoteSandbox``): both set ``_code``, a ``CodeInterpreter`` over their commands."""

    _code: CodeInterpreter

    async def run_code(
        self,
        code: str,
        language: str | None = None,
        context: CodeContext | str | None = None,
        *,
        env: Mapping[str, str] | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        on_result: ResultCallback | None = None,
        on_error: ErrorCallback | None = None,
        timeout: float | None = DEFAULT_CODE_TIMEOUT,
    ) -> Execution:
        """Run ``code`` in a code context and return what it produced: ``results`` (the
        value of the last expression is the one with ``is_main_result``), ``logs``
        (one entry per write), ``error`` (an exception the code raised, with its
        traceback) and ``execution_count``. State persists between calls in a context.

        ``language`` (``python``, the default, or ``bash``) picks that language's default
        context, created on first use; ``context`` (a ``CodeContext`` or its id) another
        one: giving both is a ``ConfigError``. ``env`` applies to this execution only.
        Output, results and errors are streamed to the callbacks while the code runs
        (they may be coroutines). Past ``timeout`` seconds the code is interrupted
        (``KeyboardInterrupt``; SIGINT in bash), the context keeps its state, and
        ``CodeTimeout`` is raised with what it produced."""
        return await self._code.run(
            code, language, context, env, on_stdout, on_stderr, on_result, on_error, timeout
        )

    async def create_code_context(
        self, cwd: str | None = None, language: str = "python", *, user: str | None = None
    ) -> CodeContext:
        """A new code context (an interpreter process whose state persists), in ``cwd``
        (default: the user's home), as ``user`` (default: the template's user)."""
        return await self._code.create(cwd, language, user)

    async def list_code_contexts(self) -> builtins.list[CodeContext]:
        """The code contexts running in the sandbox (any client's)."""
        return await self._code.list()

    async def restart_code_context(self, context: CodeContext | str) -> CodeContext:
        """A fresh interpreter for ``context`` (same id, language, directory, user): its
        state is gone. ``CodeContextNotFound`` if it does not run."""
        return await self._code.restart(context)

    async def remove_code_context(self, context: CodeContext | str) -> None:
        """End ``context``'s interpreter (and what it started in its process group).
        ``CodeContextNotFound`` if it does not run."""
        await self._code.remove(context)


__all__ = [
    "DEFAULT_CODE_TIMEOUT",
    "CodeContext",
    "CodeInterpreter",
    "CodeMethods",
    "CommandsLike",
    "ErrorCallback",
    "Execution",
    "ExecutionError",
    "Logs",
    "Result",
    "ResultCallback",
]
