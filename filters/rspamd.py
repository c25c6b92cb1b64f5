"""Async client for Rspamd's HTTP scanning protocol (`POST /checkv2`).

Theory of operation
-------------------
`RspamdClient` speaks HTTP/1.1 itself, on an `asyncio.Protocol` (`_HttpConnection`), to
`http://host[:port][/prefix]` (or `https://`) or to a UNIX socket, `unix:/path/to/socket`
(Rspamd's workers bind one with `bind_socket = "/run/rspamd/normal.sock";`). It used
aiohttp until issue 6: Rspamd 3.4's normal worker answers every request with
`Connection: close`, so every scan opens a new connection, and aiohttp's per-connection
and per-request machinery (connector, happy-eyeballs connect, request and response
objects) cost 0.6-1.4 ms of client CPU per scan, ~14 % of the node's Python CPU per
message. Ours costs about half of that, 0.3-0.65 ms with uvloop, most of it the kernel's
connect, send and close on loopback (less over a UNIX socket); bench/rspamd_client.py
measures it, docs/dependencies.md has the figures.

One request on one connection: the request head (request line, `Host`, `User-Agent`,
`Content-Length` and Rspamd's headers below) and the message go out in one `write()`
(two buffers of one `writelines()` for messages over 256 KiB, no copy); the protocol parses
the reply as it arrives: the status line and headers (at most 32 KiB, well-formed, or
`SpamScanError`), then exactly `Content-Length` bytes, or a `Transfer-Encoding: chunked`
body, or, with neither, everything up to EOF (at most 16 MiB). No redirects, no
compression (none is asked for), no `Expect: 100-continue` (an interim 1xx reply is
skipped all the same).

Connections: at most `connections` (default 32) at a time, enforced with a semaphore:
more concurrent scans wait for a free slot inside the client rather than piling onto the
scanner (the wait counts towards `timeout`). A reply without `Connection: close` (the
HTTP/1.1 default; HTTP/1.0 only with `Connection: keep-alive`), completely read, leaves its
connection open in an idle pool (LIFO, dropped after 15 s idle) for the next scan, so an
Rspamd that keeps connections alive saves the connect; Rspamd 3.4 closes them, so each
scan pays one connect on loopback. A reused connection the server closed meanwhile (EOF
or reset before the first byte of the reply) is retried once on a new connection; once any
byte of the reply has arrived nothing is retried (Rspamd may have scanned the message).
Host names are resolved once per 5 minutes (IP literals never), not at every connect.

`check()` sends the message as the request body with Rspamd's request headers
(https://rspamd.com/doc/developers/protocol.html):

    IP          the client's address (after PROXY protocol)
    Helo        the HELO/EHLO name
    Hostname    the client's *verified reverse DNS name* (omitted when unknown: Rspamd's
                hfilter then scores HFILTER_HOSTNAME_UNKNOWN and looks up the PTR itself)
    From        the envelope sender ("" for the null sender is sent as "<>")
    Rcpt        one header per envelope recipient
                (Rspamd 3.4 cannot parse non-ASCII envelope addresses here and would
                score BROKEN_HEADERS, 8 points: IDN domains are sent as A-labels, and an
                address with a non-ASCII local part is left out, see `_ascii_address`)
    User        the authenticated SASL user (submission only: Rspamd skips sender checks)
    Queue-Id    our id of the message, for Rspamd's log
    MTA-Name    our own hostname (used in headers Rspamd would generate)
    Password    only with `password=` (a controller worker protected by a password)
    SPF, DKIM, DMARC
                authentication results mailedge already computed (filters/authentication),
                as UCL/JSON objects: `SPF: {"result": "pass"}`, `DKIM: {"results":
                [{"result": "pass", "domain": "example.com"}]}`, `DMARC: {"result":
                "reject"}`; RFC 8601 result words are mapped onto the vocabulary of
                Rspamd's `http_headers` module by `_spf_value` etc. A result the module
                has no word for (SPF temperror, an unknown word) is not sent.

What Rspamd makes of SPF, DKIM and DMARC headers (read in Rspamd 3.4's
plugins/http_headers.lua): the `http_headers` module is off in the stock configuration,
and then the headers are ignored and Rspamd runs its own SPF_CHECK, DKIM_CHECK and
DMARC_CALLBACK (the same work done twice). When it is on (`local.d/http_headers.conf:
enabled = true;`) it turns the headers into Rspamd's symbols (R_SPF_ALLOW, R_DKIM_REJECT,
DMARC_POLICY_REJECT, ... with the option "http header"), and its conditions on
SPF_CHECK, DKIM_CHECK and DMARC_CALLBACK end in `return false` whether or not a header was
sent: Rspamd's own three checks are off for *every* request of that Rspamd instance (only
a header that fails to parse lets that one check run). A missing header then means no
symbol at all, not a check by Rspamd: an SPF temperror, or a message mailedge did not check
(the filter not in the pipeline), scores nothing for that check; and every other client of
the instance (a milter proxy for Postfix, `rspamc`) gets no SPF, DKIM or DMARC checks.
The module has no symbol of its own that settings could switch off per request: it is on
or off for the whole instance. An operator chooses (docs/filters.md):

* an Rspamd instance that serves mailedge only, `http_headers` on, and spf, dkim and dmarc
  in mailedge's pipeline: our results are scored by Rspamd, nothing is checked twice;
* or (shared instance) `http_headers` off and a settings rule that matches mailedge's
  requests (`request_header` on our MTA-Name) with `apply { symbols_disabled =
  ["SPF_CHECK", "DKIM_CHECK", "DMARC_CALLBACK"]; }`: the same work saved, minus those
  symbols' small scores (mailedge's own spf, dkim and dmarc filters decide on them
  anyway); bench/chain.py runs this way;
* or the stock configuration: everything checked twice, by mailedge and by Rspamd.

Whoever can reach Rspamd's normal worker can send these headers (and MTA-Name) and claim
a pass: only the gateway may reach it when the module or such a rule is on.

The JSON reply is decoded with msgspec into `SpamResult`: the total `score`, Rspamd's own
`required_score` (its reject threshold) and `action`, the symbols that fired with their
scores, the Message-ID Rspamd saw. `forced` is Rspamd's `is_skipped`: the message was settled
before scoring (GTUBE, a force_actions rule, a settings "skip"); the action is then what
counts, and `score` is just the threshold of that action.

Errors: a refused or reset connection, a connection closed before the reply was complete
("ServerDisconnected: ..."), a timeout (`timeout` covers the whole request: the wait for a
connection slot, connect, to the last byte), a malformed or oversized reply head, an HTTP
status other than 200, an unparsable or incomplete JSON body, or a body with an "error"
member all raise `SpamScanError` (the message says which, for logs; never for the SMTP
peer). A message larger than `max_size` is not sent at all: the result is
`SpamResult.not_scanned("too large")` (`skipped` set), so huge mail costs neither Rspamd's
time nor ours; Rspamd has its own limit (`max_message`, 50 MiB by default).
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import msgspec

__all__ = ["RspamdClient", "SpamResult", "SpamScanError", "url_problem"]

DEFAULT_CONNECTIONS = 32

_MAX_HEAD = 32 * 1024  # status line and headers of a reply
_MAX_BODY = 16 * 1024 * 1024  # a reply body (Rspamd's are a few KiB)
_COPY_LIMIT = 256 * 1024  # larger messages are written as two buffers, without a copy
_IDLE_SECONDS = 15.0  # an idle kept-alive connection older than this is closed, not reused
_DNS_SECONDS = 300.0  # resolved addresses of a host name are kept this long


class SpamScanError(Exception):
    """The scanner gave no usable answer (down, slow, broken); the message is unscanned."""


class _NoResponse(SpamScanError):
    """The connection closed before the first byte of the reply (retryable if reused)."""


@dataclass(frozen=True, slots=True)
class SpamResult:
    """Rspamd's verdict on one message (or why there is none: `skipped`)."""

    score: float
    required_score: float  # Rspamd's own reject threshold; tenants use their own
    action: str  # "no action", "greylist", "add header", "rewrite subject", "soft reject",
    #              "reject"; informative except when `forced`
    symbols: Mapping[str, float] = field(default_factory=dict)  # name -> score, as returned
    message_id: str | None = None
    forced: bool = False  # settled before scoring (GTUBE, force_actions): `action` counts
    skipped: bool = False  # not scanned by us (see `reason`)
    reason: str = ""
    seconds: float = 0.0  # Rspamd's own processing time (`time_real`)

    @classmethod
    def not_scanned(cls, reason: str) -> SpamResult:
        return cls(score=0.0, required_score=math.inf, action="no action", skipped=True,
                   reason=reason)

    def top_symbols(self) -> list[tuple[str, float]]:
        """Symbols with a non-zero score, highest first (then by name)."""
        return sorted(((n, s) for n, s in self.symbols.items() if s),
                      key=lambda item: (-item[1], item[0]))


