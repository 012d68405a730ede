"""The guest's interpreter script (``guest/interp.py``) without a VM: run as a process of
a real Python on the host, spoken to as the host's code interpreter speaks to it (JSON
lines on stdin and stdout, SIGINT to its process group)."""

from __future__ import annotations

import base64
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from novasandbox.guest import interp

SCRIPT = Path(interp.__file__)
WAIT = 30.0
"""Seconds an event may take before the test fails (a bound against hangs, not a
measure)."""


class Interp:
    def __init__(self, language: str = "python", python: str = sys.executable, **patch: int):
        if patch:  # smaller bounds, set in the script's module before it runs
            sets = "; ".join(f"interp.{k} = {v!r}" for k, v in patch.items())
            argv = [
                python,
                "-c",
                f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import interp; "
                f"{sets}; sys.exit(interp.main(['interp', {language!r}]))",
            ]
        else:
            argv = [python, str(SCRIPT), language]
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOVA_TEST")}
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # as the agent starts it: its own process group
            cwd="/tmp",
            env=env,
        )
        self.sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""
        self.n = 0
        self.ready = self.next_event()
        assert self.ready["type"] == "ready", self.ready

    def next_event(self) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, f"no event within {WAIT} s; have {self.buf[:200]!r}"
            if self.sel.select(left):
                assert self.proc.stdout is not None
                chunk = self.proc.stdout.read(65536)
                assert chunk, f"the script ended: {self.proc.stderr.read()!r}"  # type: ignore[union-attr]
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        event = json.loads(line)
        assert isinstance(event, dict)
        return event

    def send(self, request: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()

    def start(self, code: str, env: dict[str, str] | None = None) -> str:
        self.n += 1
        rid = f"r{self.n}"
        self.send({"id": rid, "code": code, "env": env})
        return rid

    def events(self, rid: str) -> Iterator[dict[str, Any]]:
        while True:
            event = self.next_event()
            if event.get("id") != rid:
                continue
            yield event
            if event["type"] == "done":
                return

    def run(self, code: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
        return list(self.events(self.start(code, env)))

    def interrupt(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        self.sel.close()


@pytest.fixture
def py() -> Iterator[Interp]:
    it = Interp("python")
    yield it
    it.close()


@pytest.fixture
def sh() -> Iterator[Interp]:
    it = Interp("bash")
    yield it
    it.close()


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def texts(events: list[dict[str, Any]], kind: str) -> list[str]:
    return [e["text"] for e in of(events, kind)]


# --------------------------------------------------------------------------- python


def test_ready_says_where_and_what(py: Interp) -> None:
    assert py.ready["cwd"] == "/tmp"
    assert py.ready["kernel"] == "python"  # the test's Python has no IPython
    assert py.ready["pid"] == py.proc.pid
    assert py.ready["id"] is None


def test_state_persists_and_the_last_expression_is_the_main_result(py: Interp) -> None:
    first = py.run("x = 41\ny = x + 1\ny")
    assert of(first, "result") == [
        {"type": "result", "id": "r1", "main": True, "data": {"text": "42"}}
    ]
    assert first[-1] == {"type": "done", "id": "r1", "execution_count": 1}
    second = py.run("x * 2")
    assert of(second, "result")[0]["data"]["text"] == "82"
    assert second[-1]["execution_count"] == 2
    assert of(py.run("_"), "result")[0]["data"]["text"] == "82"  # the last value, as in a REPL


def test_none_and_statements_give_no_result(py: Interp) -> None:
    assert of(py.run("None"), "result") == []
    assert of(py.run("x = 1"), "result") == []
    assert of(py.run("print('a')"), "result") == []  # print returns None
    assert of(py.run(""), "result") == []


def test_one_stdout_event_per_print_and_in_order(py: Interp) -> None:
    events = py.run(
        "import os, subprocess, sys\n"
        "print('one')\n"
        "print('two', 2)\n"
        "os.system('echo three')\n"
        "subprocess.run(['sh', '-c', 'echo four; echo err >&2'])\n"
        "os.write(1, b'five\\n')\n"
        "sys.__stdout__.write('six\\n'); sys.__stdout__.flush()\n"
        "print('partial', end='')\n"
        "print('warn', file=sys.stderr)\n"
    )
    out = texts(events, "stdout")
    # each write through sys.stdout is an event; what went to fd 1 comes as the pipe
    # gives it (writes close together may come as one), in order
    assert out[:2] == ["one\n", "two 2\n"] and out[-1] == "partial"
    assert "".join(out[2:-1]) == "three\nfour\nfive\nsix\n"
    assert texts(events, "stderr") == ["err\n", "warn\n"]
    assert events[-1]["type"] == "done"


def test_a_partial_line_is_sent_before_the_code_ends(py: Interp) -> None:
    rid = py.start("import time\nprint('tick', end='')\ntime.sleep(3)\nprint('tock')")
    first = next(py.events(rid))
    assert first == {"type": "stdout", "id": rid, "text": "tick"}  # while it sleeps
    rest = list(py.events(rid))
    assert texts(rest, "stdout") == ["tock\n"]


def test_a_huge_write_is_cut_into_bounded_events(py: Interp) -> None:
    events = py.run("print('x' * 600_000)")
    pieces = texts(events, "stdout")
    assert "".join(pieces) == "x" * 600_000 + "\n"
    assert all(len(p) <= interp.MAX_TEXT for p in pieces) and len(pieces) >= 3


def test_errors_carry_name_value_and_a_traceback_of_the_code_only(py: Interp) -> None:
    py.run("def f():\n    return 1 / 0")
    events = py.run("print('before')\nf()")
    (error,) = of(events, "error")
    assert error["name"] == "ZeroDivisionError"
    assert error["value"] == "division by zero"
    tb = error["traceback"]
    assert tb.startswith("Traceback (most recent call last):")
    assert "return 1 / 0" in tb and 'File "<cell-1>", line 2, in f' in tb
    assert "interp.py" not in tb
    assert texts(events, "stdout") == ["before\n"]
    assert of(events, "result") == []
    syntax = of(py.run("def g(:"), "error")[0]
    assert syntax["name"] == "SyntaxError" and "def g(:" in syntax["traceback"]
    chained = of(
        py.run("try:\n    f()\nexcept Exception as e:\n    raise ValueError('v') from e"), "error"
    )[0]
    assert "ZeroDivisionError" in chained["traceback"] and chained["name"] == "ValueError"
    assert "interp.py" not in chained["traceback"]


def test_system_exit_is_an_error_and_the_context_lives_on(py: Interp) -> None:
    py.run("k = 5")
    assert of(py.run("import sys; sys.exit(3)"), "error")[0]["name"] == "SystemExit"
    assert of(py.run("k"), "result")[0]["data"]["text"] == "5"


def test_sigint_interrupts_the_code_and_keeps_the_state(py: Interp) -> None:
    py.run("kept = 'yes'")
    rid = py.start(
        "import subprocess, time\nprint('started', flush=True)\n"
        "subprocess.run(['sleep', '60'])\nfor _ in range(600): time.sleep(0.1)"
    )
    events = py.events(rid)
    assert next(events)["text"] == "started\n"
    time.sleep(0.3)
    py.interrupt()  # the process group, as the agent signals it: the sleep too
    rest = list(events)
    (error,) = of(rest, "error")
    assert error["name"] == "KeyboardInterrupt"
    assert "interp.py" not in error["traceback"]
    assert of(py.run("kept"), "result")[0]["data"]["text"] == "'yes'"


def test_sigint_between_executions_changes_nothing(py: Interp) -> None:
    py.run("n = 1")
    py.interrupt()
    time.sleep(0.2)
    assert py.proc.poll() is None
    assert of(py.run("n + 1"), "result")[0]["data"]["text"] == "2"


def test_rich_representations(py: Interp) -> None:
    code = (
        "class Rich:\n"
        "    def _repr_html_(self): return '<b>hi</b>'\n"
        "    def _repr_png_(self): return b'\\x89PNG\\r\\n'\n"
        "    def _repr_markdown_(self): return '**hi**'\n"
        "    def _repr_svg_(self): return '<svg/>'\n"
        "    def _repr_json_(self): return {'a': [1, 2]}\n"
        "    def _repr_latex_(self): return ('$x$', {'meta': 1})\n"
        "    def _repr_jpeg_(self): raise RuntimeError('broken')\n"
        "    def __repr__(self): return 'Rich()'\n"
        "Rich()"
    )
    (result,) = of(py.run(code), "result")
    assert result["main"] is True
    assert result["data"] == {
        "html": "<b>hi</b>",
        "png": base64.b64encode(b"\x89PNG\r\n").decode(),
        "markdown": "**hi**",
        "svg": "<svg/>",
        "json": {"a": [1, 2]},
        "latex": "$x$",
        "text": "Rich()",
    }
    bundle = of(
        py.run(
            "class B:\n    def _repr_mimebundle_(self, include=None, exclude=None):\n"
            "        return {'text/html': '<i>b</i>', 'text/plain': 'B!'}\nB()"
        ),
        "result",
    )[0]
    assert bundle["data"] == {"html": "<i>b</i>", "text": "B!"}
    klass = of(py.run("Rich"), "result")[0]  # a class: its repr only
    assert klass["data"] == {"text": "<class '__main__.Rich'>"}


def test_a_representation_over_the_bound_is_left_out_with_a_note() -> None:
    it = Interp("python", MAX_REPR=1000)
    try:
        code = (
            "class Big:\n    def _repr_png_(self): return b'x' * 5000\n"
            "    def _repr_html_(self): return '<p/>'\nBig()"
        )
        (result,) = of(it.run(code), "result")
        assert "png" not in result["data"]
        assert result["data"]["html"] == "<p/>"
        assert "[left out: png:" in result["data"]["text"]
    finally:
        it.close()


def test_display_gives_results_that_are_not_the_main_one(py: Interp) -> None:
    events = py.run("print('a')\ndisplay(1, 'two')\n3")
    results = of(events, "result")
    assert [(r["main"], r["data"]["text"]) for r in results] == [
        (False, "1"),
        (False, "'two'"),
        (True, "3"),
    ]
    kinds = [e["type"] for e in events]
    assert kinds.index("stdout") < kinds.index("result")  # in the order the code ran


def test_matplotlib_figures_become_png_results() -> None:
    """The figures path, with a stand-in ``matplotlib.pyplot`` (the template has no
    matplotlib): each open figure is a PNG result, and then closed."""
    it = Interp("python")
    try:
        fake = (
            "import sys, types\n"
            "plt = types.ModuleType('matplotlib.pyplot')\n"
            "class Fig:\n"
            "    def __init__(self, n): self.n = n\n"
            "    def savefig(self, buf, format, bbox_inches): buf.write(b'PNG%d' % self.n)\n"
            "    def __repr__(self): return f'<Figure {self.n}>'\n"
            "plt.figs = {1: Fig(1), 2: Fig(2)}\n"
            "plt.get_fignums = lambda: sorted(plt.figs)\n"
            "plt.figure = lambda n: plt.figs[n]\n"
            "plt.close = lambda which: plt.figs.clear()\n"
            "sys.modules['matplotlib.pyplot'] = plt\n"
        )
        results = of(it.run(fake), "result")
        assert [r["data"] for r in results] == [
            {"text": "<Figure 1>", "png": base64.b64encode(b"PNG1").decode()},
            {"text": "<Figure 2>", "png": base64.b64encode(b"PNG2").decode()},
        ]
        assert all(not r["main"] for r in results)
        assert of(it.run("1"), "result") == [
            {"type": "result", "id": "r2", "main": True, "data": {"text": "1"}}
        ]  # closed: not again
    finally:
        it.close()


def test_without_matplotlib_nothing_extra_happens(py: Interp) -> None:
    events = py.run("import importlib.util\nimportlib.util.find_spec('matplotlib') is None")
    assert of(events, "result")[0]["data"]["text"] == "True"
    assert of(events, "error") == [] and of(events, "stderr") == []


def test_env_applies_to_one_execution_only(py: Interp) -> None:
    events = py.run(
        "import os, subprocess\nprint(subprocess.run(['sh', '-c', 'echo $FOO'], "
        "capture_output=True, text=True).stdout, end='')\nos.environ['FOO']",
        env={"FOO": "bar"},
    )
    assert texts(events, "stdout") == ["bar\n"]
    assert of(events, "result")[0]["data"]["text"] == "'bar'"
    assert of(py.run("import os; os.environ.get('FOO')"), "result") == []


def test_the_code_cannot_read_the_requests(py: Interp) -> None:
    events = py.run("input()")
    assert of(events, "error")[0]["name"] == "EOFError"
    events = py.run("import subprocess; subprocess.run(['cat']).returncode")
    assert of(events, "result")[0]["data"]["text"] == "0"  # cat saw end of input
    assert of(py.run("1 + 1"), "result")[0]["data"]["text"] == "2"


def test_top_level_await(py: Interp) -> None:
    events = py.run("import asyncio\nawait asyncio.sleep(0)\nv = await asyncio.sleep(0, 'done')\nv")
    assert of(events, "result")[0]["data"]["text"] == "'done'"


def test_ping_answers_pong_and_broken_requests_are_skipped(py: Interp) -> None:
    assert py.proc.stdin is not None
    py.proc.stdin.write(b"not json\n[1, 2]\n\n")
    py.send({"op": "ping", "id": "p1"})
    assert py.next_event() == {"type": "pong", "id": "p1"}
    assert of(py.run("3"), "result")[0]["data"]["text"] == "3"


def test_the_script_ends_when_its_input_ends(py: Interp) -> None:
    assert py.proc.stdin is not None
    py.proc.stdin.close()
    assert py.proc.wait(timeout=WAIT) == 0


# ----------------------------------------------------------------------------- bash


def test_bash_state_and_cwd_persist(sh: Interp) -> None:
    assert sh.ready["kernel"] == "bash"
    events = sh.run("A=5\nf() { echo f$1; }\ncd /usr\necho set")
    assert texts(events, "stdout") == ["set\n"]
    assert events[-1] == {"type": "done", "id": "r1", "execution_count": 1}
    events = sh.run("echo $A $(pwd); f 2")
    assert "".join(texts(events, "stdout")) == "5 /usr\nf2\n"
    assert of(events, "error") == []


def test_bash_stdout_and_stderr_are_apart(sh: Interp) -> None:
    events = sh.run("echo out; echo err >&2; printf 'no newline'")
    assert "".join(texts(events, "stdout")) == "out\nno newline"
    assert "".join(texts(events, "stderr")) == "err\n"


def test_bash_non_zero_status_is_an_error(sh: Interp) -> None:
    (error,) = of(sh.run("echo x; false"), "error")
    assert (error["name"], error["value"]) == ("NonZeroExitStatus", "1")
    assert of(sh.run("true"), "error") == []


def test_bash_env_for_one_execution(sh: Interp) -> None:
    sh.run("KEEP=1")
    events = sh.run("echo $FOO $KEEP; sh -c 'echo child $FOO'", env={"FOO": "b a'r"})
    assert "".join(texts(events, "stdout")) == "b a'r 1\nchild b a'r\n"
    assert "".join(texts(sh.run("echo [${FOO-unset}]"), "stdout")) == "[unset]\n"


def test_bash_interrupt_keeps_the_shell(sh: Interp) -> None:
    sh.run("V=kept")
    rid = sh.start("echo start; sleep 60; echo never")
    events = sh.events(rid)
    assert next(events)["text"] == "start\n"
    sh.interrupt()
    rest = list(events)
    assert "never" not in "".join(texts(rest, "stdout"))
    assert of(rest, "error")[0]["value"] == "130"
    rid = sh.start("echo begin; while true; do :; done; echo never")
    events = sh.events(rid)
    assert next(events)["text"] == "begin\n"
    sh.interrupt()
    assert "never" not in "".join(texts(list(events), "stdout"))
    assert "".join(texts(sh.run("echo $V"), "stdout")) == "kept\n"


def test_bash_exit_starts_a_new_shell(sh: Interp) -> None:
    sh.run("GONE=1")
    (error,) = of(sh.run("exit 4"), "error")
    assert error["name"] == "BashExited" and "status 4" in error["value"]
    assert "".join(texts(sh.run("echo [${GONE-}] alive"), "stdout")) == "[] alive\n"


def test_bash_reads_no_requests(sh: Interp) -> None:
    events = sh.run("read line; echo got[$line]; cat")
    assert "".join(texts(events, "stdout")) == "got[]\n"
    assert "".join(texts(sh.run("echo after"), "stdout")) == "after\n"


# ---------------------------------------------------------------------- IPython (extra)


def _python_with_ipython() -> str | None:
    for name in ("python3", "python"):
        path = shutil.which(name)
        if (
            path
            and subprocess.run([path, "-c", "import IPython"], capture_output=True).returncode == 0
        ):
            return path
    return None


IPYTHON = _python_with_ipython()


@pytest.mark.skipif(IPYTHON is None, reason="no Python with IPython on this host's PATH")
def test_ipython_is_the_interpreter_where_it_is_installed() -> None:
    assert IPYTHON is not None
    it = Interp("python", python=IPYTHON)
    try:
        assert it.ready["kernel"] == "ipython"
        events = it.run("x = 2\nprint('p')\nx + 1")
        assert texts(events, "stdout") == ["p\n"]
        assert of(events, "result")[0]["data"]["text"] == "3"
        assert of(events, "result")[0]["main"] is True
        events = it.run(
            "from IPython.display import display, HTML\ndisplay(HTML('<b>h</b>'))\n"
            "files = !echo bang\nfiles[0]"
        )
        shown, main = of(events, "result")
        assert shown["main"] is False and shown["data"]["html"] == "<b>h</b>"
        assert main["data"]["text"] == "'bang'"
        error = of(it.run("1/0"), "error")[0]
        assert error["name"] == "ZeroDivisionError" and "1/0" in error["traceback"]
        rid = it.start("import time\nfor _ in range(600): time.sleep(0.1)")
        time.sleep(0.5)
        it.interrupt()
        assert of(list(it.events(rid)), "error")[0]["name"] == "KeyboardInterrupt"
        assert of(it.run("%time x"), "error") == []
        assert of(it.run("x"), "result")[0]["data"]["text"] == "2"
    finally:
        it.close()
