"""SMTP/LMTP replies: the `Reply` value and an incremental parser for the wire format.

The grammar is RFC 5321 §4.2::

    Reply-line = *( Reply-code "-" [ textstring ] CRLF )
                    Reply-code [ SP textstring ] CRLF

Every line of a multi-line reply carries the same three-digit code; a hyphen after the
code says more lines follow. RFC 3463 enhanced status codes (``class.subject.detail``,
class 2, 4 or 5, matching the reply's own class) open the text of each line when the
server supports ENHANCEDSTATUSCODES (RFC 2034); `Reply.enhanced` holds it and
`Reply.lines` holds the texts without it.

Theory of operation of `ReplyParser`: bytes go in with `feed()`, complete replies come
out, in order; an incomplete line or an unfinished multi-line reply stays buffered until
more bytes arrive, so the parser is indifferent to how the network splits the stream
(one byte at a time, or many pipelined replies in one read). Lines end at LF; a CR before
the LF is dropped, so a server ending lines with bare LF is tolerated. Anything that is
not a reply line raises `RemoteProtocolError`, and the error is sticky: the stream
cannot be resynchronised, so every later `feed()` raises too.

The parser sits on the hot path (several replies per message), so a complete one-line
reply -- almost every reply -- is looked up by its raw bytes in a small memo of recent
lines before it is parsed; `Reply` is immutable, so sharing one is safe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import RemoteProtocolError

__all__ = ["MAX_REPLY_LINE", "MAX_REPLY_LINES", "Reply", "ReplyParser"]

#: Longest reply line accepted, in octets without the line ending. RFC 5321 §4.5.3.1.5
#: limits reply lines to 512 octets including CRLF; real servers stay well inside it,
#: and the generous bound only exists so a broken peer cannot grow our buffer forever.
MAX_REPLY_LINE = 8192

#: Most lines in one reply. An LHLO reply lists one extension per line (Dovecot sends
#: about ten); a thousand means the peer is not an LMTP server.
MAX_REPLY_LINES = 1000

_ENHANCED = re.compile(r"([245])\.(?:0|[1-9]\d{0,2})\.(?:0|[1-9]\d{0,2})(?= |$)")


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete server reply.

    `code` is the three-digit reply code, `enhanced` the RFC 3463 status code when the
    server gave one (``"2.1.5"``), and `lines` the text of each line with the code and
    the enhanced status removed (a one-line reply has one entry, possibly empty).
    """

    code: int
    enhanced: str | None = None
    lines: tuple[str, ...] = ("",)

    @property
    def text(self) -> str:
        """The text on one line: the lines joined by a space, empty lines dropped."""
        return " ".join(line for line in self.lines if line)

    @property
    def is_positive(self) -> bool:
        """2yz: positive completion (RFC 5321 §4.2.1)."""
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """3yz: positive intermediate, such as 354 after DATA."""
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """4yz: transient negative completion -- try again later."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5yz: permanent negative completion -- do not try again."""
        return 500 <= self.code < 600

    def __str__(self) -> str:
        parts = [str(self.code)]
        if self.enhanced:
            parts.append(self.enhanced)
        text = self.text
        if text:
            parts.append(text)
        return " ".join(parts)

    def to_bytes(self) -> bytes:
        """The reply as a server writes it (for test servers and sinks)."""
        lines = self.lines or ("",)
        last = len(lines) - 1
        out = []
        for i, line in enumerate(lines):
            body = " ".join(p for p in (self.enhanced, line) if p)
            if i == last:
                out.append(f"{self.code} {body}\r\n" if body else f"{self.code}\r\n")
            else:
                out.append(f"{self.code}-{body}\r\n")
        return "".join(out).encode("utf-8")


