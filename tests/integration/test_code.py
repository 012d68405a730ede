"""The code interpreter in a real VM (``run_code`` and code contexts), local (restored,
cold) and remote (through a server): one source, every mode."""

from __future__ import annotations

import asyncio
import base64
import threading
import uuid
from typing import Any

import pytest

from novasandbox import (
    CodeContext,
    CodeContextNotFound,
    CodeTimeout,
    ConfigError,
    Execution,
    ExecutionError,
    InvalidWorkingDirectory,
    Result,
    Sandbox,
)
from novasandbox.code import CodeInterpreter
from novasandbox.sync import _Portal

pytestmark = pytest.mark.integration

WAIT = 60.0
"""Seconds a test waits for something the guest should do (a bound against hangs)."""


@pytest.fixture(scope="module")
def sb(sandbox: Sandbox) -> Sandbox:
    """Every test here runs local (restored, cold) and remote (through a server)."""
    return sandbox


@pytest.fixture
def ctx(sb: Sandbox) -> Any:
    """A context of its own for a test, removed after it."""
    context = sb.create_code_context()
    yield context
    if any(c.id == context.id for c in sb.list_code_contexts()):
        sb.remove_code_context(context)


def guest_processes(sb: Sandbox, marker: str) -> list[str]:
    """Command lines of guest processes that mention ``marker`` (the probe excludes
    itself)."""
    probe = (
        "import os\n"
        "me = str(os.getpid())\n"
        "for p in os.listdir('/proc'):\n"
        "    if p.isdigit() and p != me:\n"
        "        try:\n"
        "            c = open(f'/proc/{p}/cmdline','rb').read().replace(b'\\0', b' ')\n"
        "        except OSError:\n"
        "            continue\n"
        f"        if {marker!r}.encode() in c:\n"
        "            print(p, c.decode(errors='replace'))\n"
    )
    return sb.commands.run(["python3", "-c", probe]).stdout.splitlines()


def test_state_persists_and_the_last_expression_is_the_main_result(sb: Sandbox) -> None:
    first = sb.run_code("x = 41\nprint('set')")
    assert isinstance(first, Execution)
    assert first.results == [] and first.error is None
    assert first.logs.stdout == ["set\n"]
    second = sb.run_code("y = x + 1\ny")
    assert second.text == "42"
    assert second.results == [Result(text="42", is_main_result=True)]
    assert second.execution_count is not None and first.execution_count is not None
    assert second.execution_count == first.execution_count + 1
    assert sb.run_code("None").results == []


def test_the_default_context_is_made_on_first_use_in_the_users_home(sb: Sandbox) -> None:
    sb.run_code("pass")
    (default,) = [c for c in sb.list_code_contexts() if c.id == "default-python"]
    assert (default.language, default.cwd, default.user) == ("python", "/home/user", "user")
    assert sb.run_code("import os, getpass; (os.getcwd(), getpass.getuser())").text == (
        "('/home/user', 'user')"
    )
    processes = {p.pid: p for p in sb.commands.list()}
    assert processes[default.pid].tag == "code-context:default-python:python"


def test_one_stdout_entry_per_write_streamed_while_the_code_runs(sb: Sandbox) -> None:
    """The code waits for a file the test writes only once the callback got the first
    line: without streaming it would wait until its own bound and say so."""
    go = f"/tmp/go-{uuid.uuid4().hex}"
    seen: list[str] = []
    first = threading.Event()

    def on_stdout(text: str) -> None:
        seen.append(text)
        first.set()

    code = (
        "import os, sys, time\n"
        "print('first')\n"
        "for _ in range(1200):\n"
        f"    if os.path.exists({go!r}):\n"
        "        break\n"
        "    time.sleep(0.05)\n"
        "else:\n"
        "    print('not streamed')\n"
        "print('second', 2)\n"
        "sys.stdout.write('third\\n')\n"
        "os.system('echo from a child')\n"
        "print('to stderr', file=sys.stderr)\n"
    )
    done: list[Execution] = []
    runner = threading.Thread(target=lambda: done.append(sb.run_code(code, on_stdout=on_stdout)))
    runner.start()
    try:
        assert first.wait(WAIT), "no output while the code ran"
        sb.files.write(go, "go")
    finally:
        runner.join(WAIT * 2)
    (execution,) = done
    assert execution.logs.stdout == ["first\n", "second 2\n", "third\n", "from a child\n"]
    assert seen == execution.logs.stdout
    assert execution.logs.stderr == ["to stderr\n"]


def test_callbacks_may_be_coroutines_in_the_async_api(sb: Sandbox) -> None:
    got: list[tuple[str, Any]] = []

    async def on_stdout(text: str) -> None:
        await asyncio.sleep(0)
        got.append(("stdout", text))

    async def on_result(result: Result) -> None:
        got.append(("result", result.text))

    async def on_error(error: ExecutionError) -> None:
        got.append(("error", error.name))

    inner = sb._inner  # the AsyncSandbox or RemoteSandbox behind the blocking twin
    execution = _Portal.call(
        inner.run_code("print('a')\ndisplay(1)\n2", on_stdout=on_stdout, on_result=on_result)
    )
    assert got == [("stdout", "a\n"), ("result", "1"), ("result", "2")]
    assert [r.is_main_result for r in execution.results] == [False, True]
    _Portal.call(inner.run_code("1/0", on_error=on_error))
    assert got[-1] == ("error", "ZeroDivisionError")


