"""gateway.inbound._vouched: which queued copies skip the LMTP side's line-ending scan."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.inbound import _vouched, _with_headers
from gateway.smtp_handler import unstuffed
from lmtp import CrlfBytes, DotFreeCrlfBytes, encode_data

CONTENT = CrlfBytes(b"From: a@example.org\r\nSubject: hi\r\n\r\nbody line\r\n.dot line\r\n")
DOT_FREE = DotFreeCrlfBytes(b"From: a@example.org\r\nSubject: hi\r\n\r\nbody line\r\n")
TRACE = b"Received: from x by y; Mon, 23 Nov 2026 12:00:00 +0000\r\n"


def test_our_clean_fields_above_clean_content_are_vouched_for() -> None:
    message = _with_headers(TRACE + CONTENT, len(TRACE), [("X-Spam-Score", "1.5")])
    vouched = _vouched(message, CONTENT)
    assert type(vouched) is CrlfBytes and vouched == message


def test_a_bare_line_ending_in_an_added_field_is_left_to_the_lmtp_side() -> None:
    for value in ("a\nInjected: yes", "a\rb"):
        message = _with_headers(TRACE + CONTENT, len(TRACE), [("X-Note", value)])
        kept = _vouched(message, CONTENT)
        assert type(kept) is bytes
        assert b"\r\n" in encode_data(kept) and b"a\r\n" in encode_data(kept)


def test_dot_free_content_stays_dot_free_below_our_fields() -> None:
    message = _with_headers(TRACE + DOT_FREE, len(TRACE), [("X-Spam-Score", "1.5")])
    assert type(_vouched(message, DOT_FREE)) is DotFreeCrlfBytes
    # A field of ours with a continuation line starting with a dot: only CRLF-clean.
    dotted = _with_headers(TRACE + DOT_FREE, len(TRACE), [("X-Note", "a\r\n.b")])
    assert type(_vouched(dotted, DOT_FREE)) is CrlfBytes


def test_content_the_smtp_side_did_not_type_is_never_vouched_for() -> None:
    plain = bytes(CONTENT)
    assert type(_vouched(TRACE + plain, plain)) is bytes


def test_a_message_that_is_not_fields_above_the_content_is_not_vouched_for() -> None:
    assert type(_vouched(CONTENT + b"tail\r\n", CONTENT)) is bytes
    assert type(_vouched(CONTENT[:-2], CONTENT)) is bytes


_CLEAN = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@given(st.lists(_CLEAN, min_size=1, max_size=5), st.lists(_CLEAN, max_size=5),
       st.lists(st.tuples(st.sampled_from(["X-A", "X-B"]),
                          st.text(alphabet="ab \r\n\t", max_size=8)), max_size=3))
def test_whatever_is_vouched_for_encodes_as_if_scanned(
        header: list[bytes], body: list[bytes], added: list[tuple[str, str]]) -> None:
    content = unstuffed(b"".join(b"H: " + h + b"\r\n" for h in header) + b"\r\n"
                        + b"".join(line + b"\r\n" for line in body))
    message = _with_headers(TRACE + content, len(TRACE), added)
    vouched = _vouched(message, content)
    assert encode_data(vouched) == encode_data(bytes(message))


UNSTUFF_CASES = [
    (b"", b"", DotFreeCrlfBytes),
    (b"a\r\nb\r\n", b"a\r\nb\r\n", DotFreeCrlfBytes),
    (b"..a\r\n", b".a\r\n", CrlfBytes),  # the first line is a dot line after all
    (b"a\r\n..b\r\n", b"a\r\n.b\r\n", CrlfBytes),
    (b"a\r\n...\r\n", b"a\r\n..\r\n", CrlfBytes),
    (b"a.\r\nb.c\r\n", b"a.\r\nb.c\r\n", DotFreeCrlfBytes),  # dots inside lines
]


def test_unstuffed_table() -> None:
    for data, message, kind in UNSTUFF_CASES:
        got = unstuffed(data)
        assert (got, type(got)) == (message, kind), data


@given(st.lists(st.binary(max_size=12).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=12))
def test_unstuffed_then_encoded_gives_the_dot_stuffed_payload_back(lines: list[bytes]) -> None:
    """What the LMTP side sends equals what a client would have sent: stuffed lines."""
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                       for line in lines)
    message = unstuffed(stuffed)
    assert encode_data(message) == stuffed + b".\r\n"
    assert encode_data(message) == encode_data(bytes(message))
