"""A code context: one long-running interpreter in the guest (``sandbox.run_code``).

Started by the host through the commands API (``python3 interp.py [python|bash]``, stdin
open, in the background). Standard library only; Python 3.11 (Debian's and the template's
virtual environment's) runs it.

Protocol: requests come in on stdin, one JSON object a line:
``{"id": "...", "code": "...", "env": {...}}`` runs code (``env`` for that execution only),
``{"id": "...", "op": "ping"}`` answers ``pong`` (what a client that attaches to a running
context waits for: everything before it is old output). Events go out on the original
stdout, one JSON object a line, each with the ``id`` of the request it belongs to:
``ready`` (once, at start: ``id`` null), ``stdout``/``stderr`` (``text``: one event per
write), ``result`` (``data``: the representations of a value by kind, ``main``: whether it
is the value of the last expression), ``error`` (``name``, ``value``, ``traceback``),
``done`` (``execution_count``), ``pong``.

The protocol keeps private copies of the original stdin and stdout; the code's fd 0 is
``/dev/null`` and its fds 1 and 2 are pipes this script reads, so neither the code nor
the processes it starts can read requests or write into the protocol by accident. SIGINT
(the host's timeout) raises ``KeyboardInterrupt`` in the running code; the interpreter and
its state survive it.
"""

from __future__ import annotations

import _ast  # the node classes without ``ast`` (and what it imports): a faster start
import builtins
import codecs
import json
import os
import select
import signal
import sys
import threading
import time

TYPE_CHECKING = False  # typing, traceback and base64 cost time at every start; mypy knows it
if TYPE_CHECKING:
    import traceback
    import types
    from typing import Any

CHUNK = 64 * 1024
"""Bytes read from an output pipe at a time."""
MAX_TEXT = 256 * 1024
"""Characters of one output event (a longer write is cut into several)."""
MAX_REPR = 8 * 1024 * 1024
"""Characters of one representation of a result (a PNG in base64, say); a larger one is
left out, and its ``text`` says so."""
FLUSH_AFTER = 0.05
"""Seconds a partial line (a write without a newline) waits before it is sent anyway."""
_CO_COROUTINE = 0x0080
_PyCF_ALLOW_TOP_LEVEL_AWAIT = 0x2000

REPR_METHODS = (
    ("_repr_html_", "html"),
    ("_repr_markdown_", "markdown"),
    ("_repr_svg_", "svg"),
    ("_repr_png_", "png"),
    ("_repr_jpeg_", "jpeg"),
    ("_repr_pdf_", "pdf"),
    ("_repr_latex_", "latex"),
    ("_repr_json_", "json"),
    ("_repr_javascript_", "javascript"),
)
MIME_KINDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
}
BINARY_KINDS = ("png", "jpeg", "pdf")


