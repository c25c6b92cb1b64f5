"""Header edits the gateway makes on accepted mail: Received, Authentication-Results,
and removing forged Authentication-Results.

Both work on raw bytes of the header section and never touch the body, so long lines
and 8-bit content stay byte-exact (a rewrapped body breaks DKIM).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import authres
import authres.arc
import authres.dmarc

from filters.arc import ArcResult
from filters.dkim import DkimResult
from filters.dmarc import DmarcResult
from filters.spf import SpfResult

_AR_NAME = b"authentication-results"
_COMMENT_TOKENS = re.compile(rb"\\.|[()]", re.DOTALL)  # quoted-pair, or a comment delimiter
_QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"')


def received_header(*, helo: str | None, client_ip: str, rdns: str | None, hostname: str,
                    protocol: str, queue_id: str, recipient: str | None,
                    when: datetime | None = None) -> bytes:
    """RFC 5321 §4.4 trace header; `protocol` per RFC 3848 / RFC 6531 (ESMTPS, UTF8SMTP...).

    The `for` clause names the recipient only when there is exactly one, so a
    message to many recipients does not reveal the others to each.
    """
    date = format_datetime(when) if when is not None else _now_rfc5322()
    literal = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    source = f"{_clean(helo) if helo else 'unknown'} ({_clean(rdns) + ' ' if rdns else ''}"\
             f"[{literal}])"
    recipient_clause = f"\r\n\tfor <{_clean(recipient)}>" if recipient else ""
    text = (f"Received: from {source}\r\n\tby {hostname} (mailedge) with {protocol} "
            f"id {queue_id}{recipient_clause};\r\n\t{date}\r\n")
    return text.encode("utf-8", "surrogateescape")


_date_cache: tuple[int, str] = (-1, "")


def _now_rfc5322() -> str:
    """format_datetime(datetime.now(UTC)), made once per second: the date has whole
    seconds, and building it was a good part of the header's cost."""
    global _date_cache
    now = time.time()
    second = int(now)
    if _date_cache[0] != second:
        _date_cache = (second, format_datetime(datetime.fromtimestamp(second, UTC)))
    return _date_cache[1]


_UNSAFE = re.compile(r"[\x00-\x20()<>;\\\"\x7f]")


def _clean(value: str) -> str:
    # Whatever the client claimed, it must not break the header's structure: no line
    # breaks, no comment or angle delimiters, no ";" (it starts the date, RFC 5322 §3.6.7).
    return _UNSAFE.sub("?", value)[:255]


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
            if _authserv_id(_strip_comments(unfolded)) == ours:
                removed += 1
                continue
        kept.append(field)
    return b"".join(kept), removed


def _strip_comments(value: bytes) -> bytes:
    """Replace every comment by a space (RFC 8601 allows CFWS around the authserv-id).

    Comments nest and may hold quoted-pairs (RFC 5322 §3.2.2), so this counts depth in
    one linear pass (a regex loop peeling one level per pass would be quadratic on a
    hostile "((((((..." field). An unterminated comment runs to the end of the value.
    """
    out: list[bytes] = []
    depth = 0
    start = 0
    for match in _COMMENT_TOKENS.finditer(value):
        token = match.group()
        if depth == 0:
            if token == b"(":  # a quoted-pair or stray ")" outside comments is text
                out += (value[start:match.start()], b" ")
                depth = 1
        elif token == b"(":
            depth += 1
        elif token == b")":
            depth -= 1
            if depth == 0:
                start = match.end()
    if depth == 0:
        out.append(value[start:])
    return b"".join(out)


def _authserv_id(value: bytes) -> bytes:
    """The authserv-id of an unfolded, comment-free field value, lowercased.

    It is a `value` of RFC 2045: a token, or a quoted-string that means the same.
    """
    value = value.strip()
    quoted = _QUOTED.match(value)
    if quoted:
        return re.sub(rb"\\(.)", rb"\1", quoted.group(1)).lower()
    ident = value.split(b";", 1)[0].split()
    return ident[0].lower() if ident else b""


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


def authentication_results(authserv_id: str, *, client_ip: str, spf: SpfResult | None,
                           spf_helo: SpfResult | None, dkim: Sequence[DkimResult] | None,
                           dmarc: DmarcResult | None, arc: ArcResult | None) -> bytes:
    """One Authentication-Results field (RFC 8601) for what the checks found.

    Methods that did not run are left out; if none ran the field says `none`. One
    method per folded line, so many DKIM signatures never make an over-long line.
    """
    results: list[Any] = []
    if spf is not None:
        results.append(authres.SPFAuthenticationResult(
            result=spf.result, smtp_mailfrom=spf.sender if spf.sender else None,
            result_comment=f"{authserv_id}: domain of {spf.sender} "
                           f"{_SPF_WORDS.get(spf.result, spf.result)} {client_ip}"
            if spf.sender else None))
    elif spf_helo is not None:
        results.append(authres.SPFAuthenticationResult(result=spf_helo.result,
                                                       smtp_helo=spf_helo.domain))
    if dkim is not None and not dkim:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    for signature in dkim or ():
        properties = [authres.AuthenticationResultProperty("header", "b", signature.header_b)] \
            if signature.header_b else []
        results.append(authres.DKIMAuthenticationResult(
            result=signature.result, header_d=signature.domain or None,
            header_s=signature.selector or None, header_i=signature.identity or None,
            header_a=signature.algorithm or None, properties=properties,
            reason=signature.reason or None if signature.result != "pass" else None))
    if dmarc is not None:
        results.append(authres.dmarc.DMARCAuthenticationResult(
            result=dmarc.result.value, header_from=dmarc.from_domain,
            policy=dmarc.policy_dmarc))
    if arc is not None:
        results.append(authres.arc.ARCAuthenticationResult(
            result=arc.result, smtp_remote_ip=client_ip,
            header_oldest_pass=str(arc.oldest_pass) if arc.oldest_pass is not None else None))
    # authres quotes and escapes the values; only line breaks must never get through.
    lines = [re.sub(r"[\r\n]+", " ", str(r)) for r in results] or ["none"]
    text = f"Authentication-Results: {authserv_id};\r\n\t" + ";\r\n\t".join(lines) + "\r\n"
    return text.encode("utf-8", "surrogateescape")


_SPF_WORDS = {"pass": "designates", "fail": "does not designate",
              "softfail": "does not designate", "neutral": "neither permits nor denies",
              "none": "has no SPF policy for"}


def remove_fields(header: bytes, names: frozenset[bytes]) -> tuple[bytes, int]:
    """Drop every field whose (lowercase) name is in `names`; return how many went.

    For fields only we may write (our scan verdicts): a sender must not be able to
    add an "X-Spam-Flag: NO" or "X-Mailedge-Virus-Scan: clean" of its own.
    """
    lowered = header.lower()
    if not any(name in lowered for name in names):
        return header, 0
    kept = [f for f in split_fields(header)
            if f.partition(b":")[0].strip().lower() not in names]
    removed = len(split_fields(header)) - len(kept)
    return b"".join(kept), removed