class ReplyParser:
    """Turns a byte stream from a server into `Reply` objects; see the module docstring."""

    __slots__ = ("_buf", "_code", "_error", "_max_line", "_max_lines", "_texts")

    def __init__(self, *, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES) -> None:
        self._buf = bytearray()
        self._code: int | None = None  # code of the multi-line reply being collected
        self._texts: list[bytes] = []
        self._max_line = max_line
        self._max_lines = max_lines
        self._error: RemoteProtocolError | None = None

    @property
    def pending(self) -> bool:
        """True if part of a reply is buffered (an unfinished line or multi-line reply)."""
        return bool(self._buf) or self._code is not None

    def feed(self, data: bytes) -> list[Reply]:
        """Add bytes from the server; return every reply they complete, in order.

        Raises `RemoteProtocolError` for anything that is not a well-formed reply line,
        and again on every later call.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        lines = data.split(b"\n")
        tail = lines.pop()  # after the last LF: an unfinished line, or b""
        out: list[Reply] = []
        cache = _single_line_cache
        try:
            if len(tail) > self._max_line + 1:  # + 1: the CR of a CRLF yet to come
                raise RemoteProtocolError("reply line too long")
            for line in lines:
                if self._code is None:
                    cached = cache.get(line)
                    if cached is not None:
                        out.append(cached)
                        continue
                reply = self._line(line)
                if reply is not None:
                    out.append(reply)
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        buf += tail
        return out

    def _line(self, raw: bytes) -> Reply | None:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if len(line) > self._max_line:
            raise RemoteProtocolError("reply line too long")
        if len(line) < 3 or not line[:3].isdigit():
            raise RemoteProtocolError(f"malformed reply line: {_show(line)}")
        if line[0] not in b"2345" or line[1] not in b"012345":
            raise RemoteProtocolError(f"reply code out of range: {_show(line)}")
        code = int(line[:3])
        sep = line[3:4]
        if sep == b"-":
            final = False
        elif sep == b" " or sep == b"":
            final = True
        else:
            raise RemoteProtocolError(f"malformed reply line: {_show(line)}")
        if self._code is None:
            if final:  # the common case: a complete one-line reply
                reply = _build(code, [line[4:].decode("utf-8", "replace")])
                if len(raw) <= _CACHE_LINE:
                    if len(_single_line_cache) >= _CACHE_SIZE:
                        _single_line_cache.clear()
                    _single_line_cache[raw] = reply
                return reply
            self._code = code
        elif code != self._code:
            raise RemoteProtocolError(f"multi-line reply changed code from {self._code} to {code}")
        self._texts.append(line[4:])
        if len(self._texts) > self._max_lines:
            raise RemoteProtocolError("reply has too many lines")
        if not final:
            return None
        texts = [t.decode("utf-8", "replace") for t in self._texts]
        self._code = None
        self._texts = []
        return _build(code, texts)


# Replies are immutable values, and most one-line replies recur verbatim ("250 2.1.0 Ok"
# to every MAIL, "250 2.1.5 Ok" to every RCPT, "354 ..." to every DATA), so the parsed
# Reply is remembered per raw line: parsing them is then one dict lookup. Lines that
# differ every time (a queue id in the reply after the data) simply fill the cache, which
# is emptied when full; it never holds more than _CACHE_SIZE lines of at most
# _CACHE_LINE octets (the RFC 5321 reply line limit).
_CACHE_SIZE = 256
_CACHE_LINE = 512
_single_line_cache: dict[bytes, Reply] = {}


def _build(code: int, texts: list[str]) -> Reply:
    enhanced: str | None = None
    match = _ENHANCED.match(texts[0])
    if match is not None and int(match.group(1)) == code // 100:
        enhanced = match.group(0)
        n = len(enhanced)
        texts = [
            t[n + 1 :] if t.startswith(enhanced) and (len(t) == n or t[n] == " ") else t
            for t in texts
        ]
    return Reply(code, enhanced, tuple(texts))


def _show(line: bytes) -> str:
    """A short, printable excerpt of a bad line for error messages and logs."""
    return repr(line[:60])