class Protocol:
    """The event stream on the private copy of the original stdout, and the output pipes
    that stand in for the code's fds 1 and 2."""

    def __init__(self) -> None:
        self.out_fd = os.dup(1)  # non-inheritable: the code's children do not get it
        self.in_fd = os.dup(0)
        self.lock = threading.RLock()
        self.current: str | None = None
        """The id of the request that output belongs to (the last one, once it ended)."""
        self.main_thread = threading.get_ident()
        self.pipes: dict[int, str] = {}
        self.decoders: dict[int, Any] = {}

    def take_over_fds(self) -> None:
        """Give the code /dev/null as fd 0 and pipes as fds 1 and 2."""
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for fd, kind in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            os.set_blocking(r, False)
            self.pipes[r] = kind
            self.decoders[r] = codecs.getincrementaldecoder("utf-8")("replace")
        threading.Thread(target=self._pump, name="pipes", daemon=True).start()

    def emit(self, event: dict[str, Any]) -> None:
        line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        # an interrupt must not cut a line in two: SIGINT waits until it is written
        main = threading.get_ident() == self.main_thread
        with self.lock:
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT]) if main else None
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(self.out_fd, view) :]
            finally:
                if mask is not None:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def output(self, kind: str, text: str) -> None:
        """Output of the code: an event for each piece of at most ``MAX_TEXT``."""
        with self.lock:
            self.drain()  # what went to the fds before this write comes first
            for i in range(0, len(text), MAX_TEXT):
                self.emit({"type": kind, "id": self.current, "text": text[i : i + MAX_TEXT]})

    def drain(self) -> None:
        """Send what is waiting in the output pipes now."""
        with self.lock:
            for fd in self.pipes:
                self._read(fd)

    def _read(self, fd: int) -> bool:
        """Read ``fd`` until it is empty; False once it is closed."""
        while True:
            try:
                chunk = os.read(fd, CHUNK)
            except BlockingIOError:
                return True
            except InterruptedError:
                continue
            text = self.decoders[fd].decode(chunk, final=not chunk)
            for i in range(0, len(text), MAX_TEXT):
                piece = text[i : i + MAX_TEXT]
                self.emit({"type": self.pipes[fd], "id": self.current, "text": piece})
            if not chunk:
                return False

    def _pump(self) -> None:
        open_fds = list(self.pipes)
        while open_fds:
            try:
                ready, _, _ = select.select(open_fds, [], [])
            except InterruptedError:
                continue
            with self.lock:
                for fd in ready:
                    if not self._read(fd):
                        open_fds.remove(fd)

    def requests(self) -> Any:
        """The requests, one at a time (a blank or broken line is skipped)."""
        buf = b""
        while True:
            try:
                chunk = os.read(self.in_fd, CHUNK)
            except InterruptedError:
                continue
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    request = json.loads(line)
                except ValueError:
                    continue
                if isinstance(request, dict):
                    yield request


class Writer:
    """``sys.stdout``/``sys.stderr`` of the code: one event per write that ends a line (a
    partial line is held until its newline, a flush, the end of the execution, or
    ``FLUSH_AFTER`` seconds), so ``print("x")`` is one entry."""

    encoding = "utf-8"
    errors = "replace"
    newlines = None
    closed = False
    line_buffering = True

    def __init__(self, proto: Protocol, kind: str, fd: int) -> None:
        self._proto = proto
        self._kind = kind
        self._fd = fd
        self._held = ""
        self._since = 0.0
        self.buffer = _Bytes(self)

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._proto.lock:
            if not self._held:
                self._since = time.monotonic()
            self._held += text
            if self._held.endswith("\n") or len(self._held) >= MAX_TEXT:
                self.flush()
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with self._proto.lock:
            held, self._held = self._held, ""
            if held:
                self._proto.output(self._kind, held)

    def flush_if_old(self) -> None:
        with self._proto.lock:
            if self._held and time.monotonic() - self._since >= FLUSH_AFTER:
                self.flush()

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        pass


class _Bytes:
    """``sys.stdout.buffer``: bytes written there are decoded and written as text."""

    def __init__(self, writer: Writer) -> None:
        self._writer = writer

    def write(self, data: bytes) -> int:
        self._writer.write(bytes(data).decode("utf-8", "replace"))
        return len(data)

    def flush(self) -> None:
        self._writer.flush()


def _flusher(writers: list[Writer]) -> None:
    while True:
        time.sleep(FLUSH_AFTER)
        for w in writers:
            try:
                w.flush_if_old()
            except Exception:  # the protocol's end ends the process anyway
                pass


# ------------------------------------------------------------------------ representations


def _bounded(kind: str, value: Any, notes: list[str]) -> Any:
    if kind in BINARY_KINDS and isinstance(value, (bytes, bytearray)):
        import base64

        value = base64.b64encode(bytes(value)).decode("ascii")
    if kind == "json":
        try:
            size = len(json.dumps(value))
        except (TypeError, ValueError):
            notes.append("json: not serializable")
            return None
    elif isinstance(value, str):
        size = len(value)
    else:
        notes.append(f"{kind}: not text")
        return None
    if size > MAX_REPR:
        notes.append(f"{kind}: {size} characters, over the {MAX_REPR} kept")
        return None
    return value


