"""lmtp.replies: the Reply value and the incremental reply parser (pure, no sockets)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmtp.errors import LmtpProtocolError, RemoteProtocolError
from lmtp.replies import MAX_REPLY_LINE, Reply, ReplyParser


def parse_all(data: bytes) -> list[Reply]:
    parser = ReplyParser()
    replies = parser.feed(data)
    assert not parser.pending
    return replies


# -- table: one wire reply -> one Reply ---------------------------------------------

CASES: list[tuple[bytes, Reply]] = [
    (b"250 2.1.5 Ok\r\n", Reply(250, "2.1.5", ("Ok",))),
    (b"250 Ok\r\n", Reply(250, None, ("Ok",))),
    (b"250\r\n", Reply(250, None, ("",))),
    (b"250 \r\n", Reply(250, None, ("",))),
    (
        b"354 End data with <CR><LF>.<CR><LF>\r\n",
        Reply(354, None, ("End data with <CR><LF>.<CR><LF>",)),
    ),
    (b"550 5.1.1 <x@y>: User unknown\r\n", Reply(550, "5.1.1", ("<x@y>: User unknown",))),
    (b"452 4.2.2 Mailbox full\r\n", Reply(452, "4.2.2", ("Mailbox full",))),
    (b"421 4.3.2 Shutting down\r\n", Reply(421, "4.3.2", ("Shutting down",))),
    (b"250 2.0.0\r\n", Reply(250, "2.0.0", ("",))),
    (b"554 5.7.1 x\n", Reply(554, "5.7.1", ("x",))),  # bare LF is tolerated
    (b"250 2.123.456 big numbers\r\n", Reply(250, "2.123.456", ("big numbers",))),
    # enhanced code of another class than the reply: not an enhanced code, just text
    (b"250 5.1.1 odd\r\n", Reply(250, None, ("5.1.1 odd",))),
    # 3yz has no enhanced codes (RFC 3463 classes are 2, 4, 5)
    (b"354 3.0.0 go\r\n", Reply(354, None, ("3.0.0 go",))),
    # not followed by a space: part of the text
    (b"250 2.1.5.6 x\r\n", Reply(250, None, ("2.1.5.6 x",))),
    (b"250 2.1.5x\r\n", Reply(250, None, ("2.1.5x",))),
    (b"250 2.01.5 leading zero\r\n", Reply(250, None, ("2.01.5 leading zero",))),
    (b"250 2.1.1000 too long\r\n", Reply(250, None, ("2.1.1000 too long",))),
    (
        b"250-mx.example\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n",
        Reply(250, None, ("mx.example", "PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME")),
    ),
    (
        b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n",
        Reply(550, "5.7.1", ("first", "second", "third")),
    ),
    # continuation lines without the enhanced code keep their text
    (b"451-4.3.0 a\r\n451 b\r\n", Reply(451, "4.3.0", ("a", "b"))),
    (b"250-\r\n250 x\r\n", Reply(250, None, ("", "x"))),
    ("250 2.0.0 Grüße\r\n".encode(), Reply(250, "2.0.0", ("Grüße",))),
    (b"250 2.0.0 bad \xff utf8\r\n", Reply(250, "2.0.0", ("bad \ufffd utf8",))),
]


@pytest.mark.parametrize(("wire", "expected"), CASES)
def test_parse_table(wire: bytes, expected: Reply) -> None:
    assert parse_all(wire) == [expected]


@pytest.mark.parametrize(("wire", "expected"), CASES)
def test_byte_by_byte_gives_the_same_reply(wire: bytes, expected: Reply) -> None:
    parser = ReplyParser()
    out: list[Reply] = []
    for i in range(len(wire)):
        out += parser.feed(wire[i : i + 1])
        if i < len(wire) - 1:
            assert out == [] and parser.pending
    assert out == [expected]
    assert not parser.pending


def test_pipelined_replies_in_one_read_come_out_in_order() -> None:
    wire = (
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no\r\n"
        b"354 go\r\n250-2.0.0 multi\r\n250 2.0.0 line\r\n"
    )
    replies = parse_all(wire)
    assert [r.code for r in replies] == [250, 250, 550, 354, 250]
    assert replies[-1].lines == ("multi", "line")


def test_partial_line_stays_buffered_until_completed() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250 2.1.0 Ok\r\n250-first\r\n250 sec") == [Reply(250, "2.1.0", ("Ok",))]
    assert parser.pending
    assert parser.feed(b"ond\r") == []
    assert parser.feed(b"\n") == [Reply(250, None, ("first", "second"))]
    assert not parser.pending


def test_unfinished_multiline_reply_is_pending() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250-a\r\n") == []
    assert parser.pending


def test_recurring_lines_give_equal_replies_also_past_the_cache_size() -> None:
    parser = ReplyParser()
    wire = b"".join(b"250 2.0.0 <u%d> Saved\r\n" % i for i in range(1000))
    first = parser.feed(wire)
    again = parser.feed(wire)
    assert first == again
    assert [r.text for r in first] == [f"<u{i}> Saved" for i in range(1000)]
    assert parser.feed(b"250 2.1.0 Ok\r\n") == parser.feed(b"250 2.1.0 Ok\r\n")


def test_cached_line_inside_a_multiline_reply_is_a_continuation() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250 x\r\n") == [Reply(250, None, ("x",))]  # now cached
    # the same bytes as the last line of a multi-line reply must not come out alone
    assert parser.feed(b"250-a\r\n250 x\r\n") == [Reply(250, None, ("a", "x"))]


# -- malformed input ----------------------------------------------------------------

BAD = [
    b"\r\n",
    b"25\r\n",
    b"abc def\r\n",
    b"25O Ok\r\n",
    b"250x Ok\r\n",
    b"250_Ok\r\n",
    b"150 preliminary\r\n",
    b"650 no such class\r\n",
    b"260 second digit out of range\r\n",
    b"-250 Ok\r\n",
    b" 250 Ok\r\n",
    b"250-a\r\n251 b\r\n",  # code changes inside a multi-line reply
    b"250-a\r\n550-b\r\n550 c\r\n",
    b"\xff\xfe\r\n",
]


@pytest.mark.parametrize("wire", BAD)
def test_malformed_lines_raise_remote_protocol_error(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        ReplyParser().feed(wire)


def test_protocol_error_is_an_lmtp_protocol_error_and_sticky() -> None:
    parser = ReplyParser()
    with pytest.raises(LmtpProtocolError):
        parser.feed(b"bogus\r\n")
    with pytest.raises(RemoteProtocolError):
        parser.feed(b"250 Ok\r\n")  # the stream cannot be resynchronised


def test_replies_before_a_bad_line_are_lost_with_the_error() -> None:
    # A malformed line poisons the whole read; the connection is closed anyway.
    with pytest.raises(RemoteProtocolError):
        ReplyParser().feed(b"250 Ok\r\nbogus\r\n")


def test_overlong_line_is_refused_even_without_a_line_end() -> None:
    parser = ReplyParser()
    with pytest.raises(RemoteProtocolError, match="too long"):
        parser.feed(b"250 " + b"x" * MAX_REPLY_LINE)
    with pytest.raises(RemoteProtocolError, match="too long"):
        ReplyParser().feed(b"250 " + b"x" * MAX_REPLY_LINE + b"\r\n")


def test_line_at_the_limit_is_accepted() -> None:
    line = b"250 " + b"x" * (MAX_REPLY_LINE - 4)
    assert parse_all(line + b"\r\n")[0].text == "x" * (MAX_REPLY_LINE - 4)


def test_too_many_lines_is_refused() -> None:
    parser = ReplyParser(max_lines=3)
    with pytest.raises(RemoteProtocolError, match="too many lines"):
        parser.feed(b"250-a\r\n250-b\r\n250-c\r\n250-d\r\n")


# -- the Reply value ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "positive", "intermediate", "transient", "permanent"),
    [
        (220, True, False, False, False),
        (250, True, False, False, False),
        (354, False, True, False, False),
        (421, False, False, True, False),
        (452, False, False, True, False),
        (550, False, False, False, True),
        (554, False, False, False, True),
    ],
)
def test_reply_classes(
    code: int, positive: bool, intermediate: bool, transient: bool, permanent: bool
) -> None:
    reply = Reply(code)
    assert reply.is_positive is positive
    assert reply.is_intermediate is intermediate
    assert reply.is_transient is transient
    assert reply.is_permanent is permanent


@pytest.mark.parametrize(
    ("reply", "text", "string"),
    [
        (Reply(250, "2.1.5", ("Ok",)), "Ok", "250 2.1.5 Ok"),
        (Reply(250, None, ("Ok",)), "Ok", "250 Ok"),
        (Reply(250), "", "250"),
        (Reply(250, "2.0.0", ("",)), "", "250 2.0.0"),
        (Reply(550, "5.7.1", ("first", "", "second")), "first second", "550 5.7.1 first second"),
    ],
)
def test_reply_text_and_str(reply: Reply, text: str, string: str) -> None:
    assert reply.text == text
    assert str(reply) == string


def test_reply_is_frozen_and_hashable() -> None:
    reply = Reply(250, "2.0.0", ("Ok",))
    with pytest.raises(AttributeError):
        reply.code = 550  # type: ignore[misc]
    assert {reply, Reply(250, "2.0.0", ("Ok",))} == {reply}


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (Reply(250, "2.1.5", ("Ok",)), b"250 2.1.5 Ok\r\n"),
        (Reply(250), b"250\r\n"),
        (Reply(250, "2.0.0", ("",)), b"250 2.0.0\r\n"),
        (Reply(250, None, ("a", "b")), b"250-a\r\n250 b\r\n"),
        (Reply(550, "5.7.1", ("a", "")), b"550-5.7.1 a\r\n550 5.7.1\r\n"),
        (Reply(250, None, ()), b"250\r\n"),
    ],
)
def test_to_bytes(reply: Reply, wire: bytes) -> None:
    assert reply.to_bytes() == wire


# -- properties ---------------------------------------------------------------------

_LOOKS_ENHANCED = re.compile(r"[245]\.\d")

line_text = st.text(alphabet=st.characters(exclude_categories=("Cs", "Cc")), max_size=40).filter(
    lambda t: not _LOOKS_ENHANCED.match(t)
)


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    code = draw(st.integers(200, 559).filter(lambda c: c % 100 < 60))
    enhanced = None
    if code // 100 != 3 and draw(st.booleans()):
        subject = draw(st.integers(0, 999))
        detail = draw(st.integers(0, 999))
        enhanced = f"{code // 100}.{subject}.{detail}"
    lines = tuple(draw(st.lists(line_text, min_size=1, max_size=5)))
    return Reply(code, enhanced, lines)


@given(st.lists(replies(), min_size=1, max_size=6), st.data())
def test_any_chunking_of_pipelined_replies_round_trips(
    expected: list[Reply], data: st.DataObject
) -> None:
    wire = b"".join(r.to_bytes() for r in expected)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    parser = ReplyParser()
    got: list[Reply] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        got += parser.feed(wire[start:cut])
        start = cut
    assert got == expected
    assert not parser.pending


@given(st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_remote_protocol_error(data: bytes) -> None:
    parser = ReplyParser()
    try:
        for reply in parser.feed(data):
            assert 200 <= reply.code <= 559
    except RemoteProtocolError:
        pass


@given(
    st.lists(
        st.sampled_from([b"250", b"-", b" ", b"2.1.5", b"\r\n", b"\n", b"Ok", b"550", b"x", b"\r"]),
        max_size=30,
    )
)
def test_reply_shaped_noise_parses_or_raises_remote_protocol_error(parts: list[bytes]) -> None:
    parser = ReplyParser()
    try:
        for part in parts:
            parser.feed(part)
    except RemoteProtocolError:
        pass
