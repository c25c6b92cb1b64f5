"""Delivery status notifications: the policy that decides whether to send one, and the builder.

After the gateway has answered 250 it owns the message, so a recipient that fails for good
(or stays undeliverable for too long) is reported to the envelope sender with a DSN
(RFC 3464 inside a multipart/report, RFC 6522). Both functions here are pure: no I/O, no
clock unless the caller leaves ``date`` unset, no global state. The queue decides *when*;
this module decides *whether* (:func:`should_send_dsn`) and *what* (:func:`build_dsn`).

Shape of the message :func:`build_dsn` returns (CRLF lines, every line <= 998 octets)::

    From: Mail Delivery System <MAILER-DAEMON@reporting-mta>
    To: <original sender>
    Subject: Undelivered Mail Returned to Sender      (or "Delayed Mail (still being retried)")
    Auto-Submitted: auto-replied                      (RFC 3834: never answer this one)
    Content-Type: multipart/report; report-type=delivery-status; boundary=...
      1. text/plain            who failed and what the storage or the remote host replied
      2. message/delivery-status   per-message and per-recipient fields (RFC 3464)
      3. text/rfc822-headers   the original header block only; the body is never returned

Internationalised mail (RFC 6533). When the original envelope sender or any reported
recipient address contains non-ASCII characters, the report cannot be expressed in the
ASCII-only media types, so the builder switches the whole report to the "global" form:
``report-type=global-delivery-status``, part 2 becomes ``message/global-delivery-status``
with ``Final-Recipient: utf-8; <address>`` (and ``Original-Recipient: utf-8; ...``) for the
non-ASCII addresses (ASCII ones keep the ``rfc822`` type), part 3 becomes
``message/global-headers``, and the text part is ``charset=utf-8``. Such a DSN is 8-bit and,
because its recipient (the original sender) is non-ASCII, needs an SMTPUTF8 transport; the
caller can tell from the returned bytes (``not dsn.isascii()``) and the sender address.
The report-type parameter names the second part's subtype, as RFC 6522 requires.

In the ASCII form everything is 7-bit: non-ASCII characters in replies become ``?`` and an
original header block with 8-bit bytes or over-long lines is returned quoted-printable, so
the DSN can travel to any host without 8BITMIME.

The Remote-MTA field is written only when an outcome's ``remote`` is a bare DNS host name
(what the outbound SMTP agent records for the MX that answered). Agents that deliver
internally describe themselves otherwise ("maildir", "lmtp 10.0.0.5:24", "smarthost ..."),
so internal topology never leaks into a report sent to the outside world.
"""

from __future__ import annotations

import binascii
import email.message
import email.utils
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from gateway.delivery import Outcome

__all__ = ["FailedRecipient", "build_dsn", "should_send_dsn"]

DsnKind = Literal["failure", "delay"]

_CRLF = "\r\n"
_SOFT_LIMIT = 78  # RFC 5322 2.1.1: SHOULD
_HARD_LIMIT = 998  # RFC 5322 2.1.1: MUST (octets, without CRLF)
_CHUNK = 900  # longest unbreakable piece put on one folded line, in octets