def representations(obj: Any) -> dict[str, Any]:
    """Every representation ``obj`` offers (``_repr_*_`` methods, ``_repr_mimebundle_``),
    and ``text`` (its repr)."""
    data: dict[str, Any] = {}
    notes: list[str] = []
    bundle = _call_repr(obj, "_repr_mimebundle_")
    if isinstance(bundle, tuple):
        bundle = bundle[0]
    if isinstance(bundle, dict):
        for mime, value in bundle.items():
            kind = MIME_KINDS.get(mime)
            if kind is not None and value is not None:
                data[kind] = value
    for method, kind in REPR_METHODS:
        if kind in data:
            continue
        value = _call_repr(obj, method)
        if isinstance(value, tuple) and len(value) == 2:
            value = value[0]  # (data, metadata)
        if value is not None:
            data[kind] = value
    out: dict[str, Any] = {}
    for kind, value in data.items():
        kept = _bounded(kind, value, notes)
        if kept is not None:
            out[kind] = kept
    if "text" not in out:
        try:
            text = repr(obj)
        except Exception as exc:  # the code's repr: anything goes
            text = f"<repr failed: {type(exc).__name__}: {exc}>"
        if len(text) > MAX_REPR:
            text = text[:MAX_REPR] + "..."
        out["text"] = text
    if notes:
        out["text"] += "\n[left out: " + "; ".join(notes) + "]"
    return out


def _call_repr(obj: Any, name: str) -> Any:
    if isinstance(obj, type):
        return None  # a class's _repr_*_ are its instances' (unbound) methods
    try:
        method = getattr(obj, name, None)
        if not callable(method):
            return None
        return method()
    except Exception:  # a broken repr gives no representation
        return None


# --------------------------------------------------------------------------- python


class PythonContext:
    """Runs code with the standard library: all but a final expression is executed, the
    final expression is evaluated and its value is the main result."""

    def __init__(self, proto: Protocol) -> None:
        self.proto = proto
        self.count = 0
        module = type(sys)("__main__")
        module.__dict__["__builtins__"] = builtins
        module.__dict__["display"] = self.display
        sys.modules["__main__"] = module
        self.namespace = module.__dict__
        self.loop: Any = None

    def result(self, value: Any, main: bool) -> None:
        self.proto.emit(
            {
                "type": "result",
                "id": self.proto.current,
                "main": main,
                "data": representations(value),
            }
        )

    def display(self, *objs: Any) -> None:
        """``display(obj)``: a result that is not the main one (as in a notebook)."""
        for obj in objs:
            sys.stdout.flush()
            self.result(obj, False)

    def run(self, code: str) -> None:
        self.count += 1
        filename = f"<cell-{self.count}>"
        _remember(filename, code)
        try:
            flags = _PyCF_ALLOW_TOP_LEVEL_AWAIT
            tree = compile(code, filename, "exec", _ast.PyCF_ONLY_AST | flags)
            last = None
            final = tree.body[-1] if tree.body else None
            if isinstance(final, _ast.Expr):
                tree.body.pop()
                last = _ast.Expression(final.value)
            body = compile(tree, filename, "exec", flags=flags)
            self._run(body)
            if last is not None:
                value = self._run(compile(last, filename, "eval", flags=flags))
                if value is not None:
                    self.namespace["_"] = value
                    sys.stdout.flush()
                    self.result(value, True)
        except BaseException as exc:  # the code's errors are its results
            sys.stdout.flush()
            sys.stderr.flush()
            self.error(exc)

    def _run(self, code: types.CodeType) -> Any:
        value = eval(code, self.namespace)  # running code is the point
        if code.co_flags & _CO_COROUTINE:
            if self.loop is None:
                import asyncio

                self.loop = asyncio.new_event_loop()
            value = self.loop.run_until_complete(value)
        return value

    def error(self, exc: BaseException) -> None:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # the frames of this script are not the code's
        import traceback

        if isinstance(exc, SyntaxError):
            lines = traceback.format_exception_only(type(exc), exc)
        else:
            lines = list(
                _without_own_frames(traceback.TracebackException(type(exc), exc, tb)).format()
            )
        self.proto.emit(
            {
                "type": "error",
                "id": self.proto.current,
                "name": type(exc).__name__,
                "value": _safe_str(exc),
                "traceback": "".join(lines),
            }
        )

    def after(self) -> None:
        render_figures(self.proto)


