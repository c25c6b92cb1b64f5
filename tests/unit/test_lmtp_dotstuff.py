"""lmtp.dotstuff: DATA payload encoding and decoding (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmtp.dotstuff import (
    CrlfBytes,
    DotFreeCrlfBytes,
    crlf_only,
    decode_data,
    encode_data,
    normalise_line_endings,
    normalise_message,
)

ENCODE_CASES = [
    (b"", b".\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b"a\r\n", b"a\r\n.\r\n"),
    (b"a\n", b"a\r\n.\r\n"),
    (b"a\r", b"a\r\n.\r\n"),
    (b"a\nb\rc\r\nd", b"a\r\nb\r\nc\r\nd\r\n.\r\n"),
    (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),  # bare CR, then CRLF
    (b"a\n\rb", b"a\r\n\r\nb\r\n.\r\n"),  # LF then CR: two line ends
    (b"\r\n", b"\r\n.\r\n"),
    (b"\n\n", b"\r\n\r\n.\r\n"),
    (b".", b"..\r\n.\r\n"),
    (b".\r\n", b"..\r\n.\r\n"),
    (b"..", b"...\r\n.\r\n"),
    (b"a\r\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),
    (b"a\n.\nMAIL FROM:<evil@x>\n", b"a\r\n..\r\nMAIL FROM:<evil@x>\r\n.\r\n"),
    (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
    (b"a\r.\r", b"a\r\n..\r\n.\r\n"),  # bare-CR smuggling attempt
    (b"x.\r\n", b"x.\r\n.\r\n"),  # a dot not at a line start stays single
    (b"\xff\x00\xe9\r\n", b"\xff\x00\xe9\r\n.\r\n"),  # 8-bit and NUL pass through
]


@pytest.mark.parametrize(("message", "payload"), ENCODE_CASES)
def test_encode_table(message: bytes, payload: bytes) -> None:
    assert encode_data(message) == payload


@pytest.mark.parametrize(("message", "payload"), ENCODE_CASES)
def test_decode_undoes_encode(message: bytes, payload: bytes) -> None:
    assert decode_data(payload) == normalise_message(message)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b".\r\n", b""),
        (b"\r\n.\r\n", b"\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b".x\r\n.\r\n", b"x\r\n"),  # unstuffed dot: RFC 5321 says drop it anyway
        (b"a\r\n..\r\n...\r\n.\r\n", b"a\r\n.\r\n..\r\n"),
    ],
)
def test_decode_table(payload: bytes, message: bytes) -> None:
    assert decode_data(payload) == message


@pytest.mark.parametrize("payload", [b"", b"a", b"a\r\n", b"a\r\n.", b"a\n.\n", b"a.\r\n"])
def test_decode_refuses_a_payload_without_terminator(payload: bytes) -> None:
    with pytest.raises(ValueError):
        decode_data(payload)


@pytest.mark.parametrize(
    ("message", "normal"),
    [
        (b"", b""),
        (b"abc", b"abc"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb", b"a\r\nb"),
        (b"a\rb", b"a\r\nb"),
        (b"\r\r\n\n", b"\r\n\r\n\r\n"),
    ],
)
def test_normalise_line_endings(message: bytes, normal: bytes) -> None:
    assert normalise_line_endings(message) == normal


def test_canonical_input_is_returned_without_copying() -> None:
    message = b"Subject: x\r\n\r\nbody\r\n" * 100
    assert normalise_line_endings(message) is message


def test_fifty_kilobyte_message() -> None:
    line = b"x" * 78 + b"\r\n"
    message = (line + b".starts with a dot\r\n") * 500
    payload = encode_data(message)
    assert payload.endswith(b"\r\n.\r\n")
    assert payload.count(b"\r\n..starts") == 500
    assert decode_data(payload) == message


# -- properties ---------------------------------------------------------------------

# Bytes that matter to line handling, plus a couple of ordinary ones.
messages = st.lists(
    st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\xff", b" "]), max_size=40
).map(b"".join)


def reference_encode(message: bytes) -> bytes:
    """A deliberately naive line-by-line encoder to compare the fast one against."""
    lines: list[bytes] = []
    current = bytearray()
    i = 0
    while i < len(message):
        byte = message[i : i + 1]
        if byte == b"\r" and message[i + 1 : i + 2] == b"\n":
            lines.append(bytes(current))
            current.clear()
            i += 2
            continue
        if byte in (b"\r", b"\n"):
            lines.append(bytes(current))
            current.clear()
        else:
            current += byte
        i += 1
    if current:
        lines.append(bytes(current))
    out = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    return out + b".\r\n"


@given(messages)
def test_decode_of_encode_is_the_normalised_message(message: bytes) -> None:
    assert decode_data(encode_data(message)) == normalise_message(message)


@given(messages)
def test_encode_matches_the_line_by_line_reference(message: bytes) -> None:
    assert encode_data(message) == reference_encode(message)


@given(messages | st.binary(max_size=200))
def test_payload_has_only_crlf_and_one_terminator(message: bytes) -> None:
    payload = encode_data(message)
    assert payload.endswith(b".\r\n")
    if payload != b".\r\n":
        # "\r\n.\r\n" appears exactly once, as the terminator
        assert payload.find(b"\r\n.\r\n") == len(payload) - 5
        assert not payload.startswith(b".\r\n")
    # no bare CR or LF anywhere
    assert payload.count(b"\r") == payload.count(b"\n") == payload.count(b"\r\n")


@given(messages)
def test_normalise_is_idempotent(message: bytes) -> None:
    once = normalise_message(message)
    assert normalise_message(once) == once
    assert encode_data(once) == encode_data(message)


# -- CrlfBytes: line endings vouched for by the caller --------------------------------------

_LINE = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@given(st.lists(_LINE, max_size=20), st.booleans())
def test_vouched_crlf_message_encodes_the_same(lines: list[bytes], terminated: bool) -> None:
    message = b"\r\n".join(lines) + (b"\r\n" if terminated and lines else b"")
    assert encode_data(CrlfBytes(message)) == encode_data(message)
    assert normalise_line_endings(CrlfBytes(message)) == message


def test_vouched_message_is_not_scanned_and_derived_bytes_are() -> None:
    # The marker is a promise: encode_data trusts it (so only code that checked may
    # build one), and anything derived from it is plain bytes, scanned again.
    assert encode_data(CrlfBytes(b"a\nb")) == b"a\nb\r\n.\r\n"
    derived = CrlfBytes(b"a\r\n") + b"b\n"
    assert type(derived) is bytes
    assert encode_data(derived) == b"a\r\nb\r\n.\r\n"


@given(st.lists(_LINE.filter(lambda line: not line.startswith(b".")), max_size=20))
def test_dot_free_message_encodes_the_same(lines: list[bytes]) -> None:
    message = b"".join(line + b"\r\n" for line in lines)
    assert encode_data(DotFreeCrlfBytes(message)) == encode_data(message)


# -- crlf_only ------------------------------------------------------------------------------


def crlf_only_by_hand(data: bytes) -> bool:
    """The definition, one byte at a time: every CR is followed by LF, every LF
    follows a CR."""
    for i, byte in enumerate(data):
        if byte == 13 and data[i + 1:i + 2] != b"\n":
            return False
        if byte == 10 and (i == 0 or data[i - 1] != 13):
            return False
    return True


@pytest.mark.parametrize(("data", "expected"), [
    (b"", True), (b"no line end", True), (b"\r\n", True), (b"a\r\nb\r\n", True),
    (b"\r\n\r\n", True), (b"\r", False), (b"\n", False), (b"a\rb", False),
    (b"a\nb\r\n", False), (b"a\r\n\r", False), (b"\n\r", False), (b"\r\r\n", False),
    (b"\r\n\n", False), (b"x\r\n.\r\n", True), (b"\xff\r\xe9\n", False),
    (b"\x00\r\n\x85\x0b\x0c\x1c", True),  # NEL, VT, FF, FS: line ends to str, not here
    (b"line\r\n" * 10_000 + b"bare\n", False), (b"line\r\n" * 10_000, True),
])
def test_crlf_only_table(data: bytes, expected: bool) -> None:
    assert crlf_only(data) is expected
    assert crlf_only_by_hand(data) is expected


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"x", b".", b"\x85", b"\xff",
                                 b"\x00", b"\x0b", b"\x0c", b"\x1c"]), max_size=40))
def test_crlf_only_agrees_with_the_definition(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert crlf_only(data) == crlf_only_by_hand(data)
    assert crlf_only(CrlfBytes(data)) == crlf_only_by_hand(data)
