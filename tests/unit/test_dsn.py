"""DSN builder and DSN policy: the report parsed back with the email stdlib."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime, timedelta, timezone
from email.message import Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.delivery import Outcome
from gateway.dsn import FailedRecipient, build_dsn, should_send_dsn

ARRIVED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
TRIED = datetime(2024, 5, 1, 12, 5, 0, tzinfo=timezone(timedelta(hours=2)))
NOW = datetime(2024, 5, 3, 9, 30, 0, tzinfo=UTC)

ORIGINAL = (
    b"Received: from client.example.org by mx1.example.net\r\n"
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com, carol@example.com\r\n"
    b"Subject: Quarterly numbers,\r\n"
    b"  folded onto a second line\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"\r\n"
    b"SECRET BODY TEXT that must never be returned\r\n"
)


def _build(
    failed: list[FailedRecipient],
    *,
    sender: str = "alice@example.org",
    headers: bytes = ORIGINAL,
    kind: str = "failure",
) -> bytes:
    return build_dsn(
        reporting_mta="mx1.example.net",
        queue_id="4F2A9C",
        original_sender=sender,
        original_headers=headers,
        failed=failed,
        arrival_date=ARRIVED,
        dsn_id="dsn-4F2A9C-1",
        kind=kind,  # type: ignore[arg-type]
        postmaster="postmaster@example.net",
        date=NOW,
    )


def _parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def _parts(msg: Message) -> list[Message]:
    """The sub-parts of a multipart (or the blocks of a message/delivery-status part)."""
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [part for part in payload if isinstance(part, Message)]


def _decoded(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def _recipient_block(raw: bytes, index: int = 0) -> Message:
    """The per-recipient block number ``index`` of the delivery-status part."""
    return _parts(_parts(_parse(raw))[1])[1 + index]


def _two_failures() -> list[FailedRecipient]:
    return [
        FailedRecipient(
            "bob@example.com",
            "Bob@Example.com",
            Outcome(550, "5.1.1", "User unknown", "mx.example.com"),
            TRIED,
        ),
        FailedRecipient(
            "carol@example.com",
            None,
            Outcome(552, "5.2.2", "Mailbox full", "lmtp 10.0.0.5:24"),
            TRIED,
        ),
    ]


def test_structure_is_a_three_part_delivery_report() -> None:
    raw = _build(_two_failures())
    msg = _parse(raw)

    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx1.example.net>"
    assert msg["To"] == "<alice@example.org>"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"] == "<dsn-4F2A9C-1@mx1.example.net>"
    assert msg["Date"] == "Fri, 03 May 2024 09:30:00 +0000"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"

    parts = _parts(msg)
    assert len(parts) == 3
    text, status, headers = parts
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert not msg.defects


def test_crlf_lines_within_limits() -> None:
    raw = _build(_two_failures())
    assert raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_per_message_and_per_recipient_fields() -> None:
    status = _parts(_parse(_build(_two_failures())))[1]
    blocks = _parts(status)
    assert len(blocks) == 3  # per-message block + one per recipient
    per_message, bob, carol = blocks

    assert per_message["Reporting-MTA"] == "dns; mx1.example.net"
    assert per_message["X-Mailedge-Queue-ID"] == "4F2A9C"
    assert per_message["Arrival-Date"] == "Wed, 01 May 2024 12:00:00 +0000"

    assert bob["Final-Recipient"] == "rfc822; bob@example.com"
    assert bob["Original-Recipient"] == "rfc822; Bob@Example.com"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.example.com"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert bob["Last-Attempt-Date"] == "Wed, 01 May 2024 12:05:00 +0200"

    assert carol["Final-Recipient"] == "rfc822; carol@example.com"
    assert carol["Original-Recipient"] is None
    assert carol["Status"] == "5.2.2"
    assert carol["Diagnostic-Code"] == "smtp; 552 5.2.2 Mailbox full"
    # internal storage addresses never appear as Remote-MTA
    assert carol["Remote-MTA"] is None


def test_human_readable_part_names_recipients_and_replies() -> None:
    text = _parts(_parse(_build(_two_failures())))[0]
    body = _decoded(text).decode("ascii")
    assert "<bob@example.com>: host mx.example.com said: 550 5.1.1 User unknown" in body
    assert "<carol@example.com>: 552 5.2.2 Mailbox full" in body
    assert "postmaster@example.net" in body
    assert "4F2A9C" in body


def test_only_original_headers_are_returned_never_the_body() -> None:
    raw = _build(_two_failures())
    assert b"SECRET BODY" not in raw
    returned = _decoded(_parts(_parse(raw))[2])
    assert returned == ORIGINAL.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    parsed = email.message_from_bytes(returned)
    assert parsed["Message-ID"] == "<m1@example.org>"
    assert parsed.get_payload() == ""


@pytest.mark.parametrize(
    "headers",
    [
        ORIGINAL.replace(b"\r\n", b"\n"),  # bare LF line ends
        ORIGINAL + b"\r\nmore body\r\n",
        ORIGINAL.split(b"\r\n\r\n", 1)[0],  # header block without the empty line
    ],
)
def test_body_is_cut_whatever_the_line_ends(headers: bytes) -> None:
    raw = _build(_two_failures(), headers=headers)
    assert b"SECRET BODY" not in raw and b"more body" not in raw
    returned = _decoded(_parts(_parse(raw))[2])
    assert returned.endswith(b"Message-ID: <m1@example.org>\r\n")


def test_eight_bit_original_headers_are_quoted_printable_in_ascii_report() -> None:
    headers = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\nFrom: alice@example.org\r\n\r\nbody"
    raw = _build(_two_failures(), headers=headers)
    assert raw.isascii()
    part = _parts(_parse(raw))[2]
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert _decoded(part) == headers.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def test_delay_report() -> None:
    failed = [
        FailedRecipient("bob@example.com", None,
                        Outcome(451, "4.4.1", "No mail server could be reached"), TRIED)
    ]
    raw = _build(failed, kind="delay")
    assert _parse(raw)["Subject"] == "Delayed Mail (still being retried)"
    block = _recipient_block(raw)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert block["Remote-MTA"] is None  # no host answered


def test_failure_after_temporary_errors_keeps_its_4xx_status() -> None:
    failed = [FailedRecipient("bob@example.com", None, Outcome(451, "4.4.1", "timeout"), TRIED)]
    block = _recipient_block(_build(failed))
    assert block["Action"] == "failed"
    assert block["Status"] == "4.4.1"


def test_utf8_addresses_use_global_types() -> None:
    failed = [
        FailedRecipient("用户@example.com", None,
                        Outcome(550, "5.1.1", "Unbekannter Empfänger", "mx.example.com"), TRIED),
        FailedRecipient("bob@example.com", None,
                        Outcome(550, "5.1.1", "User unknown", "mx.example.com"), TRIED),
    ]
    headers = "From: Jürgen <jürgen@example.org>\r\nSubject: Grüße\r\n".encode()
    raw = _build(failed, sender="jürgen@example.org", headers=headers)
    msg = email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "global-delivery-status"
    text, status, returned = _parts(msg)
    assert text.get_content_charset() == "utf-8"
    assert status.get_content_type() == "message/global-delivery-status"
    assert returned.get_content_type() == "message/global-headers"
    fields = raw.decode("utf-8")
    assert "To: <jürgen@example.org>\r\n" in fields
    assert "Final-Recipient: utf-8; 用户@example.com\r\n" in fields
    assert "Final-Recipient: rfc822; bob@example.com\r\n" in fields
    assert "Diagnostic-Code: smtp; 550 5.1.1 Unbekannter Empfänger\r\n" in fields
    assert "Subject: Grüße\r\n" in fields


def test_non_ascii_reply_text_in_ascii_report_is_replaced() -> None:
    failed = [FailedRecipient("bob@example.com", None,
                              Outcome(550, "5.1.1", "Empfänger\x07 unbekannt\udcff"), TRIED)]
    raw = _build(failed)
    assert raw.isascii()
    block = _recipient_block(raw)
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Empf?nger unbekannt?"


def test_long_diagnostic_is_folded() -> None:
    text = "word " * 400 + "x" * 3000
    failed = [FailedRecipient("bob@example.com", None, Outcome(550, "5.7.1", text), TRIED)]
    raw = _build(failed)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    block = _recipient_block(raw)
    unfolded = " ".join(block["Diagnostic-Code"].split())
    assert unfolded.startswith("smtp; 550 5.7.1 word word")
    assert unfolded.replace(" ", "").endswith("x" * 3000)


def test_boundary_never_occurs_in_content() -> None:
    headers = b"X-Trap: --=dsn-4F2A9C-1/mx1.example.net=\r\n"
    raw = _build(_two_failures(), headers=headers)
    parts = _parts(_parse(raw))
    assert len(parts) == 3
    assert _decoded(parts[2]) == headers


def test_no_recipients_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        _build([])


@settings(max_examples=75, deadline=None)
@given(
    diagnostic=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=3000),
    address=st.from_regex(r"[a-z0-9._+-]{1,64}@[a-z0-9-]{1,20}\.example", fullmatch=True),
)
def test_any_printable_ascii_diagnostic_gives_parseable_dsn(diagnostic: str, address: str) -> None:
    failed = [FailedRecipient(address, None, Outcome(550, "5.0.0", diagnostic, "mx.example.com"),
                              TRIED)]
    raw = _build(failed)
    assert raw.isascii()
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    msg = _parse(raw)
    assert not msg.defects
    parts = _parts(msg)
    assert len(parts) == 3
    block = _parts(parts[1])[1]
    assert block["Final-Recipient"] == f"rfc822; {address}"
    value = block["Diagnostic-Code"]
    assert value is not None
    expected = " ".join(f"550 5.0.0 {diagnostic}".split())
    assert "".join(value.split()) == "smtp;" + expected.replace(" ", "")


# ---------------------------------------------------------------------------- policy


@pytest.mark.parametrize(
    ("sender", "headers", "spam", "expected"),
    [
        ("alice@example.org", ORIGINAL, False, True),
        ("", ORIGINAL, False, False),
        ("MAILER-DAEMON@example.org", ORIGINAL, False, False),
        ("mailer-daemon@example.org", ORIGINAL, False, False),
        ("Mailer_Daemon@example.org", ORIGINAL, False, False),
        ("MAILER-DAEMON", ORIGINAL, False, False),
        ("postmaster@example.org", ORIGINAL, False, True),  # a person: gets its DSN
        ("daemon-fan@example.org", ORIGINAL, False, True),
        ("alice@example.org", b"Auto-Submitted: auto-replied\r\n", False, False),
        ("alice@example.org", b"Auto-Submitted: auto-generated\r\n", False, False),
        ("alice@example.org", b"auto-submitted: Auto-Notified; owner-email=x@y\r\n", False,
         False),
        ("alice@example.org", b"Auto-Submitted: no\r\n", False, True),
        ("alice@example.org", b"Auto-Submitted: No (a human wrote this)\r\n", False, True),
        ("alice@example.org", b"Auto-Submitted:\r\n  auto-replied\r\n", False, False),
        ("alice@example.org", b"Auto-Submitted: (comment) no\r\n", False, True),
        ("alice@example.org", b"Subject: x\r\n\r\nAuto-Submitted: auto-replied\r\n", False,
         True),  # in the body: not a header
        ("alice@example.org",
         b"Content-Type: multipart/report; report-type=delivery-status;\r\n"
         b"\tboundary=\"b1\"\r\n", False, False),
        ("alice@example.org",
         b"Content-Type: Multipart/Report;\r\n boundary=b1; report-type=\"Delivery-Status\"\r\n",
         False, False),
        ("alice@example.org",
         b"Content-Type: multipart/report; report-type=global-delivery-status; boundary=b\r\n",
         False, False),
        ("alice@example.org",
         b"Content-Type: multipart/report; report-type=disposition-notification; boundary=b\r\n",
         False, False),
        ("alice@example.org",
         b"Content-Type: multipart/mixed; boundary=\"report-type=delivery-status\"\r\n",
         False, True),
        ("alice@example.org", ORIGINAL, True, False),
        ("alice@example.org", b"", False, True),
        ("alice@example.org", b"\xff\xfe garbage line\r\nAuto-Submitted: auto-replied\r\n",
         False, False),
    ],
)
def test_should_send_dsn(sender: str, headers: bytes, spam: bool, expected: bool) -> None:
    send, reason = should_send_dsn(sender=sender, original_headers=headers, spam=spam)
    assert send is expected
    assert (reason == "") is expected


def test_should_send_dsn_reasons_are_specific() -> None:
    assert should_send_dsn(sender="", original_headers=b"", spam=False)[1] == "null sender"
    assert "spam" in should_send_dsn(sender="a@b.example", original_headers=b"", spam=True)[1]
    assert "auto-submitted" in should_send_dsn(
        sender="a@b.example", original_headers=b"Auto-Submitted: auto-replied\r\n", spam=False
    )[1]