# Bounce addresses of mail systems. Not postmaster: that is a person who should hear
# that their mail failed (RFC 5321 4.5.1).
_LOOP_LOCAL_PARTS = frozenset({"mailer-daemon", "mailer_daemon", "mailerdaemon"})
_REPORT_TYPES = frozenset(
    {"delivery-status", "global-delivery-status", "disposition-notification",
     "global-disposition-notification"}
)
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?\Z"
)
_BOUNDARY_UNSAFE_RE = re.compile(r"[^A-Za-z0-9'()+_,\-./:=?]")


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient to report: the address tried, the one the sender used, and why."""

    address: str  # the address delivery was attempted to (Final-Recipient)
    original_address: str | None  # the address as the sender gave it, when it differs
    outcome: Outcome  # the last attempt's result (the reply goes into Diagnostic-Code)
    last_attempt: datetime


# --------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------


def should_send_dsn(*, sender: str, original_headers: bytes, spam: bool) -> tuple[bool, str]:
    """Decide whether a failed message may be reported to its envelope sender.

    Returns ``(True, "")`` or ``(False, reason)``; the reason is for logs. A DSN is
    suppressed for the null sender (RFC 5321 4.5.5), for senders that look like another
    mail system's bounce address (mailer-daemon: a bounce loop in the making),
    for messages that are themselves delivery or disposition reports, for messages marked
    ``Auto-Submitted`` with any value other than ``no`` (RFC 3834), and for spam (a bounce
    to a forged sender is backscatter).
    """
    if sender == "":
        return False, "null sender"
    local = sender.rpartition("@")[0] if "@" in sender else sender
    local = local.strip().strip('"').split("+", 1)[0].lower()
    if local in _LOOP_LOCAL_PARTS:
        return False, "sender is a mail system address (bounce loop)"
    if spam:
        return False, "message was classified as spam"
    for name, value in _iter_header_fields(original_headers):
        if name == "auto-submitted":
            keyword = _strip_comments(value).split(";", 1)[0].strip().lower()
            if keyword != "no":
                return False, f"message is auto-submitted ({keyword or 'empty'})"
        elif name == "content-type":
            msg = email.message.Message()
            msg["Content-Type"] = value
            if msg.get_content_type() == "multipart/report":
                report_type = msg.get_param("report-type")
                if isinstance(report_type, str) and report_type.lower() in _REPORT_TYPES:
                    return False, f"message is itself a report ({report_type.lower()})"
    return True, ""


def _iter_header_fields(raw: bytes) -> Iterable[tuple[str, str]]:
    """(lowercase name, unfolded value) for each field of a raw header block.

    Tolerant: any line ending, stops at the first empty line, skips lines that are not
    fields, decodes 8-bit bytes as UTF-8 with replacement.
    """
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    name: str | None = None
    parts: list[str] = []
    for line in text.split("\n"):
        if line == "":
            break
        if line[0] in " \t":
            if name is not None:
                parts.append(line.strip())
            continue
        if name is not None:
            yield name, " ".join(p for p in parts if p)
        field, sep, value = line.partition(":")
        field = field.rstrip(" \t")  # RFC 5322 obsolete syntax allows "Name :"
        if sep and field and not any(ch in field for ch in " \t"):
            name, parts = field.lower(), [value.strip()]
        else:
            name, parts = None, []
    if name is not None:
        yield name, " ".join(p for p in parts if p)


def _strip_comments(value: str) -> str:
    """Remove RFC 5322 parenthesised comments (nesting allowed) from a structured value."""
    out: list[str] = []
    depth = 0
    escaped = False
    for ch in value:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(ch)
            continue
        if ch == "\\":
            escaped = True
            if depth == 0:
                out.append(ch)
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth > 0:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


# --------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------


def build_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    original_sender: str,
    original_headers: bytes,
    failed: Sequence[FailedRecipient],
    arrival_date: datetime,
    dsn_id: str,
    kind: DsnKind = "failure",
    postmaster: str,
    date: datetime | None = None,
) -> bytes:
    """Build a complete DSN message (RFC 5322, CRLF lines) to ``original_sender``.

    ``dsn_id`` makes the Message-ID (``<dsn_id@reporting_mta>``) and the MIME boundary;
    ``date`` is the Date header (now, in UTC, when omitted). ``original_headers`` may be
    the raw header block or anything that starts with it: everything from the first
    empty line on is dropped, so a message body can never end up in the report.
    Raises ValueError for programming errors (no recipients, line breaks in identifiers).
    """
    if not failed:
        raise ValueError("a DSN needs at least one recipient")
    if kind not in ("failure", "delay"):
        raise ValueError(f"unknown DSN kind {kind!r}")
    for label, value in (("reporting_mta", reporting_mta), ("queue_id", queue_id),
                         ("dsn_id", dsn_id), ("postmaster", postmaster)):
        if not value or any(ch in value for ch in "\r\n\0"):
            raise ValueError(f"{label} must be a non-empty single line")

    utf8 = not original_sender.isascii() or any(
        not r.address.isascii() or not (r.original_address or "").isascii() for r in failed
    )
    when = _aware(date) if date is not None else datetime.now(UTC)
    headers_block = _original_header_block(original_headers)

    text_part = _text_part(
        reporting_mta=reporting_mta, queue_id=queue_id, failed=failed, kind=kind,
        postmaster=postmaster, utf8=utf8,
    )
    status_part = _status_part(
        reporting_mta=reporting_mta, queue_id=queue_id, failed=failed,
        arrival_date=arrival_date, kind=kind, utf8=utf8,
    )
    headers_part = _headers_part(headers_block, utf8=utf8)
    parts = [text_part, status_part, headers_part]

    boundary = _boundary(dsn_id, reporting_mta, parts)
    report_type = "global-delivery-status" if utf8 else "delivery-status"
    subject = (
        "Undelivered Mail Returned to Sender"
        if kind == "failure"
        else "Delayed Mail (still being retried)"
    )
    sender_text = _clean(original_sender, utf8=utf8)
    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{_clean(reporting_mta, utf8=False)}>",
        *_fold("To", f"<{sender_text}>", soft_limit=_HARD_LIMIT),
        f"Subject: {subject}",
        f"Date: {email.utils.format_datetime(when)}",
        *_fold("Message-ID", f"<{_clean(dsn_id, utf8=False)}@{_clean(reporting_mta, utf8=False)}>"),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type={report_type};",
        f' boundary="{boundary}"',
    ]
    out = bytearray(_encode_lines(top, utf8=utf8))
    out += _CRLF.encode()
    out += b"This is a MIME-encapsulated message." + _CRLF.encode() + _CRLF.encode()
    for part in parts:
        out += f"--{boundary}{_CRLF}".encode()
        out += part
        out += _CRLF.encode()
    out += f"--{boundary}--{_CRLF}".encode()
    return bytes(out)


def _aware(when: datetime) -> datetime:
    """Naive datetimes are taken to be UTC."""
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _rfc_date(when: datetime) -> str:
    return email.utils.format_datetime(_aware(when))


def _clean(text: str, *, utf8: bool) -> str:
    """One line of printable text: controls become spaces, runs of spaces collapse.

    Non-ASCII characters stay in the UTF-8 form and become ``?`` in the ASCII form;
    lone surrogates (undecodable bytes of a peer's reply) always become ``?``.
    """
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if 32 <= code < 127:
            out.append(ch)
        elif code < 32 or code == 127:
            out.append(" ")
        elif utf8 and ch.isprintable() and not 0xD800 <= code <= 0xDFFF:
            out.append(ch)
        elif ch.isspace():
            out.append(" ")
        else:
            out.append("?")
    return " ".join("".join(out).split())


def _address_field(name: str, address: str) -> str:
    """'Name: rfc822; addr', or the RFC 6533 'utf-8' type for a non-ASCII address."""
    addr_type = "rfc822" if address.isascii() else "utf-8"
    return f"{name}: {addr_type}; {_clean(address, utf8=True)}"


def _fold(name: str, value: str, *, soft_limit: int = _SOFT_LIMIT) -> list[str]:
    """A header field as physical lines: folded at spaces near 78 octets, never over 998.

    Fields that hold one address pass ``soft_limit=_HARD_LIMIT`` so that an address is
    never separated from its type ("rfc822;") unless the line limit forces it.

    A run of text without spaces longer than the hard limit is split into pieces on
    continuation lines (which reads back with a space at each split: acceptable for
    diagnostic text, and the only way to stay within RFC 5322's line limit).
    """
    lines: list[str] = []
    current = f"{name}:"
    for word in value.split():
        for piece in _split_long(word):
            if _octets(current) + 1 + _octets(piece) <= soft_limit or current == f"{name}:":
                current = f"{current} {piece}"
            else:
                lines.append(current)
                current = f" {piece}"
    lines.append(current)
    return lines


def _split_long(word: str) -> list[str]:
    if _octets(word) <= _CHUNK:
        return [word]
    pieces: list[str] = []
    current = ""
    for ch in word:
        if _octets(current + ch) > _CHUNK:
            pieces.append(current)
            current = ""
        current += ch
    if current:
        pieces.append(current)
    return pieces


def _octets(text: str) -> int:
    return len(text.encode("utf-8", errors="replace"))


def _encode_lines(lines: Iterable[str], *, utf8: bool) -> bytes:
    charset = "utf-8" if utf8 else "ascii"
    return b"".join(line.encode(charset, errors="replace") + b"\r\n" for line in lines)


def _diagnostic(outcome: Outcome, *, utf8: bool) -> str:
    return _clean(outcome.diagnostic(), utf8=utf8)


def _reply(outcome: Outcome, *, utf8: bool) -> str:
    return _clean(f"{outcome.code} {outcome.status} {outcome.text}", utf8=utf8)


def _remote_mta(remote: str) -> str | None:
    """The remote as a DNS name for Remote-MTA, or None when it is not a bare host name."""
    name = remote.strip()
    if not _HOSTNAME_RE.match(name) or name.replace(".", "").isdigit():
        return None
    return name.rstrip(".").lower()


def _text_part(
    *,
    reporting_mta: str,
    queue_id: str,
    failed: Sequence[FailedRecipient],
    kind: DsnKind,
    postmaster: str,
    utf8: bool,
) -> bytes:
    host = _clean(reporting_mta, utf8=False)
    if kind == "failure":
        intro = (
            "Your message could not be delivered to one or more of its recipients. "
            "The delivery attempts failed permanently, or kept failing for too long, "
            "and the mail system has given up on them. The recipients and the replies "
            "that were received are listed below."
        )
    else:
        intro = (
            "Your message has not yet been delivered to one or more of its recipients. "
            "The mail system will keep trying and will tell you if it has to give up; "
            "you do not need to send the message again. The recipients and the most "
            "recent replies are listed below."
        )
    help_text = (
        f"If you need help, contact <{_clean(postmaster, utf8=utf8)}> and include this "
        f"report. Queue ID: {_clean(queue_id, utf8=False)}."
    )
    lines = [f"This is the mail delivery system at {host}.", ""]
    lines += textwrap.wrap(intro, width=72)
    lines.append("")
    lines += textwrap.wrap(help_text, width=72, break_long_words=True)
    lines.append("")
    for rcpt in failed:
        line = f"<{_clean(rcpt.address, utf8=utf8)}>: "
        remote = _remote_mta(rcpt.outcome.remote)
        if remote is not None:
            line += f"host {remote} said: "
        line += _reply(rcpt.outcome, utf8=utf8)
        lines += textwrap.wrap(
            line, width=76, subsequent_indent="    ", break_long_words=True,
            break_on_hyphens=False,
        ) or [line]
        lines.append("")
    charset = "utf-8" if utf8 else "us-ascii"
    head = [
        "Content-Description: Notification",
        f"Content-Type: text/plain; charset={charset}",
        f"Content-Transfer-Encoding: {'8bit' if utf8 else '7bit'}",
        "",
    ]
    return _encode_lines(head + lines, utf8=utf8)


def _status_part(
    *,
    reporting_mta: str,
    queue_id: str,
    failed: Sequence[FailedRecipient],
    arrival_date: datetime,
    kind: DsnKind,
    utf8: bool,
) -> bytes:
    subtype = "global-delivery-status" if utf8 else "delivery-status"
    lines = [
        "Content-Description: Delivery report",
        f"Content-Type: message/{subtype}",
        f"Content-Transfer-Encoding: {'8bit' if utf8 else '7bit'}",
        "",
        f"Reporting-MTA: dns; {_clean(reporting_mta, utf8=False)}",
        f"X-Mailedge-Queue-ID: {_clean(queue_id, utf8=False)}",
        f"Arrival-Date: {_rfc_date(arrival_date)}",
    ]
    action = "failed" if kind == "failure" else "delayed"
    for rcpt in failed:
        lines.append("")
        lines += _fold_field(_address_field("Final-Recipient", rcpt.address))
        if rcpt.original_address:
            lines += _fold_field(
                _address_field("Original-Recipient", rcpt.original_address)
            )
        lines.append(f"Action: {action}")
        lines.append(f"Status: {_status_code(rcpt.outcome, kind)}")
        remote = _remote_mta(rcpt.outcome.remote)
        if remote is not None:
            lines.append(f"Remote-MTA: dns; {remote}")
        lines += _fold("Diagnostic-Code", _diagnostic(rcpt.outcome, utf8=utf8))
        lines.append(f"Last-Attempt-Date: {_rfc_date(rcpt.last_attempt)}")
    return _encode_lines(lines, utf8=utf8)


def _fold_field(field: str) -> list[str]:
    """Fold an address field ('Name: type; address'), keeping it on one line if it fits."""
    name, _, value = field.partition(": ")
    return _fold(name, value, soft_limit=_HARD_LIMIT)


_STATUS_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")


def _status_code(outcome: Outcome, kind: DsnKind) -> str:
    """The outcome's enhanced status, kept consistent with the Action field.

    A failed recipient keeps a 5.x.y status, or its 4.x.y one when it failed because a
    temporary condition lasted too long (RFC 3463: a persistent transient failure). A
    delayed recipient always reports class 4. A malformed status becomes x.0.0.
    """
    status = outcome.status if _STATUS_RE.match(outcome.status) else ""
    if kind == "delay":
        return "4" + status[1:] if status else "4.0.0"
    if status.startswith(("4.", "5.")):
        return status
    if status:
        return "5" + status[1:]
    return "4.0.0" if outcome.temporary else "5.0.0"


def _original_header_block(raw: bytes) -> bytes:
    """The header block with CRLF endings, cut at the first empty line (never any body)."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if text.startswith(b"\n"):
        return b""
    end = text.find(b"\n\n")
    if end >= 0:
        text = text[:end]
    text = text.rstrip(b"\n")
    if not text:
        return b""
    return text.replace(b"\n", b"\r\n") + b"\r\n"


def _headers_part(block: bytes, *, utf8: bool) -> bytes:
    content_type = "message/global-headers" if utf8 else "text/rfc822-headers"
    too_long = any(len(line) > _HARD_LIMIT for line in block.split(b"\r\n"))
    eight_bit = not block.isascii()
    if too_long or (eight_bit and not utf8):
        body = binascii.b2a_qp(block, istext=True)
        cte = "quoted-printable"
    else:
        body = block
        cte = "8bit" if eight_bit else "7bit"
    head = _encode_lines(
        [
            "Content-Description: Undelivered message headers",
            f"Content-Type: {content_type}",
            f"Content-Transfer-Encoding: {cte}",
            "",
        ],
        utf8=False,
    )
    return head + body


def _boundary(dsn_id: str, reporting_mta: str, parts: Sequence[bytes]) -> str:
    """A boundary derived from the DSN id that occurs in none of the parts."""
    base = _BOUNDARY_UNSAFE_RE.sub("", f"{dsn_id}/{reporting_mta}")[:60] or "dsn"
    candidate = f"={base}="
    counter = 0
    while any(candidate.encode() in part for part in parts):
        counter += 1
        candidate = f"={base}={counter}="
    return candidate
