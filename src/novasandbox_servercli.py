"""The CLI through a server, on the standard library alone (``novasandbox_entry``, the
console script, comes here first; ``novasandbox.cli`` for everything else).

With a server (``--server URL`` before the command, or ``NOVASANDBOX_SERVER``; the key
from ``--api-key`` or ``NOVASANDBOX_API_KEY``), ``run``, ``ls``, ``kill``, ``exec`` and
``cp`` speak the server's HTTP API from here (``novasandbox.server.app`` documents the
routes, ``novasandbox.server.streams`` the command events). This module is outside the
``novasandbox`` package and imports only ``os``, ``sys``, ``json`` and ``socket`` (``ssl``
for https): importing the library's HTTP client (``novasandbox.remote``: httpx, asyncio)
and click costs more than a pooled sandbox takes to run a command. Every other command,
``--help`` and ``--version``, and everything without a server, goes to ``novasandbox.cli``.

Exit statuses and errors are the local CLI's: the command's own status; ``error [CODE]:
message`` on stderr with the error's stable code and 125 (127: command not found in the
guest; 124: command timeout or sandbox lifetime over; 2: usage). Errors of the
connection itself have codes of their own: ``server-unreachable`` (nothing answers at
the URL) and ``server-disconnected`` (the connection broke mid-way).

stdin (a pipe or a file; a terminal only with ``-i``; never with ``--no-stdin``) is
streamed as the local CLI streams it: what is there already when the command starts goes
with it (all of it, when it is small UTF-8 text that has ended: no other request), the
rest is posted to ``commands/PID/stdin`` as it arrives, on a second connection from a
thread, while the output streams back on the first; at EOF ``close-stdin``. Ctrl-C kills
the command (``DELETE commands/PID``; ``run`` kills its sandbox too) and exits 130; a
closed stdout (``| head -1``) kills it too and exits 1 quietly, as click does.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time

TYPE_CHECKING = False  # typing's import costs milliseconds; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from typing import Any

REMOTE_COMMANDS = ("run", "ls", "kill", "exec", "cp", "create", "cluster")
EXIT_USAGE = 2
EXIT_ERROR = 125
EXIT_NOT_FOUND = 127
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
DEFAULT_LIFETIME = 300.0
"""``run --lifetime``'s default (the library's ``DEFAULT_LIFETIME``, checked by a test)."""
EXIT_BROKEN_PIPE = 1
"""A closed stdout: click's status for it (the local CLI's)."""
INLINE_STDIN = 1 << 20
"""At most this much of stdin that is already there goes in the command's request."""
MAX_HEADER_LINE = 64 * 1024
MAX_HEADERS = 100
MAX_EVENT_LINE = 64 << 20
MAX_ERROR_BODY = 1 << 20
CONNECT_TIMEOUT = 30.0
CHUNK = 256 * 1024
UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/")

CLI_TERMS = [
    # what the library's messages call a parameter -> the flag of ``novasandbox run``
    (
        r"Sandbox\.create\(\.\.\., timeout=SECONDS\) or sb\.set_timeout\(SECONDS\) "
        r"\(None: no limit\)",
        "--lifetime SECONDS (0: no limit)",
    ),
    (r'network="(none|nat|tap)"', r"--network \1"),
    (r"^network must be", "--network must be"),
    (r'"(nat|tap)"', r"--network \1"),
    (r"\ballow=\[\]", "--no-egress"),
    (r"\ballow\b", "--allow"),
    (r"\bmemory_mib\b", "--memory"),
    (r"\bvcpus\b", "--vcpus"),
    (r"\bcold=True\b", "--cold"),
]


def cli_terms(message: str) -> str:
    """A library message in the CLI's terms: flags instead of Python parameters."""
    for pattern, replacement in CLI_TERMS:
        message = re.sub(pattern, replacement, message)
    return message


