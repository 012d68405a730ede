"""The agent wire protocol: a sans-I/O frame codec shared by the host and the guest agent.

This module must stay standard-library only and free of I/O: the same file is copied
into the guest image and imported by the agent there.

A frame is a fixed 9-byte header followed by a payload::

    +----------------+----------------+--------+------------------+
    | length (u32 BE)| request id (u32)| kind u8| payload (length) |
    +----------------+----------------+--------+------------------+

``kind`` says what the payload is:

* ``MSG``     a UTF-8 JSON object with an ``"op"`` key (control messages);
* ``STDIN``/``STDOUT``/``STDERR`` raw bytes of a running command's streams;
* ``DATA``    raw bytes of a file being written or read.

The request id ties every frame to one request, so several commands and file transfers
stream over one channel at once. Id 0 is the connection itself (handshake). Payloads
are capped at ``MAX_PAYLOAD`` bytes; a peer that announces more is broken or hostile
and the decoder refuses it before buffering anything.
"""

from __future__ import annotations

import enum
import json
import struct

# Start-up time matters in the guest (every import costs tens of ms under emulation), so
# typing and dataclasses are not imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PROTOCOL_VERSION = 3
"""Bumped on any incompatible change; host and agent compare it in the handshake.
2: flow control (``ack``/``cancel``) for command output and file reads; every reply is
checked against ``REPLIES``.
3: entries with owner, group, permissions and link target; listings streamed in batches
(``depth``); ``rename``, ``watch_dir``; ``mkdir`` says whether it created."""

HEADER = struct.Struct(">IIB")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 20
"""Largest payload a peer may send (1 MiB). Data is chunked well below it."""
CHUNK_SIZE = 256 * 1024
"""Size of the data chunks both sides send for file contents and command output."""
MAX_REQUEST_ID = 0xFFFFFFFF

FRAME_COST = 64
"""What a frame counts for beyond its payload, in every byte budget on both sides (about
what the host spends to hold one decoded frame), so a flood of tiny frames is counted at
its real cost."""
WINDOW = 16 << 20
"""Flow control: the bytes (payload + ``FRAME_COST`` per frame) of data frames the agent may
send for one request before the host acknowledges them. The host grants more with
``{"op": "ack", "bytes": N}`` on the request's id as it consumes them, and stops the
stream with ``{"op": "cancel"}``; a peer that sends beyond its window is broken."""
ACK_STEP = 4 << 20
"""The host acknowledges consumed bytes in steps of this size (``WINDOW - ACK_STEP`` must
exceed one chunk, or a stream could stall)."""

MESSAGE_WINDOW = 8
"""Flow control of requests that stream messages rather than data (a listing's
``entries``, a watch's ``events``): the messages the agent may send before the host
acknowledges them (``{"op": "ack", "bytes": N}`` counts messages for these requests).
Each is at most about ``MESSAGE_BATCH`` bytes plus one item, so the window stays well
inside the host's inbox for a request."""
MESSAGE_ACK_STEP = 4
"""The host acknowledges streamed messages in steps of this many."""
MESSAGE_BATCH = 64 * 1024
"""The agent ends a batch of entries or events once it holds this many bytes."""
MAX_LIST_DEPTH = 32
"""Deepest ``list`` (``depth``) the agent walks."""
MAX_WATCHES = 8192
"""Directories one recursive watch follows at most (more are left unwatched)."""

AGENT_PORT_NAME = "org.novasandbox.agent"

"""Name of the virtio-serial port the guest agent listens on."""

GUEST_HOME = "/root"
"""Root's home. Another account's is ``/home/NAME`` (``guest_home``)."""


assert WINDOW - ACK_STEP >= CHUNK_SIZE + FRAME_COST
assert MESSAGE_WINDOW > MESSAGE_ACK_STEP


class Kind(enum.IntEnum):
    """What a frame's payload holds."""

    MSG = 1
    STDIN = 2
    STDOUT = 3
    STDERR = 4
    DATA = 5