def render_figures(proto: Protocol) -> None:
    """Each open matplotlib figure is a PNG result (then closed), as in a notebook."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    try:
        import io

        for num in plt.get_fignums():
            fig = plt.figure(num)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", bbox_inches="tight")
            data = {"text": repr(fig)}
            png = _bounded("png", buf.getvalue(), [])
            if png is None:
                data["text"] += "\n[left out: png over the size kept]"
            else:
                data["png"] = png
            proto.emit({"type": "result", "id": proto.current, "main": False, "data": data})
        plt.close("all")
    except Exception as exc:  # a figure that cannot be drawn
        proto.output("stderr", f"could not render the matplotlib figures: {exc!r}\n")


class IPythonContext:
    """Runs code in IPython's ``InteractiveShell`` (``display()``, ``!cmd``, magics, rich
    reprs as in a notebook), when IPython is importable."""

    def __init__(self, proto: Protocol) -> None:
        import importlib

        publisher = importlib.import_module("IPython.core.displaypub").DisplayPublisher
        shell = importlib.import_module("IPython.core.interactiveshell").InteractiveShell

        context = self

        class Publisher(publisher):  # type: ignore[misc,valid-type]
            def publish(self, data: Any, metadata: Any = None, *args: Any, **kw: Any) -> None:
                sys.stdout.flush()
                context.publish(data, False)

            def clear_output(self, wait: bool = False) -> None:
                pass

        class Shell(shell):  # type: ignore[misc,valid-type]
            def _showtraceback(self, etype: Any, evalue: Any, stb: Any) -> None:
                sys.stdout.flush()
                sys.stderr.flush()
                context.proto.emit(
                    {
                        "type": "error",
                        "id": context.proto.current,
                        "name": getattr(etype, "__name__", str(etype)),
                        "value": _safe_str(evalue),
                        "traceback": "\n".join(stb),
                    }
                )

            def enable_gui(self, gui: Any = None) -> None:
                pass

        self.proto = proto
        self.shell = Shell.instance(colors="NoColor", display_pub_class=Publisher)
        self.shell.displayhook.write_format_data = lambda data, md=None: self.publish(data, True)
        self.shell.displayhook.write_output_prompt = lambda: None
        self.shell.displayhook.finish_displayhook = lambda: None
        self.shell.displayhook.start_displayhook = lambda: None
        self.count = 0

    def publish(self, data: dict[str, Any], main: bool) -> None:
        sys.stdout.flush()
        out: dict[str, Any] = {}
        notes: list[str] = []
        for mime, value in data.items():
            kind = MIME_KINDS.get(mime)
            if kind is None:
                continue
            kept = _bounded(kind, value, notes)
            if kept is not None:
                out[kind] = kept
        if notes:
            out["text"] = out.get("text", "") + "\n[left out: " + "; ".join(notes) + "]"
        self.proto.emit({"type": "result", "id": self.proto.current, "main": main, "data": out})

    def run(self, code: str) -> None:
        self.shell.run_cell(code, store_history=True)
        self.count = self.shell.execution_count - 1

    def after(self) -> None:
        render_figures(self.proto)


def _without_own_frames(te: traceback.TracebackException) -> traceback.TracebackException:
    """Leave this script's frames out of a traceback (and the ones it chains)."""
    import traceback

    seen = set()
    todo = [te]
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        own = [f for f in t.stack if f.filename != __file__]
        t.stack = traceback.StackSummary.from_list(own)
        todo.extend(x for x in (t.__cause__, t.__context__) if x is not None)
    return te


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def _idle(signum: int, frame: Any) -> None:
    """SIGINT between executions: a timeout that came late; nothing to interrupt."""


