"""Unit tests of protocol v1 framing (kvloft.protocol), mirroring engine/src/protocol.rs."""

from __future__ import annotations

import struct

import msgpack
import pytest

from kvloft.errors import BadBody, ProtocolError
from kvloft.protocol import (
    HEADER_BYTES,
    LEN_BYTES,
    MAGIC,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    BadMagic,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameError,
    FrameKind,
    FrameTooLarge,
    FrameTooShort,
    UnknownFrameKind,
    UnsupportedFrameVersion,
    decode,
    encode_frame,
    encode_raw,
    frame_len,
    unpack_body,
)

# Golden vectors shared with the Rust side: they are what
# `encode(&mut out, FrameKind::Request, id, &to_body(&Request::...))` produces with rmp_serde's
# `to_vec_named` (internally tagged enum -> one map, "op" first, then the fields in order).
#   stats: L = 12-byte header + 10-byte body (0x81 fixmap, 0xa2 "op", 0xa5 "stats") = 22 = 0x16.
GOLDEN_STATS = b"\x16\x00\x00\x00KL\x01\x01*\x00\x00\x00\x00\x00\x00\x00\x81\xa2op\xa5stats"
#   hello {protocol: 1, client: "t", pid: 7}, request id 7: L = 12 + 34 = 46 = 0x2e.
GOLDEN_HELLO = (
    b"\x2e\x00\x00\x00KL\x01\x01\x07\x00\x00\x00\x00\x00\x00\x00"
    b"\x84\xa2op\xa5hello\xa8protocol\x01\xa6client\xa1t\xa3pid\x07"
)


def test_constants_match_rust() -> None:
    assert PROTOCOL_VERSION == 1
    assert MAGIC == b"KL"
    assert (LEN_BYTES, HEADER_BYTES) == (4, 12)
    assert MAX_FRAME_BYTES == 16 * 1024 * 1024
    assert [int(k) for k in FrameKind] == [1, 2, 3, 4]
    assert ErrorCode.HELLO_REQUIRED == "hello_required"


def test_golden_stats_request() -> None:
    assert encode_frame(FrameKind.REQUEST, 42, {"op": "stats"}) == GOLDEN_STATS
    assert encode_frame(1, 42, {"op": "stats"}) == GOLDEN_STATS
    assert GOLDEN_STATS[0] == len(GOLDEN_STATS) - LEN_BYTES == 0x16


def test_golden_hello_request() -> None:
    body = {"op": "hello", "protocol": 1, "client": "t", "pid": 7}
    assert encode_frame(FrameKind.REQUEST, 7, body) == GOLDEN_HELLO
    frame, used = decode(GOLDEN_HELLO)
    assert used == len(GOLDEN_HELLO)
    assert frame.message() == body


def test_round_trip() -> None:
    body = {"op": "hello", "protocol": 1, "client": "t", "pid": 7, "blob": b"\x00\xff", "f": 1.5}
    data = encode_frame(FrameKind.REPLY, 2**64 - 1, body)
    frame, used = decode(data)
    assert used == len(data)
    assert (frame.kind, frame.request_id) == (FrameKind.REPLY, 2**64 - 1)
    assert frame.message() == body
    assert isinstance(frame.message()["blob"], bytes)


def test_header_layout() -> None:
    data = encode_frame(FrameKind.EVENT, 0x0102030405060708, {})
    assert struct.unpack_from("<I", data)[0] == len(data) - 4
    assert data[4:6] == b"KL"
    assert data[6] == PROTOCOL_VERSION
    assert data[7] == 4
    assert data[8:16] == bytes([8, 7, 6, 5, 4, 3, 2, 1])
    assert data[16:] == b"\x80"


def test_partial_frames_wait_for_more() -> None:
    data = encode_raw(FrameKind.REQUEST, 1, b"\x80")
    for cut in range(len(data)):
        assert decode(data[:cut]) is None, f"cut at {cut}"


def test_decoder_byte_by_byte_and_batched() -> None:
    frames = [encode_frame(FrameKind.REPLY, i, {"op": "stats", "i": i}) for i in range(1, 4)]
    stream = b"".join(frames)
    decoder = FrameDecoder()
    got: list[Frame] = []
    for b in stream:
        got.extend(decoder.feed(bytes([b])))
    assert [f.request_id for f in got] == [1, 2, 3]
    assert decoder.buffered == 0
    # All at once, plus half of a fourth frame that stays buffered.
    extra = encode_frame(FrameKind.EVENT, 9, {"x": 1})
    decoder = FrameDecoder()
    got = list(decoder.feed(stream + extra[:7]))
    assert [f.message()["i"] for f in got] == [1, 2, 3]
    assert decoder.buffered == 7
    (last,) = decoder.feed(extra[7:])
    assert (last.kind, last.request_id, last.message()) == (FrameKind.EVENT, 9, {"x": 1})