class ErrorCode(enum.StrEnum):
    """The code of every ``error`` reply the agent may send: the one table of them.

    The agent sends nothing else (the host's schema refuses any other code as a broken
    reply), and the host maps each code to one public exception class
    (``novasandbox.errors.from_agent``), which keeps the code as ``agent_code``.
    """

    # The two sides do not understand each other.
    PROTOCOL_ERROR = "protocol-error"
    """The request's frames or message broke the protocol."""
    UNKNOWN_OP = "unknown-op"
    """No such operation."""
    BAD_REQUEST = "bad-request"
    """A field of the request is missing or invalid."""
    VERSION_MISMATCH = "version-mismatch"
    """The handshake named another protocol version."""
    # The agent could not do its own part.
    AGENT_ERROR = "agent-error"
    """An unexpected failure in the agent."""
    NETWORK_ERROR = "network-error"
    """The handshake's network settings could not be applied."""
    MOUNT_FAILED = "mount-failed"
    """A drive could not be found or mounted."""
    # Commands.
    COMMAND_NOT_FOUND = "command-not-found"
    INVALID_CWD = "invalid-cwd"
    UNKNOWN_USER = "unknown-user"
    """The request names an account the sandbox does not have."""
    NO_SUCH_PROCESS = "no-such-process"
    """No running command (started through the agent) with that request id or pid."""
    STDIN_CLOSED = "stdin-closed"
    """Input for a command whose stdin is closed, or was never open."""
    NOT_A_TERMINAL = "not-a-terminal"
    """A terminal's request (``resize``) for a command started without one."""
    TOO_MANY_CONNECTIONS = "too-many-connections"
    """A ``connect`` to a command that already streams to as many as it may."""
    # Files (most from the errno of a failed system call).
    FILE_NOT_FOUND = "file-not-found"
    NOT_A_DIRECTORY = "not-a-directory"
    IS_A_DIRECTORY = "is-a-directory"
    FILE_EXISTS = "file-exists"
    DIRECTORY_NOT_EMPTY = "directory-not-empty"
    PERMISSION_DENIED = "permission-denied"
    READ_ONLY_FILESYSTEM = "read-only-filesystem"
    NO_SPACE = "no-space"
    FILE_TOO_LARGE = "file-too-large"
    NOT_A_REGULAR_FILE = "not-a-regular-file"
    OS_ERROR = "os-error"
    """Another failed system call (its errno is in the reply)."""


class ProtocolError(Exception):
    """A peer sent bytes that are not a valid frame (the stream cannot be trusted after it).

    The host maps this to ``novasandbox.errors.AgentProtocolError``; it lives here so the
    guest agent can use the codec without the host package.
    """


class Frame:
    """One decoded frame (immutable)."""

    __slots__ = ("kind", "payload", "request_id")

    request_id: int
    kind: Kind
    payload: bytes

    def __init__(self, request_id: int, kind: Kind, payload: bytes) -> None:
        object.__setattr__(self, "request_id", request_id)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "payload", payload)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Frame is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.request_id, self.kind, self.payload) == (
            other.request_id,
            other.kind,
            other.payload,
        )

    def __hash__(self) -> int:
        return hash((self.request_id, self.kind, self.payload))

    def __repr__(self) -> str:
        return f"Frame(request_id={self.request_id}, kind={self.kind!r}, payload={self.payload!r})"

    def message(self) -> dict[str, Any]:
        """Decode a ``MSG`` frame's JSON payload (a dict with a string ``"op"``)."""
        if self.kind is not Kind.MSG:
            raise ProtocolError(f"frame of kind {self.kind.name} is not a message")
        return decode_message(self.payload)


def encode_frame(
    request_id: int, kind: Kind, payload: bytes = b"", *, max_payload: int = MAX_PAYLOAD
) -> bytes:
    """Serialize one frame; refuses ids and payloads that the peer would reject."""
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise ProtocolError(f"request id {request_id} out of range")
    if len(payload) > max_payload:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the {max_payload}-byte cap")
    return HEADER.pack(len(payload), request_id, int(kind)) + payload


def encode_message(request_id: int, op: str, /, **fields: Any) -> bytes:
    """Serialize a ``MSG`` frame ``{"op": op, **fields}``."""
    try:
        body = json.dumps({"op": op, **fields}, separators=(",", ":"), ensure_ascii=False)
        payload = body.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise ProtocolError(f"message cannot be encoded: {exc}") from None
    return encode_frame(request_id, Kind.MSG, payload)