class _WireSymbol(msgspec.Struct):
    score: float = 0.0


class _WireReply(msgspec.Struct):
    """What we read of /checkv2's JSON (unknown members are ignored)."""

    score: float | None = None
    required_score: float | None = None
    action: str | None = None
    is_skipped: bool = False
    symbols: dict[str, _WireSymbol] = {}
    message_id: str | None = msgspec.field(default=None, name="message-id")
    time_real: float = 0.0
    error: str | None = None


_reply_decoder = msgspec.json.Decoder(_WireReply)


# RFC 8601 / our result words -> the words Rspamd's http_headers module understands.
_SPF = {"pass": "pass", "fail": "fail", "softfail": "softfail", "neutral": "neutral",
        "none": "na", "permerror": "permfail"}  # temperror: no word (no SPF symbol then)
_DKIM = {"pass": "pass", "fail": "fail", "neutral": "permfail", "policy": "permfail",
         "temperror": "tempfail", "permerror": "permfail", "none": "na"}
_DMARC = {"pass": "pass", "fail": "reject", "reject": "reject", "quarantine": "quarantine",
          "softfail": "softfail", "none": "na", "temperror": "tempfail",
          "permerror": "badpolicy"}


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _spf_value(result: str) -> str | None:
    word = _SPF.get(result.lower())
    return None if word is None else _json({"result": word})