def test_oversized_and_short_lengths_are_fatal() -> None:
    big = struct.pack("<I", MAX_FRAME_BYTES + 1) + b"KL"
    with pytest.raises(FrameTooLarge) as e:
        decode(big)
    assert e.value.fatal and e.value.length == MAX_FRAME_BYTES + 1
    # Refused from the prefix alone, before the rest arrives.
    with pytest.raises(FrameTooLarge):
        frame_len(struct.pack("<I", 0xFFFFFFFF))
    with pytest.raises(FrameTooShort) as short:
        decode(struct.pack("<I", 3))
    assert short.value.fatal and short.value.length == 3
    # The largest legal frame is accepted.
    assert frame_len(struct.pack("<I", MAX_FRAME_BYTES) + b"KL") == MAX_FRAME_BYTES


def test_encoder_refuses_oversized_frames() -> None:
    with pytest.raises(FrameTooLarge):
        encode_raw(FrameKind.REQUEST, 1, b"\x00" * (MAX_FRAME_BYTES - HEADER_BYTES + 1))
    assert len(encode_raw(FrameKind.REQUEST, 1, b"\x00" * (MAX_FRAME_BYTES - HEADER_BYTES))) == MAX_FRAME_BYTES + 4
    with pytest.raises(ValueError):
        encode_frame(FrameKind.REQUEST, 2**64, {})
    with pytest.raises(ValueError):
        encode_frame(FrameKind.REQUEST, -1, {})
    with pytest.raises(TypeError):
        encode_frame(FrameKind.REQUEST, 1, [1, 2])  # type: ignore[arg-type]


def test_bad_magic_is_fatal_and_sticks() -> None:
    data = bytearray(encode_raw(FrameKind.REQUEST, 1, b""))
    data[4] = ord("X")
    with pytest.raises(BadMagic) as e:
        decode(data)
    assert e.value.fatal and e.value.found == b"XL"
    decoder = FrameDecoder()
    with pytest.raises(BadMagic):
        list(decoder.feed(bytes(data)))
    assert isinstance(decoder.failed, BadMagic)
    # The stream is out of step: a valid frame after it is not decoded.
    with pytest.raises(BadMagic):
        list(decoder.feed(encode_frame(FrameKind.REPLY, 2, {})))


def test_bad_magic_detected_before_the_frame_is_complete() -> None:
    with pytest.raises(BadMagic):
        decode(struct.pack("<I", 100) + b"HT")


def test_other_version_skips_the_frame() -> None:
    data = bytearray(encode_raw(FrameKind.REQUEST, 9, b"\x80"))
    data[6] = 2
    with pytest.raises(UnsupportedFrameVersion) as e:
        decode(data)
    assert (e.value.found, e.value.request_id, e.value.fatal) == (2, 9, False)
    assert frame_len(data) == 13
    # The decoder drops the skipped frame and goes on with the next one.
    decoder = FrameDecoder()
    decoder.feed(bytes(data) + encode_frame(FrameKind.REPLY, 10, {"op": "stats"}))
    with pytest.raises(UnsupportedFrameVersion):
        decoder.next_frame()
    (frame,) = decoder.frames()
    assert frame.request_id == 10
    assert decoder.failed is None


def test_unknown_kind_skips_the_frame() -> None:
    data = encode_raw(9, 5, b"\x80") + encode_frame(FrameKind.REPLY, 6, {})
    decoder = FrameDecoder()
    with pytest.raises(UnknownFrameKind) as e:
        list(decoder.feed(data))
    assert (e.value.found, e.value.request_id, e.value.fatal) == (9, 5, False)
    assert [f.request_id for f in decoder.frames()] == [6]


def test_version_is_checked_before_kind() -> None:
    data = bytearray(encode_raw(9, 5, b"\x80"))
    data[6] = 7
    with pytest.raises(UnsupportedFrameVersion):
        decode(data)


def test_frame_errors_are_protocol_errors() -> None:
    for cls in (FrameTooLarge, FrameTooShort, BadMagic, UnsupportedFrameVersion, UnknownFrameKind):
        assert issubclass(cls, FrameError) and issubclass(cls, ProtocolError)


def test_bodies_must_be_maps() -> None:
    assert unpack_body(msgpack.packb({"a": 1})) == {"a": 1}
    with pytest.raises(BadBody):
        unpack_body(msgpack.packb([1, 2]))
    with pytest.raises(BadBody):
        unpack_body(b"\xc1")
    with pytest.raises(BadBody):
        unpack_body(b"")