def decode_message(payload: bytes) -> dict[str, Any]:
    """Parse a message payload; anything but a JSON object with a string ``op`` is an error."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"message is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
        raise ProtocolError("message is not a JSON object with a string 'op'")
    return obj


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get whole frames back.

    After a ``ProtocolError`` the decoder is poisoned and keeps raising: a byte stream
    that went out of sync cannot be resynchronised.
    """

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data`` and return every frame it completes, in order."""
        if self._error is not None:
            raise self._error
        self._buf += data
        frames: list[Frame] = []
        try:
            while len(self._buf) >= HEADER_SIZE:
                length, request_id, kind = HEADER.unpack_from(self._buf)
                if length > self._max_payload:
                    raise ProtocolError(
                        f"peer announced a {length}-byte payload (cap {self._max_payload})"
                    )
                try:
                    frame_kind = Kind(kind)
                except ValueError:
                    raise ProtocolError(f"unknown frame kind {kind}") from None
                end = HEADER_SIZE + length
                if len(self._buf) < end:
                    break
                frames.append(Frame(request_id, frame_kind, bytes(self._buf[HEADER_SIZE:end])))
                del self._buf[:end]
        except ProtocolError as exc:
            self._error = exc
            self._buf.clear()
            raise
        return frames


# ------------------------------------------------------------------------- reply schemas
#
# What the agent may answer to each request, field by field. A spec is a type (``int``
# excludes bools; ``float`` accepts ints), a tuple of alternatives (``None`` for null), a
# frozenset of allowed strings, ``[spec]`` for a list, ``{name: spec}`` for an object with
# those fields (others are ignored), ``{str: spec}`` for a map of any keys, ``Str(n)``
# for a string of at most n characters, or ``COUNT`` for a non-negative int. A field may
# be absent only where its spec accepts None.


class Str:
    """A spec: a string of at most ``limit`` characters (what the guest names is bounded)."""

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        self.limit = limit


class Count:
    """A spec: a non-negative int (a count the guest reports, such as dropped bytes)."""

    __slots__ = ()


COUNT = Count()


MAX_PATH_TEXT = 4 * 4096
"""Characters of a path on the wire: ``PATH_MAX`` bytes, each undecodable one written as
the four characters ``\\xNN``."""
MAX_NAME_TEXT = 4 * 255
"""Characters of one file name on the wire (``NAME_MAX`` bytes, escaped)."""
MAX_ACCOUNT_TEXT = 32
"""Characters of an owner or group: a name, or the numeric id when the guest has none."""
ENTRY = {
    "name": Str(MAX_NAME_TEXT),
    "path": Str(MAX_PATH_TEXT),
    "type": frozenset({"file", "dir", "symlink", "other"}),
    "size": int,
    "mode": int,
    "mtime": float,
    "owner": Str(MAX_ACCOUNT_TEXT),
    "group": Str(MAX_ACCOUNT_TEXT),
    "symlink_target": (Str(MAX_PATH_TEXT), None),
}
PROCESS = {
    "pid": int,
    "argv": [str],
    "cwd": str,
    "user": str,
    "tag": (str, None),
    "stdin": bool,
    "started_at": float,
}
WATCH_EVENT_TYPES = frozenset({"create", "write", "remove", "rename", "chmod"})
WATCH_EVENT = {"name": Str(MAX_PATH_TEXT), "type": WATCH_EVENT_TYPES}
ERROR = {"code": frozenset(ErrorCode), "message": str, "errno": (int, None)}
OK: dict[str, Any] = {}

REPLIES: dict[str, dict[str, dict[str, Any]]] = {
    "hello": {
        "hello": {"version": int, "agent": str, "kernel": str, "pid": int, "user": (str, None)}
    },
    "ping": {"pong": OK},
    "metrics": {
        "ok": {
            "cpu_used_pct": float,
            "cpu_count": int,
            "mem_used": int,
            "mem_total": int,
            "disk_used": int,
            "disk_total": int,
        }
    },
    "exec": {
        "started": {"pid": int},
        "exit": {
            "exit_code": int,
            "signal": (int, None),
            "timed_out": bool,
            "dropped": (COUNT, None),  # sent only to connections (``connect``)
        },
    },
    "signal": {"ok": OK},
    "ps": {"ok": {"processes": [PROCESS]}},
    "connect": {
        "started": {"pid": int, "argv": [str]},
        "exit": {"exit_code": int, "signal": (int, None), "timed_out": bool, "dropped": COUNT},
    },
    "write_stdin": {"ok": OK},
    "resize": {"ok": OK},
    "close_stdin": {"ok": OK},
    "write_file": {"ok": {"size": int, "stat": (ENTRY, None)}},
    "read_file": {"ok": {"size": int}},
    "list": {"entries": {"entries": [ENTRY]}, "ok": {"count": int, "truncated": bool}},
    "stat": {"ok": {"stat": ENTRY}},
    "rename": {"ok": {"stat": ENTRY}},
    "mkdir": {"ok": {"created": bool}},
    "watch_dir": {
        "watching": {"watches": int},
        "events": {"events": [WATCH_EVENT], "dropped": COUNT},
        "ok": {"dropped": COUNT},
    },
    "remove": {"ok": OK},
    "mount": {"ok": {"device": str}},
    "release": {"ok": {"drives": {str: str}}},
    "sync": {"ok": OK},
    "freeze": {"ok": OK},
    "thaw": {"ok": {"thawed": bool}},
    "lifetime": {"ok": OK},
    "shutdown": {"ok": OK},
}
"""Request op -> reply op -> its fields. ``error`` (fields ``ERROR``) may answer any request."""
INTERIM = frozenset({"started", "entries", "watching", "events"})
"""Replies after which more follow; every other reply is a request's last."""
UNSOLICITED = {"agent-started": {"pid": int}}
"""Messages the agent sends on request id 0 without being asked."""