def _dkim_value(results: str | Sequence[tuple[str, str]]) -> str | None:
    if isinstance(results, str):
        results = [(results, "unknown")]
    items = []
    for result, domain in results:
        word = _DKIM.get(result.lower())
        if word is not None:
            items.append({"result": word, "domain": domain or "unknown"})
    if not items:
        return None
    return _json({"results": items})


def _dmarc_value(result: str) -> str | None:
    word = _DMARC.get(result.lower())
    return None if word is None else _json({"result": word})


def _clean(value: str) -> str:
    """A header value without control characters (no header injection, ever)."""
    if value.isprintable():
        return value
    return "".join(ch if ch.isprintable() else " " for ch in value).strip()


def _ascii_address(address: str) -> str | None:
    """The address as Rspamd 3.4 can parse it from a request header, or None.

    Rspamd cannot parse a non-ASCII envelope address in `From`/`Rcpt` and then scores
    BROKEN_HEADERS (8 points) for the message. An internationalised domain becomes its
    A-label form; a non-ASCII local part has no ASCII form, so such an address is not
    sent (the sender then looks like the null sender to Rspamd's envelope checks; its
    header checks are unaffected).
    """
    address = _clean(address)
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    return f"{local}@{ascii_domain}"


# -- HTTP/1.1 on one connection ----------------------------------------------------------

_IDLE, _HEAD, _LENGTH, _CHUNKED, _EOF = range(5)  # what the connection waits for
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")