class Failed(Exception):
    """An error to print as ``error [code]: message`` and exit ``status`` with."""

    def __init__(self, code: str, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class Usage(Exception):
    """A usage error (exit 2), worded as click words them."""

    def __init__(self, command: str, message: str) -> None:
        super().__init__(message)
        self.command = command
        self.message = message


USAGE = {
    "run": "novasandbox run [OPTIONS] COMMAND...",
    "exec": "novasandbox exec [OPTIONS] SANDBOX_ID COMMAND...",
    "ls": "novasandbox ls [OPTIONS]",
    "kill": "novasandbox kill [OPTIONS] [IDS]...",
    "cp": "novasandbox cp [OPTIONS] SRC DST",
    "create": "novasandbox create [OPTIONS] [TEMPLATE]",
    "cluster": "novasandbox cluster status [--json]",
}


def _error_line(code: str, message: str) -> str:
    label = "\x1b[1;31merror\x1b[0m" if _isatty(2) else "error"
    return f"{label} [{code}]: {cli_terms(message)}\n"


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


# --------------------------------------------------------------------------- HTTP


class Response:
    """A response whose body is read as it comes (``chunks``, ``lines``, ``read``)."""

    def __init__(self, http: Http, status: int, headers: dict[str, str], method: str) -> None:
        self.http = http
        self.status = status
        self.headers = headers
        self._method = method

    def chunks(self) -> Iterator[bytes]:
        f = self.http.file
        assert f is not None
        te = self.headers.get("transfer-encoding", "").lower()
        if self._method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200:
            self.http.done(self.headers)
            return
        if "chunked" in te:
            while True:
                size_line = f.readline(MAX_HEADER_LINE)
                if not size_line.endswith(b"\n"):
                    raise _broken("a chunk header was cut")
                try:
                    size = int(size_line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise _broken("a chunk header is not hexadecimal") from None
                if size == 0:
                    while f.readline(MAX_HEADER_LINE) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                while size:
                    data = f.read(min(size, CHUNK))
                    if not data:
                        raise _broken("the response was cut")
                    size -= len(data)
                    yield data
                f.readline(MAX_HEADER_LINE)
            self.http.done(self.headers)
        elif "content-length" in self.headers:
            left = int(self.headers["content-length"])
            while left:
                data = f.read(min(left, CHUNK))
                if not data:
                    raise _broken("the response was cut")
                left -= len(data)
                yield data
            self.http.done(self.headers)
        else:
            while data := f.read1(CHUNK):
                yield data
            self.http.close()

    def read(self, limit: int) -> bytes:
        out = bytearray()
        for data in self.chunks():
            out += data
            if len(out) > limit:
                self.http.close()
                raise _broken(f"the response is over {limit} bytes")
        return bytes(out)

    def lines(self) -> Iterator[bytes]:
        pending = b""
        for data in self.chunks():
            pending += data
            while (end := pending.find(b"\n")) >= 0:
                yield pending[:end]
                pending = pending[end + 1 :]
            if len(pending) > MAX_EVENT_LINE:
                self.http.close()
                raise _broken(f"an event line is over {MAX_EVENT_LINE} bytes")
        if pending.strip():
            yield pending

    def json(self) -> Any:
        try:
            return json.loads(self.read(MAX_EVENT_LINE))
        except ValueError:
            raise _broken("the server's answer is not JSON") from None

    def error(self) -> Failed:
        """The error this (error) response carries, as the server coded it."""
        try:
            body = json.loads(self.read(MAX_ERROR_BODY))
            err = body["error"]
            code, message = str(err["code"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            return Failed("http-error", f"the server answered HTTP {self.status}")
        if self.status == 401:
            message += " (give the key with --api-key or NOVASANDBOX_API_KEY)"
        return Failed(code, message)


def _broken(why: str) -> Failed:
    return Failed("server-disconnected", f"the connection to the server broke: {why}")


class Http:
    """HTTP/1.1 over one kept-alive connection to the server at ``url``."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url = url.rstrip("/")
        scheme, sep, rest = self.url.partition("://")
        if not sep or scheme not in ("http", "https"):
            raise Failed(
                "invalid-config", f"the server URL must be http:// or https://, got {url!r}"
            )
        self.tls = scheme == "https"
        hostport, _, path = rest.partition("/")
        self.prefix = "/" + path if path else ""
        host, port = hostport, 443 if self.tls else 80
        if hostport.startswith("["):  # [::1]:7070
            end = hostport.find("]")
            host, tail = hostport[1:end], hostport[end + 1 :]
            if tail.startswith(":"):
                port = _port(tail[1:], url)
        elif ":" in hostport:
            host, _, p = hostport.rpartition(":")
            port = _port(p, url)
        if not host:
            raise Failed("invalid-config", f"the server URL has no host: {url!r}")
        self.host, self.port, self.hostport = host, port, hostport
        self.key = key
        self.sock: socket.socket | None = None
        self.file: Any = None

    def connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise Failed(
                "server-unreachable",
                f"cannot reach the server at {self.url}: {exc.strerror or exc}",
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            import ssl  # only for https (its import is slow)

            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise Failed(
                    "server-unreachable", f"TLS with the server at {self.url} failed: {exc}"
                ) from None
        sock.settimeout(None)
        self.sock, self.file = sock, sock.makefile("rb")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.sock is not None:
            self.sock.close()
        self.sock = self.file = None

    def done(self, headers: dict[str, str]) -> None:
        """The response was read whole: keep the connection unless the server ends it."""
        if headers.get("connection", "").lower() == "close":
            self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        json_body: Any = None,
        body: bytes | Iterable[bytes] | None = None,
        length: int | None = None,
    ) -> Response:
        target = self.prefix + _quote(path)
        if query:
            target += "?" + "&".join(f"{_quote(k, '')}={_quote(v, '')}" for k, v in query)
        head = [f"{method} {target} HTTP/1.1", f"Host: {self.hostport}", "Accept: */*"]
        if self.key:
            head.append(f"Authorization: Bearer {self.key}")
        payload: bytes | None = None
        stream: Iterable[bytes] | None = None
        if json_body is not None:
            payload = json.dumps(json_body).encode()
            head.append("Content-Type: application/json")
        elif isinstance(body, bytes):
            payload = body
        elif body is not None:
            stream = body
            head.append("Content-Type: application/octet-stream")
        if payload is not None:
            head.append(f"Content-Length: {len(payload)}")
        elif stream is not None:
            if length is not None:
                head.append(f"Content-Length: {length}")
            else:
                head.append("Transfer-Encoding: chunked")
        elif method in ("POST", "PUT"):
            head.append("Content-Length: 0")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        for attempt in (0, 1):
            fresh = self.sock is None
            if fresh:
                self.connect()
            assert self.sock is not None
            try:
                self.sock.sendall(raw + (payload or b""))
                if stream is not None:
                    for data in stream:
                        if not data:
                            continue
                        if length is None:
                            self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
                        else:
                            self.sock.sendall(data)
                    if length is None:
                        self.sock.sendall(b"0\r\n\r\n")
                return self._response(method)
            except Failed:
                raise
            except OSError as exc:
                self.close()
                # a kept-alive connection the server closed meanwhile: once more, afresh
                if fresh or attempt or stream is not None:
                    raise _broken(exc.strerror or str(exc)) from None
            except _Closed:
                self.close()
                if fresh or attempt or stream is not None:
                    raise _broken("the server closed the connection") from None
        raise AssertionError("unreachable")

    def _response(self, method: str) -> Response:
        f = self.file
        while True:
            line = f.readline(MAX_HEADER_LINE)
            if not line:
                raise _Closed
            parts = line.decode("latin-1").split(None, 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
                raise _broken("the answer is not HTTP")
            status = int(parts[1])
            headers: dict[str, str] = {}
            for _ in range(MAX_HEADERS + 1):
                h = f.readline(MAX_HEADER_LINE)
                if h in (b"\r\n", b"\n"):
                    break
                if not h.endswith(b"\n"):
                    raise _broken("the headers were cut")
                name, _, value = h.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            else:
                raise _broken("too many headers")
            if status != 100:
                return Response(self, status, headers, method)


class _Closed(Exception):
    """The server closed a kept-alive connection before answering."""


def _port(text: str, url: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise Failed("invalid-config", f"the server URL has a bad port: {url!r}")
    return int(text)


def _quote(text: str, safe: str = "/") -> str:
    keep = UNRESERVED if safe == "/" else UNRESERVED - {ord("/")}
    return "".join(chr(b) if b in keep else f"%{b:02X}" for b in text.encode("utf-8"))


# --------------------------------------------------------------------------- options


class Options:
    """Parses a command's arguments as click does for ours: options (``--name VALUE``,
    ``--name=VALUE``, ``-n VALUE``, ``-nVALUE``, flags), then the positional ones; with
    ``stop_at_positional`` the first positional ends the options (``run``'s COMMAND)."""

    def __init__(
        self,
        command: str,
        values: dict[str, str],
        flags: dict[str, str],
        multiple: Sequence[str] = (),
    ) -> None:
        self.command = command
        self.values = values  # option spelling -> name
        self.flags = flags
        self.multiple = set(multiple)

    def parse(
        self, args: Sequence[str], stop_at_positional: bool
    ) -> tuple[dict[str, Any], list[str]]:
        out: dict[str, Any] = {name: [] for name in self.multiple}
        positional: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            i += 1
            if arg == "--":
                positional.extend(args[i:])
                break
            if not arg.startswith("-") or arg == "-":
                positional.append(arg)
                if stop_at_positional:
                    positional.extend(args[i:])
                    break
                continue
            name, sep, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
            if not arg.startswith("--") and len(arg) > 2 and arg[:2] in self.values:
                name, sep, inline = arg[:2], "=", arg[2:]
            if name in self.flags:
                if sep:
                    raise Usage(self.command, f"Option '{name}' does not take a value.")
                out[self.flags[name]] = True
            elif name in self.values:
                if not sep:
                    if i >= len(args):
                        raise Usage(self.command, f"Option '{name}' requires an argument.")
                    inline = args[i]
                    i += 1
                key = self.values[name]
                if key in self.multiple:
                    out[key].append(inline)
                else:
                    out[key] = inline
            else:
                raise Usage(self.command, f"No such option: {name}")
        return out, positional


def _number(command: str, option: str, text: str | None, kind: type, minimum: float) -> Any:
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        word = "integer" if kind is int else "float"
        raise Usage(
            command, f"Invalid value for '{option}': {text!r} is not a valid {word}."
        ) from None
    if value < minimum or value != value or value in (float("inf"), float("-inf")):
        raise Usage(
            command, f"Invalid value for '{option}': {text} is not in the range x>={minimum}."
        )
    return value


def _env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise Failed("invalid-config", f"--env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _stdin_wanted(interactive: bool, no_stdin: bool) -> bool:
    if no_stdin:
        return False
    return interactive or not _isatty(0)


class Stdin:
    """What of this process's stdin goes to a command: ``text`` in the command's request
    (UTF-8 that was there already), then, when ``more``, ``head`` (bytes there already,
    not in ``text``) and the rest of fd 0, posted as it arrives."""

    def __init__(self, text: str | None, head: bytes, more: bool) -> None:
        self.text, self.head, self.more = text, head, more


NO_STDIN = Stdin(None, b"", False)


def _stdin_ahead() -> Stdin:
    """Reads what stdin holds already, without waiting for more: at EOF (a file,
    /dev/null, a pipe whose writer is done) small UTF-8 text goes in the request alone
    and an empty stdin is none at all (the fast path: one request)."""
    import select

    data = bytearray()
    eof = False
    try:
        while len(data) <= INLINE_STDIN and select.select([0], [], [], 0)[0]:
            chunk = os.read(0, CHUNK)
            if not chunk:
                eof = True
                break
            data += chunk
    except (OSError, ValueError):
        return NO_STDIN  # a closed or unreadable stdin: none
    if eof and not data:
        return NO_STDIN
    text: str | None = None
    if len(data) <= INLINE_STDIN:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass  # binary (or a character cut at the end): posted as bytes
    if text is not None:
        return Stdin(text or None, b"", not eof)
    return Stdin(None, bytes(data), True)


# --------------------------------------------------------------------------- commands


RUN_OPTIONS = Options(
    "run",
    values={
        "-t": "template",
        "--template": "template",
        "-e": "env",
        "--env": "env",
        "--cwd": "cwd",
        "-u": "user",
        "--user": "user",
        "--timeout": "timeout",
        "--lifetime": "lifetime",
        "--vcpus": "vcpus",
        "--memory": "memory",
        "--network": "network",
        "--allow": "allow",
    },
    flags={
        "--cold": "cold",
        "--no-egress": "no_egress",
        "-i": "interactive",
        "--interactive": "interactive",
        "--no-stdin": "no_stdin",
    },
    multiple=("env", "allow"),
)
EXEC_OPTIONS = Options(
    "exec",
    values={
        "-e": "env",
        "--env": "env",
        "--cwd": "cwd",
        "-u": "user",
        "--user": "user",
        "--timeout": "timeout",
    },
    flags={"-i": "interactive", "--interactive": "interactive", "--no-stdin": "no_stdin"},
    multiple=("env",),
)


class Remote:
    def __init__(self, http: Http) -> None:
        self.http = http

    def call(self, method: str, path: str, ok: Sequence[int] = (200,), **kw: Any) -> Response:
        r = self.http.request(method, path, **kw)
        if r.status not in ok:
            raise r.error()
        return r

    # --- run and exec

    def run(self, args: Sequence[str]) -> int:
        opts, command = RUN_OPTIONS.parse(args, stop_at_positional=True)
        if not command:
            raise Usage("run", "Missing argument 'COMMAND...'.")
        timeout = _number("run", "--timeout", opts.get("timeout"), float, 0)
        lifetime = _number("run", "--lifetime", opts.get("lifetime"), float, 0)
        vcpus = _number("run", "--vcpus", opts.get("vcpus"), int, -(2**63))
        memory = _number("run", "--memory", opts.get("memory"), int, -(2**63))
        env = _env(opts["env"])
        allow, no_egress = opts["allow"], opts.get("no_egress", False)
        if no_egress and allow:
            raise Failed("invalid-config", "--no-egress and --allow exclude each other")
        template = opts.get("template", "python")
        network = opts.get("network", "none")
        create: dict[str, Any] = {"template": template}
        if vcpus is not None:
            create["vcpus"] = vcpus
        if memory is not None:
            create["memory_mib"] = memory
        if opts.get("cold"):
            create["cold"] = True
        if network != "none":
            create["network"] = network
        if network != "none" or allow or no_egress:
            create["allow"] = [] if no_egress else (list(allow) if allow else None)
        create["timeout"] = DEFAULT_LIFETIME if lifetime is None else (lifetime or None)
        stdin = (
            _stdin_ahead()
            if _stdin_wanted(opts.get("interactive", False), opts.get("no_stdin", False))
            else NO_STDIN
        )
        try:
            r = self.call("POST", "/v1/sandboxes", ok=(201,), json_body=create)
        except Failed as exc:
            if exc.code == "template-not-found" and (
                template.startswith(("/", ".", "-")) or "/" in template
            ):
                exc.message += (
                    "; to pass -t to the command, put it after the command (novasandbox run "
                    "-- CMD -t ...)"
                )
            raise
        sandbox_id = str(r.json()["id"])
        try:
            return self._command(
                sandbox_id, command, env, opts.get("cwd"), timeout, stdin, opts.get("user")
            )
        finally:
            try:  # the server kills it after answering: the user does not wait for that
                self.call(
                    "DELETE",
                    f"/v1/sandboxes/{sandbox_id}",
                    ok=(202, 204),
                    query=[("wait", "false")],
                ).read(MAX_ERROR_BODY)
            except Failed:
                pass

    def exec(self, args: Sequence[str]) -> int:
        opts, rest = EXEC_OPTIONS.parse(args, stop_at_positional=True)
        if not rest:
            raise Usage("exec", "Missing argument 'SANDBOX_ID'.")
        sandbox_id, command = rest[0], rest[1:]
        if command[:1] == ["--"]:
            command = command[1:]
        if not command:
            raise Usage("exec", "Missing argument 'COMMAND...'.")
        timeout = _number("exec", "--timeout", opts.get("timeout"), float, 0)
        env = _env(opts["env"])
        stdin = (
            _stdin_ahead()
            if _stdin_wanted(opts.get("interactive", False), opts.get("no_stdin", False))
            else NO_STDIN
        )
        sandbox_id = self.resolve(sandbox_id)
        return self._command(
            sandbox_id, command, env, opts.get("cwd"), timeout, stdin, opts.get("user")
        )

    def _command(
        self,
        sandbox_id: str,
        command: list[str],
        env: dict[str, str],
        cwd: str | None,
        timeout: float | None,
        stdin: Stdin,
        user: str | None = None,
    ) -> int:
        body: dict[str, Any] = {"cmd": command, "timeout": timeout or None}
        if env:
            body["env"] = env
        if cwd is not None:
            body["cwd"] = cwd
        if user is not None:
            body["user"] = user
        if stdin.text is not None:
            body["stdin"] = stdin.text
        if stdin.more:
            body["open_stdin"] = True
        try:
            r = self.call("POST", f"/v1/sandboxes/{sandbox_id}/commands", json_body=body)
        except Failed as exc:
            if exc.code == "command-not-found":
                if command[0].startswith("-"):
                    exc.message += (
                        f" (options of run go before the command: {command[0]!r} came after it)"
                    )
                exc.status = EXIT_NOT_FOUND
            raise
        pid: list[int] = []

        def started(event: dict[str, Any]) -> None:
            if isinstance(event.get("pid"), int) and not pid:
                pid.append(event["pid"])
                if stdin.more:
                    _start_thread(self._pump_stdin, sandbox_id, pid[0], stdin.head)

        try:
            last = self._events(r, started)
        except BaseException as exc:
            self.http.close()  # mid-response: the server kills the command it streamed
            if isinstance(exc, KeyboardInterrupt):
                import signal

                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a 2nd Ctrl-C: cleanup goes on
            if pid and isinstance(exc, (KeyboardInterrupt, BrokenPipeError)):
                self._kill_command(sandbox_id, pid[0])
            raise
        if last is None:
            raise _broken("the command's events ended without its exit")
        if last["type"] == "error":
            error = last.get("error") or {}
            code = str(error.get("code", "error"))
            status = EXIT_TIMEOUT if code == "sandbox-expired" else EXIT_ERROR
            raise Failed(code, str(error.get("message", "")), status)
        if last.get("timed_out"):
            raise Failed(
                "command-timeout",
                f"command {_join(command)} ran past its {timeout} s timeout; its process "
                "group was killed",
                EXIT_TIMEOUT,
            )
        exit_code = last.get("exit_code")
        return exit_code if isinstance(exit_code, int) else EXIT_ERROR

    def _kill_command(self, sandbox_id: str, pid: int) -> None:
        """SIGKILL a command's process group, on a new connection (best effort: closing
        its stream kills it as well)."""
        try:
            self.call(
                "DELETE", f"/v1/sandboxes/{sandbox_id}/commands/{pid}", ok=(204, 404, 409)
            ).read(MAX_ERROR_BODY)
        except Failed:
            pass

    def _pump_stdin(self, sandbox_id: str, pid: int, head: bytes) -> None:
        """Posts ``head``, then fd 0 as it arrives, to the command's stdin on a connection
        of its own, and closes it at EOF. Ends quietly when the command is gone first."""
        http = Http(self.http.url, self.http.key)
        path = f"/v1/sandboxes/{sandbox_id}/commands/{pid}"
        try:
            data = head
            while data or (data := os.read(0, CHUNK)):
                r = http.request("POST", f"{path}/stdin", body=data)
                r.read(MAX_ERROR_BODY)
                if r.status != 204:
                    return  # the command ended (or its sandbox): nothing to feed
                data = b""
            http.request("POST", f"{path}/close-stdin").read(MAX_ERROR_BODY)
        except (Failed, OSError, ValueError):
            pass
        finally:
            http.close()

    def _events(
        self, r: Response, on_started: Callable[[dict[str, Any]], None]
    ) -> dict[str, Any] | None:
        """Writes the output events as they come; the last event (exit or error)."""
        out, err = sys.stdout.buffer, sys.stderr.buffer
        last: dict[str, Any] | None = None
        for line in r.lines():
            try:
                event = json.loads(line)
            except ValueError:
                raise _broken("an event is not JSON") from None
            if not isinstance(event, dict):
                raise _broken("an event is not a JSON object")
            kind = event.get("type")
            if kind == "stdout":
                out.write(str(event.get("data", "")).encode("utf-8", "surrogateescape"))
                out.flush()
            elif kind == "stderr":
                err.write(str(event.get("data", "")).encode("utf-8", "surrogateescape"))
                err.flush()
            elif kind == "started":
                on_started(event)
            elif kind in ("exit", "error"):
                last = event
        return last

    # --- ls and kill

    def sandboxes(self, query: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
        found = self.call("GET", "/v1/sandboxes", query=query).json().get("sandboxes", [])
        return [s for s in found if isinstance(s, dict)]

    def resolve(self, sandbox_id: str) -> str:
        """A full id from any unique prefix of one (``sb-6267`` or ``6267``)."""
        if re.fullmatch(r"sb-[0-9a-f]{10}", sandbox_id):
            return sandbox_id
        wanted = sandbox_id if sandbox_id.startswith("sb-") else f"sb-{sandbox_id}"
        matches = [s["id"] for s in self.sandboxes() if str(s.get("id", "")).startswith(wanted)]
        if len(matches) > 1:
            raise Failed(
                "ambiguous-id",
                f"{sandbox_id!r} matches {len(matches)} sandboxes: " + ", ".join(matches),
            )
        if not matches or not sandbox_id:
            raise Failed("sandbox-not-found", f"no sandbox {sandbox_id!r}")
        return str(matches[0])

    def ls(self, args: Sequence[str]) -> int:
        opts, rest = Options(
            "ls",
            values={},
            flags={"--json": "json", "-a": "all", "--all": "all"},
        ).parse(args, stop_at_positional=False)
        if rest:
            raise Usage("ls", f"Got unexpected extra argument ({rest[0]})")
        # each running sandbox's metrics, gathered by the server at once (bounded wait)
        query = [("metrics", "true")]
        if opts.get("all"):
            found = self.sandboxes(query)
        else:
            query += [("state", s) for s in ("starting", "running", "paused")]
            found = self.sandboxes(query)
        if opts.get("json"):
            sys.stdout.write(json.dumps(found, indent=2) + "\n")
            return 0
        rows = [["id", "template", "state", "vcpus", "memory", "boot", "expires in"]]
        rows[0] += ["cpu", "mem used", "disk used", "vmm rss", "labels"]
        clustered = any(s.get("node") for s in found)  # a cluster server (serve --ray)
        if clustered:
            rows[0].insert(3, "node")
        now = time.time()
        for s in found:
            expires = s.get("expires_at")
            boot = "pooled" if s.get("pooled") else ("restored" if s.get("restored") else "cold")
            labels = ",".join(f"{k}={v}" for k, v in (s.get("labels") or {}).items())
            rows.append(
                [
                    str(s.get("id")),
                    str(s.get("template")),
                    str(s.get("state")),
                    str(s.get("vcpus")),
                    f"{s.get('memory_mib')} MiB",
                    boot,
                    "never" if expires is None else f"{max(0.0, expires - now):.0f} s",
                    *_metric_cells(s.get("metrics")),
                    labels,
                ]
            )
            if clustered:
                rows[-1].insert(3, str(s.get("node") or "")[:12])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            sys.stdout.write(
                "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
            )
        return 0

    def cluster(self, args: Sequence[str]) -> int:
        """``cluster status``: the nodes of a cluster server (``serve --ray``)."""
        opts, rest = Options("cluster", values={}, flags={"--json": "json"}).parse(
            args, stop_at_positional=False
        )
        if rest != ["status"]:
            raise Usage("cluster", "through a server, cluster takes one command: status")
        found = self.call("GET", "/v1/cluster").json()
        if opts.get("json"):
            sys.stdout.write(json.dumps(found, indent=2) + "\n")
            return 0
        rows = [["node", "address", "state", "sandboxes", "vcpus", "memory", "templates"]]
        for n in found.get("nodes", []):
            cap, used = n.get("capacity", {}), n.get("used", {})
            rows.append(
                [
                    str(n.get("node_id", ""))[:12],
                    str(n.get("address", "")),
                    str(n.get("state", "")),
                    f"{used.get('sandboxes', 0)}/{cap.get('slots', 0)}",
                    f"{used.get('vcpus', 0)}/{cap.get('vcpus', 0)}",
                    f"{used.get('memory_mib', 0)}/{cap.get('memory_mib', 0)} MiB",
                    ",".join(n.get("templates", [])),
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            sys.stdout.write(
                "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n"
            )
        placement = found.get("placement", {})
        sys.stdout.write(
            f"{found.get('sandboxes', 0)} sandboxes; placement: {placement.get('policy', '?')}\n"
        )
        return 0

    def kill(self, args: Sequence[str]) -> int:
        opts, ids = Options("kill", values={}, flags={"--all": "all"}).parse(
            args, stop_at_positional=False
        )
        if bool(opts.get("all")) == bool(ids):
            raise Usage("kill", "give sandbox ids or --all (not both)")
        targets = (
            [str(s["id"]) for s in self.sandboxes()]
            if opts.get("all")
            else [self.resolve(i) for i in ids]
        )
        for sandbox_id in targets:
            self.call("DELETE", f"/v1/sandboxes/{sandbox_id}", ok=(204,)).read(MAX_ERROR_BODY)
            sys.stdout.write(f"killed {sandbox_id}\n")
            sys.stdout.flush()
        return 0

    # --- create

    def create(self, args: Sequence[str]) -> int:
        opts, rest = Options(
            "create",
            values={"--timeout": "timeout", "-l": "label", "--label": "label"},
            flags={"--json": "json"},
            multiple=("label",),
        ).parse(args, stop_at_positional=False)
        if len(rest) > 1:
            raise Usage("create", f"Got unexpected extra argument ({rest[1]})")
        timeout = _number("create", "--timeout", opts.get("timeout"), float, 0)
        labels = {}
        for pair in opts["label"]:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise Failed("invalid-config", f"--label takes KEY=VALUE, got {pair!r}")
            labels[key] = value
        body: dict[str, Any] = {"template": rest[0] if rest else "python"}
        if timeout is not None:
            body["timeout"] = timeout or None  # 0: no limit
        if labels:
            body["labels"] = labels
        created = self.call("POST", "/v1/sandboxes", ok=(201,), json_body=body).json()
        if opts.get("json"):
            sys.stdout.write(json.dumps(created, indent=2) + "\n")
        else:
            sys.stdout.write(f"{created['id']}\n")
        return 0

    # --- cp

    def cp(self, args: Sequence[str]) -> int:
        _, paths = Options("cp", values={}, flags={}).parse(args, stop_at_positional=False)
        if len(paths) != 2:
            raise Usage("cp", "cp takes SRC DST: FILE ID:PATH (upload) or ID:PATH FILE (download)")
        src, dst = (_remote_path(p) for p in paths)
        if (src is None) == (dst is None):
            raise Usage(
                "cp",
                "cp takes FILE ID:PATH (upload) or ID:PATH FILE (download); '-' is stdin/stdout",
            )
        if dst is not None:
            return self._upload(paths[0], self.resolve(dst[0]), dst[1])
        assert src is not None
        return self._download(self.resolve(src[0]), src[1], paths[1])

    def _upload(self, local: str, sandbox_id: str, path: str) -> int:
        if local == "-":
            if path.endswith("/"):
                raise Usage("cp", "copying stdin needs a file name: ID:PATH, not ID:DIR/")
            stream: Iterable[bytes] = iter(lambda: os.read(0, CHUNK), b"")
            self.call(
                "PUT", f"/v1/sandboxes/{sandbox_id}/files", query=[("path", path)], body=stream
            ).read(MAX_ERROR_BODY)
            return 0
        try:
            f = open(local, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            raise Usage("cp", f"Invalid value for 'SRC': Path {local!r} does not exist.") from None
        except OSError as exc:
            raise Failed("error", f"cannot read {local}: {exc.strerror or exc}") from None
        with f:
            st = os.fstat(f.fileno())
            if path.endswith("/") or not path:
                path += os.path.basename(local)
            query = [("path", path), ("mode", f"{st.st_mode & 0o777:o}")]
            chunks = iter(lambda: f.read(CHUNK), b"")
            self.call(
                "PUT",
                f"/v1/sandboxes/{sandbox_id}/files",
                query=query,
                body=chunks,
                length=st.st_size,
            ).read(MAX_ERROR_BODY)
        return 0

    def _download(self, sandbox_id: str, path: str, local: str) -> int:
        r = self.call("GET", f"/v1/sandboxes/{sandbox_id}/files", query=[("path", path)])
        if local == "-":
            out = sys.stdout.buffer
            for data in r.chunks():
                out.write(data)
            out.flush()
            return 0
        if os.path.isdir(local):
            local = os.path.join(local, os.path.basename(path.rstrip("/")))
        try:
            f = open(local, "wb")  # noqa: SIM115 (closed below)
        except OSError as exc:
            self.http.close()
            raise Failed("error", f"cannot write {local}: {exc.strerror or exc}") from None
        try:
            with f:
                for data in r.chunks():
                    f.write(data)
        except BaseException:
            os.unlink(local)  # no partial file
            raise
        return 0


def _metric_cells(m: Any) -> list[str]:
    """``ls``'s cells for a sandbox's metrics (cpu, mem used, disk used, vmm rss); '-' for
    what the server did not give (not running, or no answer in time)."""
    if not isinstance(m, dict):
        return ["-"] * 4

    def mib(name: str, total: str | None = None) -> str:
        value, whole = m.get(name), m.get(total) if total else None
        if not isinstance(value, int):
            return "-"
        if isinstance(whole, int) and whole > 0:
            return f"{value / 2**20:.0f}/{whole / 2**20:.0f} MiB"
        return f"{value / 2**20:.0f} MiB"

    pct = m.get("cpu_used_pct")
    cpu = f"{pct:.0f}%" if isinstance(pct, (int, float)) else "-"
    return [cpu, mib("mem_used", "mem_total"), mib("disk_used", "disk_total"), mib("vmm_rss")]


def _start_thread(target: Callable[..., None], *args: Any) -> None:
    """A daemon thread (one blocked on a stdin that never ends does not hold the exit)."""
    import threading  # only when stdin is streamed

    threading.Thread(target=target, args=args, daemon=True).start()


def _remote_path(text: str) -> tuple[str, str] | None:
    """``ID:PATH`` as (ID, PATH); None for a local path."""
    m = re.fullmatch(r"((?:sb-)?[0-9a-f]{2,10}):(.*)", text, re.DOTALL)
    return (m.group(1), m.group(2)) if m else None


def _join(argv: Sequence[str]) -> str:
    import shlex

    return shlex.join(argv)


# --------------------------------------------------------------------------- dispatch


def split_global(args: Sequence[str]) -> tuple[dict[str, str | None], int] | None:
    """The options before the command that the remote CLI takes (``--server``,
    ``--api-key``, ``-v``) and the index of the command; None: anything else comes
    first (``--help``, ``--version``...), for ``novasandbox.cli``."""
    found: dict[str, str | None] = {"server": None, "api_key": None}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            return found, i
        name, sep, value = arg.partition("=")
        if name in ("--server", "--api-key"):
            if not sep:
                if i + 1 >= len(args):
                    return None
                value = args[i + 1]
                i += 1
            found[name[2:].replace("-", "_")] = value
        elif not re.fullmatch(r"-v+|--verbose", arg):
            return None
        i += 1
    return None


def _wants_help(command: str, args: Sequence[str]) -> bool:
    for arg in args:
        if arg == "--":
            return False
        if command in ("run", "exec") and not arg.startswith("-"):
            return False  # the command's own arguments from here
        if arg in ("-h", "--help"):
            return True
    return False


def remote_main(args: Sequence[str]) -> int | None:
    """Run ``args`` (``sys.argv[1:]``) through the server and return the exit status;
    None: this is not for the server (``novasandbox.cli`` runs it)."""
    split = split_global(args)
    if split is None:
        return None
    found, at = split
    command, rest = args[at], args[at + 1 :]
    server = found["server"] or os.environ.get("NOVASANDBOX_SERVER") or ""
    if command not in REMOTE_COMMANDS or not server or _wants_help(command, rest):
        return None
    if command == "cluster" and rest[:1] != ["status"]:
        return None  # drain/undrain talk to Ray, not to the server
    key = found["api_key"] or os.environ.get("NOVASANDBOX_API_KEY") or None
    http: Http | None = None
    try:
        http = Http(server, key)
        remote = Remote(http)
        handler: Callable[[Sequence[str]], int] = getattr(remote, command)
        return handler(rest)
    except Usage as exc:
        sys.stderr.write(
            f"Usage: {USAGE[exc.command]}\nTry 'novasandbox {exc.command} -h' for help.\n\n"
            f"Error: {exc.message}\n"
        )
        return EXIT_USAGE
    except Failed as exc:
        sys.stderr.write(_error_line(exc.code, exc.message))
        return exc.status
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout's reader is gone (``| head -1``): quietly, and nothing more to flush there
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    finally:
        if http is not None:
            http.close()


def local_args(args: Sequence[str]) -> list[str]:
    """``args`` without the remote CLI's options (for ``novasandbox.cli``'s help)."""
    split = split_global(args)
    if split is None:
        return list(args)
    _, at = split
    return [a for a in args[:at] if re.fullmatch(r"-v+|--verbose", a)] + list(args[at:])


def dispatch(local: Callable[[], Callable[[], Any]]) -> Any:
    """Run the command line: through the server when it is one of its commands, else the
    CLI that ``local`` gives (``novasandbox.cli``'s group, imported only then)."""
    args = sys.argv[1:]
    status = remote_main(args)
    if status is not None:
        sys.stdout.flush()
        return status
    split = split_global(args)
    if split is not None and split[1] < len(args) and args[split[1]] in REMOTE_COMMANDS:
        sys.argv[1:] = local_args(args)  # --server given with --help: the local help
    return local()()
