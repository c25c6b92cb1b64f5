"""Header edits on accepted mail (gateway/headers.py): Received, forged A-R removal."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.headers import received_header, remove_forged_auth_results, split_fields
from gateway.session import header_end

WHEN = datetime(2024, 3, 5, 14, 7, 9, tzinfo=UTC)
OURS = "mx1.example.test"


def received(**overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "helo": "client.example.org", "client_ip": "192.0.2.10",
        "rdns": "mail.example.org", "hostname": OURS, "protocol": "ESMTPS",
        "queue_id": "0633A6E2F1C40-1F2A-0001B.mx1", "recipient": "alice@example.test",
        "when": WHEN,
    }
    args.update(overrides)
    return received_header(**args)


def assert_single_field(header: bytes) -> list[bytes]:
    """`header` is exactly one header field: name line, then only tab-continued lines."""
    assert header.endswith(b"\r\n")
    lines = header[:-2].split(b"\r\n")
    for line in lines:
        assert b"\r" not in line and b"\n" not in line, line
    assert lines[0].startswith(b"Received: from ")
    assert all(line.startswith(b"\t") for line in lines[1:]), lines
    # the header section parser agrees: one field
    assert split_fields(header) == [header]
    return lines


# -- Received ---------------------------------------------------------------------------------


def test_received_format() -> None:
    assert received() == (
        b"Received: from client.example.org (mail.example.org [192.0.2.10])\r\n"
        b"\tby mx1.example.test (mailedge) with ESMTPS id 0633A6E2F1C40-1F2A-0001B.mx1\r\n"
        b"\tfor <alice@example.test>;\r\n"
        b"\tTue, 05 Mar 2024 14:07:09 +0000\r\n")


def test_received_date_is_rfc5322_and_last() -> None:
    when = datetime(2024, 12, 31, 23, 59, 1, tzinfo=timezone(timedelta(hours=2)))
    text = received(when=when).decode()
    date = text.rsplit(";", 1)[1].strip()
    assert parsedate_to_datetime(date) == when


def test_received_default_time_is_now() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    text = received(when=None).decode()
    stamp = parsedate_to_datetime(text.rsplit(";", 1)[1].strip())
    assert before <= stamp <= datetime.now(UTC)


def test_received_without_rdns() -> None:
    first = received(rdns=None).split(b"\r\n")[0]
    assert first == b"Received: from client.example.org ([192.0.2.10])"


def test_received_without_helo() -> None:
    first = received(helo=None, rdns=None).split(b"\r\n")[0]
    assert first == b"Received: from unknown ([192.0.2.10])"


def test_received_ipv6_literal() -> None:
    first = received(client_ip="2001:db8::25", rdns=None).split(b"\r\n")[0]
    assert first == b"Received: from client.example.org ([IPv6:2001:db8::25])"
    assert b"[IPv6:::ffff:192.0.2.1]" in received(client_ip="::ffff:192.0.2.1")


def test_received_for_only_with_one_recipient() -> None:
    assert b"for <alice@example.test>" in received()
    many = received(recipient=None)
    assert b"for" not in many.replace(b"Received: from", b"")
    assert many == (
        b"Received: from client.example.org (mail.example.org [192.0.2.10])\r\n"
        b"\tby mx1.example.test (mailedge) with ESMTPS id 0633A6E2F1C40-1F2A-0001B.mx1;\r\n"
        b"\tTue, 05 Mar 2024 14:07:09 +0000\r\n")


HOSTILE = [
    "evil\r\nX-Injected: yes",
    "evil\nX-Injected: yes",
    "evil\rX-Injected: yes",
    "a) (b [6.6.6.6]",
    "x (comment",
    "<script>",
    'quote"d\\',
    "tab\there",
    "nul\x00byte",
    "evil; Mon, 1 Jan 2001 00:00:00 +0000",
    "\r\n\r\nbody",
    "x" * 5000,
    "\u00fcml\u00e4ut.example",
]


def test_hostile_helo_cannot_break_the_header() -> None:
    for helo in HOSTILE:
        for rdns in (None, helo):
            header = received(helo=helo, rdns=rdns, recipient=helo)
            lines = assert_single_field(header)
            # only our own comments and one date separator
            assert header.count(b"(") == 2 and header.count(b")") == 2, header
            assert header.count(b";") == 1, header
            assert header.count(b"<") == 1 and header.count(b">") == 1, header
            assert len(lines) == 4
            assert all(len(line) < 1000 for line in lines)  # RFC 5322 §2.1.1 hard limit


@given(helo=st.one_of(st.none(), st.text()), rdns=st.one_of(st.none(), st.text()),
       recipient=st.one_of(st.none(), st.text()))
@example(helo="a\r\n\tb", rdns="\n", recipient="\r")
def test_received_is_always_one_well_formed_field(helo: str | None, rdns: str | None,
                                                  recipient: str | None) -> None:
    header = received(helo=helo, rdns=rdns, recipient=recipient)
    lines = assert_single_field(header)
    assert len(lines) == (4 if recipient else 3)
    assert header.count(b"(") == 2 and header.count(b";") == 1


# -- removing forged Authentication-Results ---------------------------------------------------


def test_no_auth_results_is_unchanged() -> None:
    header = b"From: a@example.org\r\nSubject: hi\r\n\r\n"
    assert remove_forged_auth_results(header, OURS) == (header, 0)


def test_removes_ours_keeps_others() -> None:
    header = (b"Received: from x by y; Tue, 05 Mar 2024 14:07:09 +0000\r\n"
              b"Authentication-Results: mx1.example.test; spf=pass smtp.mailfrom=a.example\r\n"
              b"Authentication-Results: mx.other.example; dkim=pass header.d=a.example\r\n"
              b"Subject: hello\r\n"
              b"\r\n")
    new, removed = remove_forged_auth_results(header, OURS)
    assert removed == 1
    assert new == (b"Received: from x by y; Tue, 05 Mar 2024 14:07:09 +0000\r\n"
                   b"Authentication-Results: mx.other.example; dkim=pass header.d=a.example\r\n"
                   b"Subject: hello\r\n"
                   b"\r\n")


def test_removal_is_case_insensitive() -> None:
    header = (b"AUTHENTICATION-RESULTS: MX1.Example.TEST; spf=pass\r\n"
              b"authentication-results: mx1.example.test;dkim=pass\r\n"
              b"Subject: x\r\n")
    assert remove_forged_auth_results(header, "Mx1.Example.Test") == (b"Subject: x\r\n", 2)


def test_removes_folded_field_whole() -> None:
    header = (b"Subject: x\r\n"
              b"Authentication-Results:\r\n"
              b"\tmx1.example.test;\r\n"
              b"  spf=pass smtp.mailfrom=a.example;\r\n"
              b"  dkim=pass header.d=a.example\r\n"
              b"To: b@example.test\r\n")
    assert remove_forged_auth_results(header, OURS) == (
        b"Subject: x\r\nTo: b@example.test\r\n", 1)


def test_removes_with_comments_before_authserv_id() -> None:
    forged = [
        b"Authentication-Results: (looks harmless) mx1.example.test; spf=pass\r\n",
        b"Authentication-Results:(c)mx1.example.test(c);spf=pass\r\n",
        b"Authentication-Results: (a\r\n (folded) comment)\r\n mx1.example.test 1; none\r\n",
        b"Authentication-Results: (nested (comment) here) mx1.example.test; spf=pass\r\n",
        b"Authentication-Results: (escaped \\) paren) mx1.example.test; spf=pass\r\n",
        # authserv-id is a `value`: a quoted-string means the same as the token
        b'Authentication-Results: "mx1.example.test"; spf=pass\r\n',
        b"Authentication-Results: mx1.example.test\r\n",  # no results at all
    ]
    for field in forged:
        assert remove_forged_auth_results(b"X: 1\r\n" + field + b"\r\n", OURS) == (
            b"X: 1\r\n\r\n", 1), field


def test_keeps_lookalike_ids() -> None:
    kept = [
        b"Authentication-Results: mx1.example.test.evil.example; spf=pass\r\n",
        b"Authentication-Results: evil-mx1.example.test; spf=pass\r\n",
        b"Authentication-Results: (mx1.example.test) other.example; spf=pass\r\n",
        b"Authentication-Results: other.example; spf=pass (mx1.example.test)\r\n",
        b"X-Authentication-Results: mx1.example.test; spf=pass\r\n",
        b"Authentication-Results-Original: mx1.example.test; spf=pass\r\n",
        b"Subject: Authentication-Results: mx1.example.test; spf=pass\r\n",
    ]
    for field in kept:
        header = b"X: 1\r\n" + field + b"\r\n"
        assert remove_forged_auth_results(header, OURS) == (header, 0), field


def test_removes_several_and_keeps_order() -> None:
    header = (b"A: 1\r\n"
              b"Authentication-Results: mx1.example.test; spf=fail\r\n"
              b"B: 2\r\n"
              b"Authentication-Results: other.example; spf=pass\r\n"
              b"Authentication-Results: mx1.example.test;\r\n\tdkim=pass\r\n"
              b"C: 3\r\n"
              b"Authentication-Results: MX1.EXAMPLE.TEST; dmarc=pass\r\n"
              b"\r\n")
    assert remove_forged_auth_results(header, OURS) == (
        b"A: 1\r\nB: 2\r\nAuthentication-Results: other.example; spf=pass\r\nC: 3\r\n\r\n", 3)


def test_body_untouched() -> None:
    body = (b"Authentication-Results: mx1.example.test; spf=pass\r\n"
            b"\r\n"
            b"  indented line \xff\xfe 8-bit\r\n"
            b"Authentication-Results: mx1.example.test; dkim=pass\r\n" + b"x" * 2000 + b"\r\n")
    header = (b"Subject: hi\r\n"
              b"Authentication-Results: mx1.example.test; spf=pass\r\n"
              b"\r\n")
    message = header + body
    end = header_end(message)
    new_header, removed = remove_forged_auth_results(message[:end], OURS)
    assert removed == 1
    assert new_header == b"Subject: hi\r\n\r\n"  # the blank line stays
    assert (new_header + message[end:]).endswith(body)


def test_split_fields_keeps_folding_and_blank_line() -> None:
    header = b"A: 1\r\n\tmore\r\nB: 2\r\n\r\n"
    assert split_fields(header) == [b"A: 1\r\n\tmore\r\n", b"B: 2\r\n", b"\r\n"]
    assert split_fields(b"") == []


# -- properties -------------------------------------------------------------------------------

NAMES = st.sampled_from([
    b"Authentication-Results", b"authentication-results", b"AUTHENTICATION-RESULTS",
    b"Authentication-Results ", b"Received", b"Subject", b"X-Spam", b"ARC-Authentication-Results",
    b"", b" ", b"\t",
])
IDS = st.sampled_from([OURS.encode(), OURS.upper().encode(), b'"mx1.example.test"',
                       b"other.example", b"", b"mx1.example.test.evil"])
VALUE_BITS = st.sampled_from([b"(", b")", b"\\", b"\"", b";", b" ", b"\t", b"\r\n", b"\r\n\t",
                              b"\n", b"\r", b"\r\n ", b"spf=pass", b"(comment)", b"\xff", b":"])
VALUES = st.lists(st.one_of(VALUE_BITS, st.binary(max_size=8)), max_size=12).map(b"".join)
FIELDS = st.builds(lambda name, value, ident, tail: name + b":" + value + ident + tail,
                   NAMES, VALUES, IDS, VALUES)
HEADERS = st.one_of(
    st.binary(max_size=400),
    st.lists(st.one_of(FIELDS, VALUE_BITS), max_size=12).map(b"".join),
    st.lists(FIELDS.map(lambda f: f + b"\r\n"), max_size=8).map(lambda fs: b"".join(fs)
                                                                + b"\r\n"),
)


def is_subsequence(small: list[bytes], big: list[bytes]) -> bool:
    it = iter(big)
    return all(any(item == candidate for candidate in it) for item in small)


@settings(max_examples=150, deadline=None)
@given(header=HEADERS)
@example(header=b"Authentication-Results: mx1.example.test;\r\n x\r\n\r\n y\r\n")
@example(header=b" lead\r\nAuthentication-Results: mx1.example.test\r\n\tz\r\n")
@example(header=b"Authentication-Results: mx1.example.test\rAuthentication-Results: x\n")
def test_remove_never_raises_never_grows_keeps_fields_in_order(header: bytes) -> None:
    new, removed = remove_forged_auth_results(header, OURS)
    assert len(new) <= len(header)
    before = split_fields(header)
    after = split_fields(new)
    assert is_subsequence(after, before)
    assert len(before) - len(after) == removed
    assert removed == 0 or len(new) < len(header)
    # idempotent: what is left claims nothing in our name
    assert remove_forged_auth_results(new, OURS) == (new, 0)


COMMENT = st.recursive(
    st.lists(st.sampled_from(["a", " ", "mx1.example.test", ";", "\\)", "\\(", "\r\n "]),
             max_size=4).map(lambda parts: "(" + "".join(parts) + ")"),
    lambda inner: st.lists(st.one_of(inner, st.sampled_from(["x", " ", "\\\\"])),
                           max_size=3).map(lambda parts: "(" + "".join(parts) + ")"),
    max_leaves=6,
)
CFWS = st.lists(st.one_of(COMMENT, st.sampled_from([" ", "\t", "\r\n ", "\r\n\t"])),
                max_size=4).map("".join)


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(["Authentication-Results", "authentication-results",
                             "AUTHENTICATION-results"]),
       before=CFWS, after=CFWS,
       ident=st.sampled_from([OURS, OURS.upper(), "Mx1.Example.Test"]),
       rest=st.sampled_from(["; spf=pass", ";none", " 1; dkim=fail", ""]))
def test_forgery_in_our_name_is_always_removed(name: str, before: str, after: str,
                                               ident: str, rest: str) -> None:
    field = f"{name}:{before}{ident}{after}{rest}\r\n".encode()
    header = b"Subject: s\r\n" + field + b"To: t@example.test\r\n\r\n"
    assert remove_forged_auth_results(header, OURS) == (
        b"Subject: s\r\nTo: t@example.test\r\n\r\n", 1), field


def test_nested_comments_cost_linear_time() -> None:
    # A hostile "((((...))))" field must not make the removal quadratic.
    depth = 50_000
    field = b"Authentication-Results: " + b"(" * depth + b")" * depth + b" mx1.example.test;\r\n"
    started = time.perf_counter()
    assert remove_forged_auth_results(field, OURS) == (b"", 1)
    assert time.perf_counter() - started < 1.0


def test_received_clean_keeps_address_literal_helo() -> None:
    first = received(helo="[192.0.2.10]", rdns=None).split(b"\r\n")[0]
    assert first == b"Received: from [192.0.2.10] ([192.0.2.10])"
    assert re.fullmatch(rb"Received: from \[IPv6:2001:db8::1\] \(\[IPv6:2001:db8::1\]\)",
                        received(helo="[IPv6:2001:db8::1]", rdns=None,
                                 client_ip="2001:db8::1").split(b"\r\n")[0])