def test_an_error_has_its_name_value_and_traceback(sb: Sandbox) -> None:
    errors: list[ExecutionError] = []
    execution = sb.run_code(
        "def f():\n    raise ValueError('bad value')\nprint('before')\nf()\n'never'",
        on_error=errors.append,
    )
    error = execution.error
    assert error is not None and errors == [error]
    assert (error.name, error.value) == ("ValueError", "bad value")
    assert "raise ValueError('bad value')" in error.traceback
    assert error.traceback.startswith("Traceback (most recent call last):")
    assert "interp.py" not in error.traceback
    assert execution.logs.stdout == ["before\n"] and execution.results == []
    assert sb.run_code("def g(:").error.name == "SyntaxError"  # type: ignore[union-attr]


def test_a_timeout_interrupts_the_code_and_keeps_the_state(sb: Sandbox, ctx: CodeContext) -> None:
    sb.run_code("kept = 7", context=ctx)
    with pytest.raises(CodeTimeout) as info:
        sb.run_code(
            "import time\nprint('going')\nwhile True:\n    time.sleep(0.05)",
            context=ctx,
            timeout=3,
        )
    assert info.value.code == "code-timeout"
    interrupted = info.value.execution
    assert interrupted.logs.stdout == ["going\n"]
    assert interrupted.error is not None and interrupted.error.name == "KeyboardInterrupt"
    assert sb.run_code("kept", context=ctx).text == "7"
    assert [c.pid for c in sb.list_code_contexts() if c.id == ctx.id] == [ctx.pid]


def test_rich_representations(sb: Sandbox) -> None:
    code = (
        "class Chart:\n"
        "    def _repr_html_(self): return '<b>chart</b>'\n"
        "    def _repr_png_(self): return b'\\x89PNG\\r\\n\\x1a\\n'\n"
        "    def _repr_json_(self): return {'points': [1, 2]}\n"
        "    def __repr__(self): return 'Chart()'\n"
        "Chart()"
    )
    (result,) = sb.run_code(code).results
    assert result.is_main_result
    assert result.html == "<b>chart</b>"
    assert base64.b64decode(result.png or "") == b"\x89PNG\r\n\x1a\n"
    assert result.json == {"points": [1, 2]}
    assert result.text == "Chart()"
    assert result.formats() == ["text", "html", "png", "json"]


def test_without_matplotlib_a_plain_python_still_answers(sb: Sandbox) -> None:
    """The python template has no matplotlib: its import fails as any missing module
    does, and nothing else changes (the figures path is tested without a VM)."""
    execution = sb.run_code("import matplotlib.pyplot as plt")
    assert execution.error is not None and execution.error.name == "ModuleNotFoundError"
    assert sb.run_code("import importlib.util; importlib.util.find_spec('IPython')").results == []


def test_env_applies_to_one_execution_on_top_of_the_sandboxes(sb: Sandbox) -> None:
    code = (
        "import os, subprocess\n"
        "child = subprocess.run(['sh', '-c', 'echo $FOO'], capture_output=True, text=True)\n"
        "(os.environ.get('FOO'), child.stdout.strip(), os.environ['SANDBOX_LEVEL'])"
    )
    assert sb.run_code(code, env={"FOO": "bar"}).text == "('bar', 'bar', 'yes')"
    assert sb.run_code(code).text == "(None, '', 'yes')"


def test_contexts_create_list_restart_remove(sb: Sandbox) -> None:
    made = sb.create_code_context(cwd="/tmp")
    try:
        assert (made.language, made.cwd, made.user) == ("python", "/tmp", "user")
        assert made in sb.list_code_contexts()
        assert sb.run_code("import os; here = os.getcwd(); here", context=made).text == "'/tmp'"
        assert sb.run_code("here", context=made.id).text == "'/tmp'"  # by id
        assert sb.run_code("'here' in dir()").text == "False"  # not in the default context
        again = sb.restart_code_context(made)
        assert (again.id, again.cwd, again.language) == (made.id, "/tmp", "python")
        assert again.pid != made.pid
        lost = sb.run_code("here", context=made)
        assert lost.error is not None and lost.error.name == "NameError"
        assert lost.execution_count == 1
    finally:
        sb.remove_code_context(made.id)
    assert made.id not in [c.id for c in sb.list_code_contexts()]
    assert again.pid not in [p.pid for p in sb.commands.list()]
    with pytest.raises(CodeContextNotFound) as info:
        sb.run_code("1", context=made)
    assert info.value.code == "code-context-not-found"
    with pytest.raises(CodeContextNotFound):
        sb.remove_code_context(made)
    with pytest.raises(CodeContextNotFound):
        sb.restart_code_context(made.id)


