"""The sans-I/O frame codec shared by the host and the guest agent."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novasandbox.guest.protocol import (
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD,
    MAX_REQUEST_ID,
    Frame,
    FrameDecoder,
    Kind,
    ProtocolError,
    decode_message,
    encode_frame,
    encode_message,
)


def raw_header(length: int, request_id: int = 1, kind: int = Kind.DATA) -> bytes:
    return HEADER.pack(length, request_id, kind)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)), b"\0" * 70_000])
def test_frame_round_trip(kind: Kind, payload: bytes) -> None:
    data = encode_frame(7, kind, payload)
    assert len(data) == HEADER_SIZE + len(payload)
    dec = FrameDecoder()
    assert dec.feed(data) == [Frame(7, kind, payload)]
    assert dec.buffered == 0


def test_header_layout_is_big_endian_length_id_kind() -> None:
    data = encode_frame(0x01020304, Kind.STDERR, b"abc")
    assert data[:HEADER_SIZE] == b"\x00\x00\x00\x03\x01\x02\x03\x04\x04"
    assert data[HEADER_SIZE:] == b"abc"


def test_message_round_trip_keeps_fields_and_unicode() -> None:
    data = encode_message(3, "exec", argv=["echo", "héllo ✓"], env={"A": "1"}, timeout=None)
    (frame,) = FrameDecoder().feed(data)
    assert frame.request_id == 3
    assert frame.kind is Kind.MSG
    assert frame.message() == {
        "op": "exec",
        "argv": ["echo", "héllo ✓"],
        "env": {"A": "1"},
        "timeout": None,
    }


def test_message_of_non_msg_frame_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="not a message"):
        Frame(1, Kind.STDOUT, b'{"op":"x"}').message()


def test_extreme_request_ids_round_trip() -> None:
    for rid in (0, 1, MAX_REQUEST_ID):
        (frame,) = FrameDecoder().feed(encode_frame(rid, Kind.MSG, b"{}"))
        assert frame.request_id == rid


# ---------------------------------------------------------------------------- incremental feeding


def test_byte_by_byte_feeding() -> None:
    stream = (
        encode_message(1, "hello", version=1)
        + encode_frame(2, Kind.STDOUT, b"out")
        + encode_frame(2, Kind.STDIN, b"")
    )
    dec = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(stream)):
        got = dec.feed(stream[i : i + 1])
        frames += got
        # a frame completes exactly when its last byte arrives, never earlier
        assert dec.buffered == (i + 1) - sum(HEADER_SIZE + len(f.payload) for f in frames)
    assert frames == [
        Frame(1, Kind.MSG, b'{"op":"hello","version":1}'),
        Frame(2, Kind.STDOUT, b"out"),
        Frame(2, Kind.STDIN, b""),
    ]


def test_several_frames_in_one_feed_keep_order_and_leftover() -> None:
    frames = [Frame(i, Kind.DATA, bytes([i]) * i) for i in range(1, 6)]
    stream = b"".join(encode_frame(f.request_id, f.kind, f.payload) for f in frames)
    partial = encode_frame(9, Kind.STDOUT, b"tail")
    dec = FrameDecoder()
    assert dec.feed(stream + partial[:-2]) == frames
    assert dec.buffered == len(partial) - 2
    assert dec.feed(partial[-2:]) == [Frame(9, Kind.STDOUT, b"tail")]
    assert dec.buffered == 0


def test_empty_feed_returns_nothing() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"") == []
    assert dec.buffered == 0


# ---------------------------------------------------------------------------- hostile input


def test_oversized_length_is_refused_from_the_header_alone() -> None:
    dec = FrameDecoder()
    # only the header: the decoder must not wait for (or buffer) the huge payload
    with pytest.raises(ProtocolError, match="payload"):
        dec.feed(raw_header(MAX_PAYLOAD + 1))
    assert dec.buffered == 0


def test_decoder_stays_poisoned_after_an_error() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(raw_header(0xFFFFFFFF))
    # a perfectly valid frame afterwards is still refused: the stream is out of sync
    with pytest.raises(ProtocolError):
        dec.feed(encode_frame(1, Kind.MSG, b'{"op":"ping"}'))
    with pytest.raises(ProtocolError):
        dec.feed(b"")


def test_custom_cap_applies_to_decoder_and_encoder() -> None:
    assert FrameDecoder(max_payload=4).feed(encode_frame(1, Kind.DATA, b"abcd")) == [
        Frame(1, Kind.DATA, b"abcd")
    ]
    with pytest.raises(ProtocolError):
        FrameDecoder(max_payload=4).feed(raw_header(5))
    with pytest.raises(ProtocolError):
        encode_frame(1, Kind.DATA, b"abcde", max_payload=4)


def test_payload_at_the_cap_is_accepted() -> None:
    payload = b"z" * MAX_PAYLOAD
    assert FrameDecoder().feed(encode_frame(1, Kind.DATA, payload)) == [
        Frame(1, Kind.DATA, payload)
    ]


@pytest.mark.parametrize("kind", [0, 6, 255])
def test_unknown_kind_is_refused(kind: int) -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="kind"):
        dec.feed(raw_header(0, kind=kind))
    with pytest.raises(ProtocolError):
        dec.feed(encode_frame(1, Kind.MSG, b"{}"))


def test_unknown_kind_is_refused_before_its_payload_arrives() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(raw_header(100, kind=42))


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe",  # not UTF-8
        b"\xc3",  # truncated UTF-8 sequence
        b"",  # empty
        b"{not json",
        b"[1, 2]",  # JSON, not an object
        b'"op"',
        b"null",
        b"{}",  # no op
        b'{"op": 1}',  # op not a string
        b'{"op": null}',
        b'{"kind": "exec"}',
    ],
)
def test_bad_messages_are_protocol_errors(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_message(payload)
    with pytest.raises(ProtocolError):
        Frame(1, Kind.MSG, payload).message()


def test_decode_message_accepts_extra_fields() -> None:
    assert decode_message(b'{"op":"ok","size":3,"x":[1]}') == {"op": "ok", "size": 3, "x": [1]}


# ---------------------------------------------------------------------------- encoder limits


def test_encode_refuses_oversized_payload() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame(1, Kind.DATA, b"x" * (MAX_PAYLOAD + 1))


def test_encode_message_refuses_oversized_body() -> None:
    with pytest.raises(ProtocolError):
        encode_message(1, "write", blob="x" * MAX_PAYLOAD)


@pytest.mark.parametrize("rid", [-1, MAX_REQUEST_ID + 1, 1 << 40])
def test_encode_refuses_bad_request_ids(rid: int) -> None:
    with pytest.raises(ProtocolError, match="request id"):
        encode_frame(rid, Kind.MSG, b"{}")
    with pytest.raises(ProtocolError):
        encode_message(rid, "ping")


# ---------------------------------------------------------------------------- properties

frames_strategy = st.lists(
    st.builds(
        Frame,
        request_id=st.integers(0, MAX_REQUEST_ID),
        kind=st.sampled_from(list(Kind)),
        payload=st.binary(max_size=300),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(frames=frames_strategy, data=st.data())
def test_random_frames_split_anywhere_decode_identically(
    frames: list[Frame], data: st.DataObject
) -> None:
    stream = b"".join(encode_frame(f.request_id, f.kind, f.payload) for f in frames)
    cuts = sorted(
        data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="split points")
    )
    dec = FrameDecoder()
    out: list[Frame] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += dec.feed(stream[start:cut])
        start = cut
    assert out == frames
    assert dec.buffered == 0


@settings(max_examples=300, deadline=None)
@given(
    op=st.text(min_size=1),
    fields=st.dictionaries(
        st.text().filter(lambda k: k != "op"), st.integers() | st.text() | st.none()
    ),
)
def test_random_messages_round_trip(op: str, fields: dict[str, object]) -> None:
    (frame,) = FrameDecoder().feed(encode_message(5, op, **fields))
    assert frame.message() == {"op": op, **fields}


@settings(max_examples=500, deadline=None)
@given(chunks=st.lists(st.binary(max_size=64), max_size=8), cap=st.sampled_from([16, MAX_PAYLOAD]))
def test_garbage_either_decodes_or_raises_protocol_error(chunks: list[bytes], cap: int) -> None:
    dec = FrameDecoder(max_payload=cap)
    try:
        for chunk in chunks:
            for frame in dec.feed(chunk):
                assert isinstance(frame.kind, Kind)
                assert len(frame.payload) <= cap
                try:
                    if frame.kind is Kind.MSG:
                        msg = frame.message()
                        assert isinstance(msg["op"], str)
                        json.dumps(msg)
                except ProtocolError:
                    pass
    except ProtocolError:
        # once broken, always broken
        with pytest.raises(ProtocolError):
            dec.feed(b"")