def _remember(filename: str, code: str) -> None:
    """Keep the code's lines where tracebacks look for them."""
    import linecache

    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__}: str() failed>"


def serve_python(proto: Protocol) -> int:
    stdout, stderr = Writer(proto, "stdout", 1), Writer(proto, "stderr", 2)
    sys.stdout, sys.stderr = stdout, stderr
    sys.stdin = open(os.devnull)  # noqa: SIM115 (for the process's life)
    threading.Thread(target=_flusher, args=([stdout, stderr],), daemon=True).start()
    context: Any
    try:
        context = IPythonContext(proto)
        kernel = "ipython"
    except Exception:  # IPython missing or broken: the standard library
        context = PythonContext(proto)
        kernel = "python"
    proto.emit(
        {
            "type": "ready",
            "id": None,
            "pid": os.getpid(),
            "cwd": os.getcwd(),
            "user": _user(),
            "kernel": kernel,
            "python": sys.version.split()[0],
        }
    )
    for request in proto.requests():
        rid = str(request.get("id"))
        if request.get("op") == "ping":
            proto.emit({"type": "pong", "id": rid})
            continue
        code = request.get("code")
        if not isinstance(code, str):
            continue
        proto.current = rid
        saved = _set_env(request.get("env"))
        try:
            try:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                context.run(code)
                context.after()
            except BaseException as exc:  # an interrupt at an edge
                if isinstance(context, PythonContext):
                    context.error(exc)
            finally:
                signal.signal(signal.SIGINT, _idle)
        except KeyboardInterrupt:  # between the end and the handler's change: it had ended
            pass
        _restore_env(saved)
        stdout.flush()
        stderr.flush()
        proto.drain()
        proto.emit({"type": "done", "id": rid, "execution_count": context.count})
    return 0


def _set_env(env: Any) -> dict[str, str | None]:
    saved: dict[str, str | None] = {}
    if isinstance(env, dict):
        for key, value in env.items():
            saved[str(key)] = os.environ.get(str(key))
            os.environ[str(key)] = str(value)
    return saved


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ----------------------------------------------------------------------------- bash

BASH_SETUP = r"""
trap ':' INT
__ns_run() {
    trap 'trap ":" INT; return 130' INT
    . "$1" </dev/null
    local __ns_rc=$?
    trap ':' INT
    return $__ns_rc
}
"""