class _HttpConnection(asyncio.Protocol):
    """One client connection: sends a request, parses its reply as the bytes arrive.

    `send()` returns a future of (status, body, keep_alive); `closed` is set once the
    connection is unusable (closed by either side, or a protocol error).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self._state = _IDLE
        self._buf = bytearray()
        self._received = 0
        self._status = 0
        self._keep_alive = False
        self._length = 0
        self._no_body = False
        self._pos = 0  # chunked: where the next chunk-size line starts in _buf
        self._chunks: list[bytes] = []
        self._chunked_size = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._state == _IDLE:  # nothing asked: not a connection to reuse
            self._close()
            return
        self._received += len(data)
        self._buf += data
        try:
            self._parse()
        except SpamScanError as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        if self._state == _EOF:
            self._finish(bytes(self._buf))
        elif self._state != _IDLE:
            self._fail(self._closed_error(None))
        self.closed = True
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._state == _EOF and exc is None:
            self._finish(bytes(self._buf))
        elif self._state != _IDLE:
            self._fail(self._closed_error(exc))

    # the client's side

    def send(self, head: bytes, body: bytes, *, no_body: bool = False,
             ) -> asyncio.Future[tuple[int, bytes, bool]]:
        """Write one request; the future is its reply. `no_body`: a reply to HEAD."""
        transport = self.transport
        assert transport is not None and self._state == _IDLE
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        self._state = _HEAD
        self._buf.clear()
        self._received = 0
        self._no_body = no_body
        if len(body) <= _COPY_LIMIT:
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        return waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self._state = _IDLE
        if self.transport is not None:
            self.transport.abort()

    # parsing

    def _parse(self) -> None:
        buf = self._buf
        while self._state == _HEAD:
            end = buf.find(b"\r\n\r\n", 0, _MAX_HEAD + 4)
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise SpamScanError(f"reply head larger than {_MAX_HEAD} bytes")
                return
            self._parse_head(bytes(buf[:end]))
            del buf[:end + 4]
        if self._state == _LENGTH:
            if len(buf) >= self._length:
                if len(buf) > self._length:  # more than the reply: do not reuse
                    self._keep_alive = False
                self._finish(bytes(buf[:self._length]))
        elif self._state == _CHUNKED:
            self._parse_chunks()
        elif self._state == _EOF and len(buf) > _MAX_BODY:
            raise SpamScanError(f"reply body larger than {_MAX_BODY} bytes")

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if (version not in ("HTTP/1.1", "HTTP/1.0") or not (code.isascii() and code.isdigit())
                or rest[3:4] not in ("", " ")):
            raise SpamScanError(f"bad HTTP status line {lines[0][:60]!r}")
        length: int | None = None
        chunked = close = keep = False
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name[0] in " \t" or name[-1] in " \t":
                raise SpamScanError(f"bad HTTP header line {line[:60]!r}")
            name = name.lower()
            if name == "content-length":
                value = value.strip()
                if (not (value.isascii() and value.isdigit())
                        or (length is not None and int(value) != length)):
                    raise SpamScanError(f"bad Content-Length {value[:20]!r}")
                length = int(value)
            elif name == "transfer-encoding":
                if value.strip().lower() != "chunked":
                    raise SpamScanError(f"unsupported Transfer-Encoding {value[:30]!r}")
                chunked = True
            elif name == "connection":
                tokens = value.lower().replace(" ", "").split(",")
                close = close or "close" in tokens
                keep = keep or "keep-alive" in tokens
        status = int(code)
        if status < 200:  # an interim reply (100 Continue): the real one follows
            return
        self._status = status
        self._keep_alive = not close and (version == "HTTP/1.1" or keep)
        if self._no_body or status in (204, 304):
            self._state, self._length = _LENGTH, 0
        elif chunked:
            self._state, self._pos, self._chunks, self._chunked_size = _CHUNKED, 0, [], 0
            if length is not None:  # both: chunked wins, but the sender is odd
                self._keep_alive = False
        elif length is not None:
            if length > _MAX_BODY:
                raise SpamScanError(f"reply body larger than {_MAX_BODY} bytes")
            self._state, self._length = _LENGTH, length
        else:
            self._state, self._keep_alive = _EOF, False

    def _parse_chunks(self) -> None:
        buf, pos = self._buf, self._pos
        while True:
            line_end = buf.find(b"\r\n", pos, pos + 1024)
            if line_end < 0:
                if len(buf) - pos > 1024:
                    raise SpamScanError("bad chunk size line")
                break
            size_text = bytes(buf[pos:line_end]).partition(b";")[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise SpamScanError(f"bad chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            start = line_end + 2
            if size == 0:  # the last chunk, then trailer fields and an empty line
                if buf[start:start + 2] == b"\r\n":
                    end = start + 2
                else:
                    end = buf.find(b"\r\n\r\n", start)
                    if end < 0:
                        if len(buf) - start > _MAX_HEAD:
                            raise SpamScanError("chunked trailer too large")
                        break
                    end += 4
                if len(buf) > end:
                    self._keep_alive = False
                self._finish(b"".join(self._chunks))
                return
            if self._chunked_size + size > _MAX_BODY:
                raise SpamScanError(f"reply body larger than {_MAX_BODY} bytes")
            if len(buf) < start + size + 2:
                break
            if buf[start + size:start + size + 2] != b"\r\n":
                raise SpamScanError("bad chunk (no CRLF after its data)")
            self._chunks.append(bytes(buf[start:start + size]))
            self._chunked_size += size
            pos = start + size + 2
        self._pos = pos

    def _finish(self, body: bytes) -> None:
        self._state = _IDLE
        self._buf.clear()
        self._chunks = []
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self._status, body, self._keep_alive))

    def _fail(self, exc: SpamScanError) -> None:
        self._state = _IDLE
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self._close()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def _closed_error(self, exc: Exception | None) -> SpamScanError:
        why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        if self._received == 0:
            return _NoResponse(f"ServerDisconnected: server closed the connection without "
                               f"a response{why}")
        return SpamScanError(f"ServerDisconnected: reply incomplete after "
                             f"{self._received} bytes{why}")


@dataclass(frozen=True, slots=True)
class _Endpoint:
    """Where a base URL points: a TCP host and port (maybe TLS), or a UNIX socket."""

    host: str  # "" for a UNIX socket
    port: int
    unix_path: str | None
    tls: bool
    prefix: str  # path prefix before /checkv2 and /ping, "" or "/..." without a final "/"
    host_header: str
    literal: bool  # host is an IP address: never resolved


def _endpoint(base_url: str) -> _Endpoint:
    """Parse `http://host[:port][/prefix]`, `https://...` or `unix:/path`; ValueError."""
    if base_url.startswith("unix:"):
        path = base_url[5:]
        if not path.startswith("/") or path.startswith("//") or any(
                ch.isspace() for ch in path):
            raise ValueError(f"not a unix:/path URL: {base_url!r}")
        return _Endpoint("", 0, path, False, "", "localhost", False)
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment or parts.username or parts.password:
        raise ValueError(f"not an http://host[:port] URL: {base_url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {base_url!r}") from None
    tls = parts.scheme == "https"
    host = parts.hostname
    try:
        ipaddress.ip_address(host)
        literal = True
    except ValueError:
        literal = False
    shown = f"[{host}]" if ":" in host else host
    return _Endpoint(host, port or (443 if tls else 80), None, tls,
                     parts.path.rstrip("/"), shown if port is None else f"{shown}:{port}",
                     literal)


def url_problem(base_url: str) -> str | None:
    """Why `base_url` is not one `RspamdClient` takes (None: it is); for config checks."""
    try:
        _endpoint(base_url.rstrip("/"))
    except ValueError:
        return "must be an http://host[:port] URL or unix:/path/to/socket"
    return None


class RspamdClient:
    """Scans messages with Rspamd over HTTP (`POST {base_url}/checkv2`).

    `base_url` is `http://host[:port]` (optionally `https://`, a path prefix) or
    `unix:/path/to/socket`. `timeout` bounds one whole request (seconds); `max_size` is
    the largest message sent (bytes; larger ones are not scanned); `password` is sent as
    the `Password` header (only needed for a controller worker with a password);
    `connections` caps concurrent connections.
    """

    def __init__(self, base_url: str, *, timeout: float, max_size: int,
                 password: str | None = None,
                 connections: int = DEFAULT_CONNECTIONS) -> None:
        if timeout <= 0 or max_size <= 0 or connections <= 0:
            raise ValueError("timeout, max_size and connections must be positive")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_size = max_size
        self._endpoint = _endpoint(self.base_url)
        self._password = password
        self._connections = connections
        self._slots = asyncio.Semaphore(connections)
        self._idle: list[_HttpConnection] = []
        self._addresses: list[tuple[int, Any]] = []  # resolved (family, sockaddr)
        self._resolved_until = 0.0
        self._ssl: ssl.SSLContext | None = None
        self._closed = False
        common = f"Host: {self._endpoint.host_header}\r\nUser-Agent: mailedge\r\n"
        self._check_head = f"POST {self._endpoint.prefix}/checkv2 HTTP/1.1\r\n{common}"
        self._ping_head = f"GET {self._endpoint.prefix}/ping HTTP/1.1\r\n{common}\r\n"

    def _header_list(self, *, ip: str | None, helo: str | None, sender: str,
                     recipients: Sequence[str], hostname: str | None,
                     user: str | None, queue_id: str | None, mta_name: str | None,
                     spf: str | None, dkim: str | Sequence[tuple[str, str]] | None,
                     dmarc: str | None) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        if ip:
            headers.append(("IP", _clean(ip)))
        if helo:
            headers.append(("Helo", _clean(helo)))
        if hostname:
            headers.append(("Hostname", _clean(hostname)))
        envelope_from = _ascii_address(sender) if sender else None
        headers.append(("From", envelope_from or "<>"))
        for recipient in recipients:
            ascii_recipient = _ascii_address(recipient)
            if ascii_recipient:
                headers.append(("Rcpt", ascii_recipient))
        if user:
            headers.append(("User", _clean(user)))
        if queue_id:
            headers.append(("Queue-Id", _clean(queue_id)))
        if mta_name:
            headers.append(("MTA-Name", _clean(mta_name)))
        if self._password:
            headers.append(("Password", _clean(self._password)))
        for name, value in (("SPF", spf and _spf_value(spf)),
                            ("DKIM", dkim and _dkim_value(dkim)),
                            ("DMARC", dmarc and _dmarc_value(dmarc))):
            if value:
                headers.append((name, value))
        return headers

    def headers(self, *, ip: str | None, helo: str | None, sender: str,
                recipients: Sequence[str], hostname: str | None = None,
                user: str | None = None, queue_id: str | None = None,
                mta_name: str | None = None, spf: str | None = None,
                dkim: str | Sequence[tuple[str, str]] | None = None,
                dmarc: str | None = None) -> list[tuple[str, str]]:
        """The request headers `check()` sends, in order (see the module docstring)."""
        return list(self._header_list(
            ip=ip, helo=helo, sender=sender, recipients=recipients, hostname=hostname,
            user=user, queue_id=queue_id, mta_name=mta_name, spf=spf, dkim=dkim,
            dmarc=dmarc))

    async def check(self, message: bytes, *, ip: str | None, helo: str | None, sender: str,
                    recipients: Sequence[str], hostname: str | None = None,
                    user: str | None = None, queue_id: str | None = None,
                    mta_name: str | None = None, spf: str | None = None,
                    dkim: str | Sequence[tuple[str, str]] | None = None,
                    dmarc: str | None = None) -> SpamResult:
        """Scan one message. Raises `SpamScanError` when Rspamd gives no usable answer.

        `spf` and `dmarc` are RFC 8601 result words ("pass", "fail", ...); `dkim` is one
        word or (result, domain) pairs, one per signature. None: not sent (what Rspamd
        then does depends on its `http_headers` module: see the module docstring).
        """
        if len(message) > self.max_size:
            return SpamResult.not_scanned(f"too large ({len(message)} > {self.max_size} bytes)")
        lines = [self._check_head, f"Content-Length: {len(message)}\r\n"]
        for name, value in self._header_list(
                ip=ip, helo=helo, sender=sender, recipients=recipients, hostname=hostname,
                user=user, queue_id=queue_id, mta_name=mta_name, spf=spf, dkim=dkim,
                dmarc=dmarc):
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        status, body = await self._request("".join(lines).encode(), message)
        return self._decode(status, body)

    @staticmethod
    def _decode(status: int, body: bytes) -> SpamResult:
        try:
            reply = _reply_decoder.decode(body)
        except msgspec.DecodeError as exc:
            if status != 200:
                raise SpamScanError(f"HTTP {status}") from None
            raise SpamScanError(f"bad JSON from rspamd: {exc}") from None
        if status != 200 or reply.error is not None:
            raise SpamScanError(f"HTTP {status}: {reply.error or 'error'}")
        if reply.score is None or reply.action is None or not math.isfinite(reply.score):
            raise SpamScanError("rspamd reply without score or action")
        return SpamResult(
            score=reply.score,
            required_score=reply.required_score if reply.required_score is not None
            else math.inf,
            action=reply.action,
            symbols={name: sym.score for name, sym in reply.symbols.items()},
            message_id=reply.message_id,
            forced=reply.is_skipped,
            seconds=reply.time_real,
        )

    async def ping(self) -> bool:
        """Does the scanner answer `GET /ping` with "pong" (for readiness checks)?"""
        try:
            status, body = await self._request(self._ping_head.encode(), b"")
        except SpamScanError:
            return False
        return status == 200 and body.strip() == b"pong"

    async def aclose(self) -> None:
        """Close the idle connections; `check()` raises afterwards (requests in flight
        finish, and close their connections)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        if idle:
            # Let the transports finish closing (no ResourceWarning at interpreter exit).
            await asyncio.sleep(0)

    async def __aenter__(self) -> RspamdClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- one request --------------------------------------------------------------------

    async def _request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        """(status, body) of one request; every failure is a `SpamScanError`."""
        if self._closed:
            raise SpamScanError("client closed")
        try:
            async with asyncio.timeout(self.timeout), self._slots:
                return await self._exchange(head, body)
        except OSError as exc:  # refused, reset, unreachable, TLS; TimeoutError is one
            if isinstance(exc, TimeoutError) and exc.errno is None:
                raise SpamScanError(f"timeout after {self.timeout:g}s") from None
            raise SpamScanError(f"{type(exc).__name__}: {exc}") from None

    async def _exchange(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        connection = self._reusable()
        reused = connection is not None
        if connection is None:
            connection = await self._connect()
        try:
            try:
                status, reply, keep_alive = await connection.send(head, body)
            except _NoResponse:
                if not reused:
                    raise
                # Closed by the server while idle (its keep-alive timeout): once more, on a
                # new connection. Nothing of a reply arrived, so Rspamd has not answered.
                connection.abort()
                connection = await self._connect()
                status, reply, keep_alive = await connection.send(head, body)
        except BaseException:  # an error, or the timeout cancelling us: never reused
            connection.abort()
            raise
        transport = connection.transport
        if (keep_alive and not self._closed and not connection.closed
                and transport is not None and not transport.get_write_buffer_size()):
            connection.idle_since = asyncio.get_running_loop().time()
            self._idle.append(connection)
        else:
            connection.close()
        return status, reply

    def _reusable(self) -> _HttpConnection | None:
        """The most recently used idle connection still open (others are closed)."""
        if not self._idle:
            return None
        oldest = asyncio.get_running_loop().time() - _IDLE_SECONDS
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and connection.idle_since >= oldest:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _HttpConnection:
        loop = asyncio.get_running_loop()
        endpoint = self._endpoint
        if endpoint.unix_path is not None:
            _, connection = await loop.create_unix_connection(_HttpConnection,
                                                              endpoint.unix_path)
            return connection
        if endpoint.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        context = self._ssl if endpoint.tls else None
        server_hostname = endpoint.host if endpoint.tls else None
        if endpoint.literal:
            _, connection = await loop.create_connection(
                _HttpConnection, endpoint.host, endpoint.port, ssl=context,
                server_hostname=server_hostname)
            return connection
        if loop.time() >= self._resolved_until:
            infos = await loop.getaddrinfo(endpoint.host, endpoint.port,
                                           type=socket.SOCK_STREAM)
            self._addresses = [(family, address) for family, _, _, _, address in infos]
            self._resolved_until = loop.time() + _DNS_SECONDS
        error: OSError | None = None
        for family, address in self._addresses:
            try:
                _, connection = await loop.create_connection(
                    _HttpConnection, address[0], address[1], family=family, ssl=context,
                    server_hostname=server_hostname)
                return connection
            except OSError as exc:
                error = error or exc
        self._resolved_until = 0.0  # resolve again next time
        raise error or OSError(f"{endpoint.host} has no address")
