"""Async client for Rspamd's HTTP scanning protocol (`POST /checkv2`).

Theory of operation
-------------------
`RspamdClient` owns one long-lived `aiohttp.ClientSession`, created on first use inside
the running loop and closed by `aclose()`. Its connector caps the connections to Rspamd
(`connections`, default 32: more concurrent scans wait for a free slot inside the client
rather than piling onto the scanner) and would keep them alive, but Rspamd 3.4's normal
worker answers every request with `Connection: close`, so in practice each scan opens one
loopback TCP connection. Measured client CPU per scan (the loop thread's user + system
time, 0.2-10 KiB messages, 2 shared vCPUs): 0.45-0.65 ms with asyncio, 0.4-0.5 ms with
uvloop; the connect() and send() system calls on loopback are a large part of it (an
aiohttp `GET /ping` over a new connection alone costs 0.2 ms).

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
                authentication results mailedge already computed (filters/authentication):
                Rspamd's `http_headers` module turns them into its own symbols
                (R_SPF_ALLOW, R_DKIM_REJECT, DMARC_POLICY_REJECT, ...) and skips its own
                SPF_CHECK, DKIM_CHECK and DMARC_CALLBACK, saving their DNS lookups and the
                DKIM RSA verifications. The module is off in the stock configuration; an
                operator enables it with `local.d/http_headers.conf: enabled = true;`.
                Without it the headers are ignored and Rspamd checks on its own (same
                symbols, computed twice). The values are UCL/JSON objects:
                `SPF: {"result": "pass"}`, `DKIM: {"results": [{"result": "pass",
                "domain": "example.com"}]}`, `DMARC: {"result": "reject"}`; RFC 8601
                result words are mapped onto the module's vocabulary by `_spf_value` etc.
                A result the module has no word for (SPF temperror) is not sent, so Rspamd
                does that check itself. Only the gateway may reach Rspamd's normal worker
                when the module is on: whoever can send these headers can claim a pass.

Settings-ID / Settings were considered for the same purpose: they can only switch
Rspamd's checks off (their scores would be lost), not feed it results.

The JSON reply is decoded with msgspec into `SpamResult`: the total `score`, Rspamd's own
`required_score` (its reject threshold) and `action`, the symbols that fired with their
scores, the Message-ID Rspamd saw. `forced` is Rspamd's `is_skipped`: the message was settled
before scoring (GTUBE, a force_actions rule, a settings "skip"); the action is then what
counts, and `score` is just the threshold of that action.

Errors: a refused or reset connection, a timeout (`timeout` covers the whole request,
connect to last byte), an HTTP status other than 200, an unparsable or incomplete JSON body,
or a body with an "error" member all raise `SpamScanError` (the message says which, for
logs; never for the SMTP peer). A message larger than `max_size` is not sent at all: the
result is `SpamResult.not_scanned("too large")` (`skipped` set), so huge mail costs neither
Rspamd's time nor ours; Rspamd has its own limit (`max_message`, 50 MiB by default).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from multidict import CIMultiDict

__all__ = ["RspamdClient", "SpamResult", "SpamScanError"]

DEFAULT_CONNECTIONS = 32


class SpamScanError(Exception):
    """The scanner gave no usable answer (down, slow, broken); the message is unscanned."""


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
        "none": "na", "permerror": "permfail"}  # temperror: no word; Rspamd checks itself
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


class RspamdClient:
    """Scans messages with Rspamd over HTTP (`POST {base_url}/checkv2`).

    `timeout` bounds one whole request (seconds); `max_size` is the largest message sent
    (bytes; larger ones are not scanned); `password` is sent as the `Password` header
    (only needed for a controller worker with a password); `connections` caps concurrent
    connections.
    """

    def __init__(self, base_url: str, *, timeout: float, max_size: int,
                 password: str | None = None,
                 connections: int = DEFAULT_CONNECTIONS) -> None:
        if timeout <= 0 or max_size <= 0 or connections <= 0:
            raise ValueError("timeout, max_size and connections must be positive")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_size = max_size
        self._url = self.base_url + "/checkv2"
        self._password = password
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise SpamScanError("client closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connections,
                                               ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": "mailedge"},
                auto_decompress=False, raise_for_status=False,
            )
        return self._session

    def headers(self, *, ip: str | None, helo: str | None, sender: str,
                recipients: Sequence[str], hostname: str | None = None,
                user: str | None = None, queue_id: str | None = None,
                mta_name: str | None = None, spf: str | None = None,
                dkim: str | Sequence[tuple[str, str]] | None = None,
                dmarc: str | None = None) -> CIMultiDict[str]:
        """The request headers `check()` sends (see the module docstring)."""
        headers: CIMultiDict[str] = CIMultiDict()
        if ip:
            headers["IP"] = _clean(ip)
        if helo:
            headers["Helo"] = _clean(helo)
        if hostname:
            headers["Hostname"] = _clean(hostname)
        envelope_from = _ascii_address(sender) if sender else None
        headers["From"] = envelope_from or "<>"
        for recipient in recipients:
            ascii_recipient = _ascii_address(recipient)
            if ascii_recipient:
                headers.add("Rcpt", ascii_recipient)
        if user:
            headers["User"] = _clean(user)
        if queue_id:
            headers["Queue-Id"] = _clean(queue_id)
        if mta_name:
            headers["MTA-Name"] = _clean(mta_name)
        if self._password:
            headers["Password"] = _clean(self._password)
        for name, value in (("SPF", spf and _spf_value(spf)),
                            ("DKIM", dkim and _dkim_value(dkim)),
                            ("DMARC", dmarc and _dmarc_value(dmarc))):
            if value:
                headers[name] = value
        return headers

    async def check(self, message: bytes, *, ip: str | None, helo: str | None, sender: str,
                    recipients: Sequence[str], hostname: str | None = None,
                    user: str | None = None, queue_id: str | None = None,
                    mta_name: str | None = None, spf: str | None = None,
                    dkim: str | Sequence[tuple[str, str]] | None = None,
                    dmarc: str | None = None) -> SpamResult:
        """Scan one message. Raises `SpamScanError` when Rspamd gives no usable answer.

        `spf` and `dmarc` are RFC 8601 result words ("pass", "fail", ...); `dkim` is one
        word or (result, domain) pairs, one per signature. None: let Rspamd check itself.
        """
        if len(message) > self.max_size:
            return SpamResult.not_scanned(f"too large ({len(message)} > {self.max_size} bytes)")
        headers = self.headers(ip=ip, helo=helo, sender=sender, recipients=recipients,
                               hostname=hostname, user=user, queue_id=queue_id,
                               mta_name=mta_name, spf=spf, dkim=dkim, dmarc=dmarc)
        session = self._get_session()
        try:
            async with session.post(self._url, data=message, headers=headers) as response:
                body = await response.read()
                status = response.status
        except TimeoutError:
            raise SpamScanError(f"timeout after {self.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise SpamScanError(f"{type(exc).__name__}: {exc}") from None
        except OSError as exc:
            raise SpamScanError(f"{type(exc).__name__}: {exc}") from None
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
            async with self._get_session().get(self.base_url + "/ping") as response:
                return response.status == 200 and (await response.read()).strip() == b"pong"
        except (TimeoutError, aiohttp.ClientError, OSError, SpamScanError):
            return False

    async def aclose(self) -> None:
        """Close the session and its connections; `check()` raises afterwards."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()
            # Let the transports finish closing (no ResourceWarning at interpreter exit).
            await asyncio.sleep(0)

    async def __aenter__(self) -> RspamdClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