def test_a_context_runs_as_the_account_it_names(sb: Sandbox) -> None:
    made = sb.create_code_context(user="root")
    try:
        assert (made.user, made.cwd) == ("root", "/root")
        assert sb.run_code(
            "import getpass, os; (getpass.getuser(), os.getcwd())", context=made
        ).text == ("('root', '/root')")
        out = sb.run_code("whoami", language="bash")
        assert out.logs.stdout == ["user\n"]  # the default contexts: the template's user
    finally:
        sb.remove_code_context(made)


def test_removing_a_context_leaves_nothing_running(sb: Sandbox) -> None:
    made = sb.create_code_context()
    marker = uuid.uuid4().hex
    sb.run_code(
        f"import subprocess\nkid = subprocess.Popen(['sh', '-c', 'sleep 1000; : {marker}'])",
        context=made,
    )
    assert len(guest_processes(sb, marker)) == 1
    sb.remove_code_context(made)
    assert guest_processes(sb, marker) == []
    # every interpreter process in the guest is a context commands.list() shows
    listed = {p.pid for p in sb.commands.list()}
    for line in guest_processes(sb, "/opt/novasandbox/interp.py"):
        assert int(line.split()[0]) in listed, line


def test_another_client_reaches_a_context_by_id(sb: Sandbox, ctx: CodeContext) -> None:
    """A second interpreter client over the same sandbox (as another process would be)
    attaches to the running context by its id and sees its state; old output it is
    replayed is not taken for its own."""
    sb.run_code("shared = 'from the first'\nprint('noise ' * 100)", context=ctx)
    other = CodeInterpreter(sb._inner.commands)

    async def use() -> Execution:
        return await other.run("shared", None, ctx.id, None, None, None, None, None, 30)

    assert _Portal.call(use()).text == "'from the first'"
    assert sb.run_code("shared + '!'", context=ctx).text == "'from the first!'"


def test_a_callback_that_raises_fails_the_call_not_the_context(
    sb: Sandbox, ctx: CodeContext
) -> None:
    def broken(text: str) -> None:
        raise RuntimeError("callback broke")

    with pytest.raises(RuntimeError, match="callback broke"):
        sb.run_code("print('x')\nafter = 1", context=ctx, on_stdout=broken)
    assert sb.run_code("after", context=ctx).text == "1"


def test_bash_contexts_keep_variables_and_the_working_directory(sb: Sandbox) -> None:
    first = sb.run_code("COUNT=5\ncd /tmp\necho set; echo warn >&2", language="bash")
    assert first.logs.stdout == ["set\n"] and first.logs.stderr == ["warn\n"]
    second = sb.run_code("echo $COUNT $(pwd) $(whoami)", language="bash")
    assert "".join(second.logs.stdout) == "5 /tmp user\n"
    failed = sb.run_code("ls /nonexistent", language="bash")
    assert failed.error is not None and failed.error.value == "2"
    assert "No such file" in "".join(failed.logs.stderr)
    made = sb.create_code_context(language="bash")
    try:
        assert made.cwd == "/home/user"
        out = sb.run_code("echo [${COUNT-}] $(pwd)", context=made)
        assert "".join(out.logs.stdout) == "[] /home/user\n"  # its own shell
        with pytest.raises(CodeTimeout):
            sb.run_code("X=kept; sleep 100", context=made, timeout=2)
        assert "".join(sb.run_code("echo $X", context=made).logs.stdout) == "kept\n"
        env = sb.run_code("echo $FOO", context=made, env={"FOO": "per call"})
        assert "".join(env.logs.stdout) == "per call\n"
    finally:
        sb.remove_code_context(made)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"code": "1", "language": "python", "context": "default-python"}, ConfigError),
        ({"code": "1", "language": "ruby"}, ConfigError),
        ({"code": b"1"}, ConfigError),
        ({"code": "1", "context": "Bad Id!"}, ConfigError),
        ({"code": "1", "context": 42}, ConfigError),
        ({"code": "1", "timeout": -1}, ConfigError),
        ({"code": "1", "env": {"A": 1}}, ConfigError),
        ({"code": "1", "on_stdout": "not callable"}, ConfigError),
        ({"code": "1", "context": "ctx-000000000000"}, CodeContextNotFound),
    ],
)
def test_bad_input_is_a_typed_error_and_changes_nothing(
    sb: Sandbox, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    before = sb.list_code_contexts()
    with pytest.raises(error) as info:
        sb.run_code(**kwargs)
    assert info.value.code in ("invalid-config", "code-context-not-found")  # type: ignore[attr-defined]
    assert sb.list_code_contexts() == before


def test_bad_context_creation_is_a_typed_error_and_leaves_nothing(sb: Sandbox) -> None:
    before = sb.list_code_contexts()
    processes = sb.commands.list()
    with pytest.raises(ConfigError):
        sb.create_code_context(language="ruby")
    with pytest.raises(ConfigError):
        sb.create_code_context(cwd="")
    with pytest.raises(ConfigError):
        sb.create_code_context(user="Not A User")
    with pytest.raises(InvalidWorkingDirectory):
        sb.create_code_context(cwd="/no/such/dir")
    with pytest.raises(ConfigError):
        sb.remove_code_context("../x")
    assert sb.list_code_contexts() == before
    assert sb.commands.list() == processes
