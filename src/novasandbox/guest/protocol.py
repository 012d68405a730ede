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

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; host and agent compare it in the handshake."""

HEADER = struct.Struct(">IIB")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1 << 20
"""Largest payload a peer may send (1 MiB). Data is chunked well below it."""
CHUNK_SIZE = 256 * 1024
"""Size of the data chunks both sides send for file contents and command output."""
MAX_REQUEST_ID = 0xFFFFFFFF

AGENT_PORT_NAME = "org.novasandbox.agent"
"""Name of the virtio-serial port the guest agent listens on."""


class Kind(enum.IntEnum):
    """What a frame's payload holds."""

    MSG = 1
    STDIN = 2
    STDOUT = 3
    STDERR = 4
    DATA = 5


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