def check_reply(request_op: str, msg: dict[str, Any]) -> dict[str, Any]:
    """Raise ``ProtocolError`` unless ``msg`` is a reply the agent may send to a
    ``request_op`` request (``REPLIES``, or an ``error``); return it unchanged."""
    op = msg["op"]
    expected = ERROR if op == "error" else REPLIES.get(request_op, {}).get(op)
    if expected is None:
        raise ProtocolError(f"unexpected reply {op!r} to {request_op!r}")
    _check(expected, msg, f"{op!r} reply to {request_op!r}")
    return msg


def check_unsolicited(msg: dict[str, Any]) -> dict[str, Any]:
    """Raise ``ProtocolError`` unless ``msg`` is a valid ``UNSOLICITED`` message."""
    spec = UNSOLICITED.get(msg["op"])
    if spec is None:
        raise ProtocolError(f"unknown unsolicited message {msg['op']!r}")
    _check(spec, msg, f"unsolicited {msg['op']!r}")
    return msg


def check_value(spec: Any, value: Any, where: str) -> Any:
    """Raise ``ProtocolError`` unless ``value`` matches ``spec`` (the language of the
    reply schemas, e.g. ``ENTRY``); return it unchanged."""
    _check(spec, value, where)
    return value


def _check(spec: Any, value: Any, where: str) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ProtocolError(f"{where}: expected an object, got {_kind(value)}")
        if str in spec:
            for key, item in value.items():
                _check(spec[str], item, f"{where}[{key!r}]")
            return
        for name, item_spec in spec.items():
            if name not in value and not _nullable(item_spec):
                raise ProtocolError(f"{where}: field {name!r} is missing")
            _check(item_spec, value.get(name), f"{where}: field {name!r}")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise ProtocolError(f"{where}: expected a list, got {_kind(value)}")
        for item in value:
            _check(spec[0], item, where + " (an item)")
    elif isinstance(spec, tuple):
        errors = []
        for option in spec:
            try:
                _check(option, value, where)
                return
            except ProtocolError as exc:
                errors.append(exc)
        raise errors[0]
    elif isinstance(spec, frozenset):
        if value not in spec:
            raise ProtocolError(f"{where}: {value!r} is not one of {sorted(spec)}")
    elif isinstance(spec, Str):
        if not isinstance(value, str):
            raise ProtocolError(f"{where}: expected str, got {_kind(value)}")
        if len(value) > spec.limit:
            raise ProtocolError(
                f"{where}: a string of {len(value)} characters (at most {spec.limit})"
            )
    elif isinstance(spec, Count):
        if not _is_a(value, int) or value < 0:
            raise ProtocolError(f"{where}: expected a non-negative int, got {_kind(value)}")
    elif spec is None:
        if value is not None:
            raise ProtocolError(f"{where}: expected null, got {_kind(value)}")
    elif not _is_a(value, spec):
        raise ProtocolError(f"{where}: expected {spec.__name__}, got {_kind(value)}")


def _is_a(value: Any, typ: type) -> bool:
    if isinstance(value, bool):
        return typ is bool
    if typ is float:
        return isinstance(value, (int, float))
    return isinstance(value, typ)


def _nullable(spec: Any) -> bool:
    return isinstance(spec, tuple) and None in spec


def _kind(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