class BashContext:
    """A persistent bash: each execution's code is sourced from a file by a function whose
    SIGINT trap returns from it, then a marker with its status is written to stdout and
    stderr; what comes before the markers is the execution's output. Variables, functions
    and the working directory persist; ``exit`` ends the shell (a new one starts)."""

    def __init__(self, proto: Protocol) -> None:
        import tempfile

        self.proto = proto
        self.count = 0
        self.dir = tempfile.mkdtemp(prefix="novasandbox-bash-")
        self.proc: Any = None
        self.start()

    def start(self) -> None:
        import subprocess

        # no profile or rc file: the context's environment is the sandbox's, as given
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._send(BASH_SETUP)

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def run(self, code: str, env: Any) -> None:
        import secrets
        import shlex

        self.count += 1
        path = os.path.join(self.dir, "cell")
        with open(path, "w") as f:
            f.write(code)
        marker = "__novasandbox_" + secrets.token_hex(16)
        lines = []
        restore = []
        for i, (key, value) in enumerate((env or {}).items()):
            key = str(key)
            lines.append(
                f'if [ -n "${{{key}+x}}" ]; then __ns_o{i}="${key}"; __ns_s{i}=1; '
                f"else __ns_s{i}=0; fi; export {key}={shlex.quote(str(value))}"
            )
            restore.append(
                f'if [ "$__ns_s{i}" = 1 ]; then {key}="$__ns_o{i}"; else unset {key}; fi; '
                f"unset __ns_o{i} __ns_s{i}"
            )
        script = "\n".join(
            [
                *lines,
                f"__ns_run {shlex.quote(path)}",
                "__ns_rc=$?",
                *restore,
                f"printf '%s %s\\n' {marker} \"$__ns_rc\"",
                f"printf '%s\\n' {marker} >&2",
                "",
            ]
        )
        self._send(script)
        status = self._collect(marker.encode())
        if status is None:
            code_ = self.proc.wait()
            self.error("BashExited", f"bash exited with status {code_}; a new bash started")
            self.start()
        elif status != 0:
            self.error("NonZeroExitStatus", str(status))

    def error(self, name: str, value: str) -> None:
        self.proto.emit(
            {
                "type": "error",
                "id": self.proto.current,
                "name": name,
                "value": value,
                "traceback": "",
            }
        )

    def _collect(self, marker: bytes) -> int | None:
        """Forward bash's output until both markers came (the status), or bash ended."""
        streams = {self.proc.stdout.fileno(): "stdout", self.proc.stderr.fileno(): "stderr"}
        held = {fd: b"" for fd in streams}
        decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in streams}
        status: int | None = None
        waiting = set(streams)
        while waiting:
            try:
                ready, _, _ = select.select(list(waiting), [], [])
            except InterruptedError:
                continue
            for fd in ready:
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    return None
                buf = held[fd] + chunk
                at = buf.find(marker)
                end = -1 if at < 0 else buf.find(b"\n", at)
                if at >= 0 and end >= 0:
                    head, held[fd] = buf[:at], b""
                    if streams[fd] == "stdout":
                        try:
                            status = int(buf[at + len(marker) : end])
                        except ValueError:
                            status = 1
                    waiting.discard(fd)
                elif at >= 0:
                    head, held[fd] = buf[:at], buf[at:]  # the marker's line comes next
                else:
                    # an end that could be the start of the marker waits for more
                    cut = len(buf) - _marker_start(buf, marker)
                    head, held[fd] = buf[:cut], buf[cut:]
                text = decoders[fd].decode(head, final=fd not in waiting)
                if text:
                    self.proto.output(streams[fd], text)
        return status


def _marker_start(buf: bytes, marker: bytes) -> int:
    """The length of the longest end of ``buf`` that begins ``marker``."""
    for n in range(min(len(buf), len(marker) - 1), 0, -1):
        if buf.endswith(marker[:n]):
            return n
    return 0


def serve_bash(proto: Protocol) -> int:
    context = BashContext(proto)
    proto.emit(
        {
            "type": "ready",
            "id": None,
            "pid": os.getpid(),
            "cwd": os.getcwd(),
            "user": _user(),
            "kernel": "bash",
        }
    )
    for request in proto.requests():
        rid = str(request.get("id"))
        if request.get("op") == "ping":
            proto.emit({"type": "pong", "id": rid})
            continue
        code = request.get("code")
        if not isinstance(code, str):
            continue
        proto.current = rid
        context.run(code, request.get("env"))
        proto.emit({"type": "done", "id": rid, "execution_count": context.count})
    return 0


def main(argv: list[str]) -> int:
    language = argv[1] if len(argv) > 1 else "python"
    proto = Protocol()
    signal.signal(signal.SIGINT, _idle)
    own_stderr = os.dup(2)
    proto.take_over_fds()
    try:
        if language == "bash":
            # bash and what it runs get the host's SIGINT themselves (one process
            # group); this script only waits for them
            return serve_bash(proto)
        return serve_python(proto)
    except BaseException:  # this script's own failure: say it on its stderr
        import traceback

        os.write(own_stderr, traceback.format_exc().encode("utf-8", "replace")[-16384:])
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
