"""Header edits the gateway makes on accepted mail: Received, and removing forgeries.

Both work on raw bytes of the header section and never touch the body, so long lines
and 8-bit content stay byte-exact (a rewrapped body breaks DKIM).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import format_datetime

_AR_NAME = b"authentication-results"


def received_header(*, helo: str | None, client_ip: str, rdns: str | None, hostname: str,
                    protocol: str, queue_id: str, recipient: str | None,
                    when: datetime | None = None) -> bytes:
    """RFC 5321 §4.4 trace header; `protocol` per RFC 3848 / RFC 6531 (ESMTPS, UTF8SMTP...).

    The `for` clause names the recipient only when there is exactly one, so a
    message to many recipients does not reveal the others to each.
    """
    when = when or datetime.now(UTC)
    literal = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    source = f"{_clean(helo) if helo else 'unknown'} ({_clean(rdns) + ' ' if rdns else ''}"\
             f"[{literal}])"
    recipient_clause = f"\r\n\tfor <{_clean(recipient)}>" if recipient else ""
    text = (f"Received: from {source}\r\n\tby {hostname} (mailedge) with {protocol} "
            f"id {queue_id}{recipient_clause};\r\n\t{format_datetime(when)}\r\n")
    return text.encode("utf-8", "surrogateescape")


def _clean(value: str) -> str:
    # Whatever the client claimed, it must not break the header's structure.
    return re.sub(r"[\x00-\x20()<>\\\"\x7f]", "?", value)[:255]


def remove_forged_auth_results(header: bytes, authserv_id: str) -> tuple[bytes, int]:
    """Drop every Authentication-Results field claiming our authserv-id (RFC 8601 §5).

    Returns the new header section and how many fields were removed. Fields of other
    authserv-ids are kept; their authority is for their own receivers to judge.
    """
    if _AR_NAME not in header.lower():
        return header, 0
    ours = authserv_id.lower().encode()
    kept: list[bytes] = []
    removed = 0
    for field in split_fields(header):
        name, _, value = field.partition(b":")
        if name.strip().lower() == _AR_NAME:
            unfolded = re.sub(rb"\r?\n[ \t]+", b" ", value)
            unfolded = re.sub(rb"\([^()]*\)", b" ", unfolded)  # RFC 8601 allows CFWS
            ident = unfolded.strip().split(b";", 1)[0].strip().split()
            if ident and ident[0].lower() == ours:
                removed += 1
                continue
        kept.append(field)
    return b"".join(kept), removed


def split_fields(header: bytes) -> list[bytes]:
    """Split a header section (CRLF lines) into fields, keeping folded lines together.

    The terminating blank line, if present, stays as its own last element.
    """
    fields: list[bytes] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields and fields[-1] not in (b"\r\n", b"\n"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields
