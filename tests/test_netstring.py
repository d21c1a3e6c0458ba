"""Netstring codec: exact framing, incremental decoding, and only NetstringError on bad input."""

import pytest
from hypothesis import given, strategies as st

from mailgate.policy.netstring import (
    NetstringDecoder,
    NetstringError,
    NetstringTooLongError,
    encode,
)


@pytest.mark.parametrize(
    ("payload", "wire"),
    [
        (b"", b"0:,"),
        (b"a", b"1:a,"),
        (b"transport a@b", b"13:transport a@b,"),
        (b"with,comma:colon", b"16:with,comma:colon,"),
        (b"\x00\xff", b"2:\x00\xff,"),
    ],
)
def test_encode_and_decode(payload: bytes, wire: bytes) -> None:
    assert encode(payload) == wire
    assert list(NetstringDecoder().feed(wire)) == [payload]


@pytest.mark.parametrize(
    ("chunks", "payloads", "pending"),
    [
        ([b"3:abc,4:defg,"], [b"abc", b"defg"], 0),
        ([b"3:a", b"bc", b",1"], [b"abc"], 1),
        ([b"1", b"0", b":0123456789", b","], [b"0123456789"], 0),
        ([b"0:,0:,"], [b"", b""], 0),
        ([b"5:hel"], [], 5),
        ([b"100000"], [], 6),
    ],
)
def test_incremental(chunks: list[bytes], payloads: list[bytes], pending: int) -> None:
    decoder = NetstringDecoder()
    got = [p for chunk in chunks for p in decoder.feed(chunk)]
    assert got == payloads
    assert decoder.pending == pending


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"a:", "non-digit"),
        (b"1a:x,", "non-digit"),
        (b"-1:", "non-digit"),
        (b" 1:a,", "non-digit"),
        (b"\xd9\xa1:a,", "non-digit"),
        (b"01:a,", "leading zero"),
        (b"00:,", "leading zero"),
        (b":,", "empty"),
        (b"1:ab", "comma"),
        (b"0:x", "comma"),
        (b"3:abc;", "comma"),
        (b"100001:", "longer"),
        (b"1000000", "longer"),
        (b"9999999999999999999999:", "longer"),
    ],
)
def test_malformed(wire: bytes, message: str) -> None:
    decoder = NetstringDecoder()
    with pytest.raises(NetstringError, match=message):
        list(decoder.feed(wire))
    with pytest.raises(NetstringError):
        list(decoder.feed(b"1:a,"))


def test_payloads_before_an_error_are_delivered() -> None:
    out = []
    with pytest.raises(NetstringError):
        for payload in NetstringDecoder().feed(b"1:a,2:bc,x"):
            out.append(payload)
    assert out == [b"a", b"bc"]


def test_configurable_maximum() -> None:
    decoder = NetstringDecoder(max_length=5)
    assert list(decoder.feed(b"5:abcde,")) == [b"abcde"]
    with pytest.raises(NetstringTooLongError):
        list(decoder.feed(b"6:"))
    with pytest.raises(NetstringTooLongError):
        list(NetstringDecoder(max_length=5).feed(b"10"))


def test_error_is_sticky_and_clears_buffer() -> None:
    decoder = NetstringDecoder()
    with pytest.raises(NetstringError):
        list(decoder.feed(b"3:ab"))
        list(decoder.feed(b"cd"))
    assert decoder.pending == 0
    with pytest.raises(NetstringError):
        decoder.feed(b"1:a,")


def test_dribbled_frame_is_not_reparsed_until_complete() -> None:
    decoder = NetstringDecoder()
    wire = encode(b"x" * 5000)
    for byte in wire[:-1]:
        assert list(decoder.feed(bytes([byte]))) == []
    assert decoder.pending == len(wire) - 1
    assert list(decoder.feed(wire[-1:])) == [b"x" * 5000]
    assert decoder.pending == 0


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(st.lists(st.binary(max_size=300), max_size=10), st.lists(st.integers(0, 10_000)))
def test_round_trip_any_chunking(payloads: list[bytes], cuts: list[int]) -> None:
    wire = b"".join(encode(p) for p in payloads)
    decoder = NetstringDecoder()
    got = [p for chunk in _split(wire, cuts) for p in decoder.feed(chunk)]
    assert got == payloads
    assert decoder.pending == 0


@given(
    st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([b":", b",", b"0", b"12", b"5:"]))),
    st.integers(0, 200),
)
def test_garbage_only_raises_netstring_error(chunks: list[bytes], max_length: int) -> None:
    decoder = NetstringDecoder(max_length=max_length)
    try:
        for chunk in chunks:
            for payload in decoder.feed(chunk):
                assert len(payload) <= max_length
    except NetstringError:
        pass
