"""The one async DNS layer every lookup in mailedge goes through (SPF, DKIM, DMARC, ARC,
DNSBLs, MX).

Interface (what the checks may rely on):

* `await resolver.query(name, rdtype)` returns a `DnsResult`:
  - `records`: the answer in a simple text form — TXT: one string per record, its
    character-strings concatenated (RFC 7208 §3.3, RFC 6376 §3.6.2.2); A/AAAA: the
    addresses; MX: "preference exchange" with the exchange lowercased and without the
    final dot; PTR/CNAME/NS: names without the final dot;
  - `nxdomain`: the name does not exist (NXDOMAIN);
  - empty `records` and not `nxdomain`: the name exists but has no such records
    (NODATA / "no answer");
  - `ttl`: seconds the answer may be cached.
* A failure to get an answer — SERVFAIL, REFUSED, timeout, no nameserver reachable —
  raises `DnsTemporaryError` (an SPF/DKIM/DMARC temperror; never a permanent verdict).
* A name that cannot be queried at all (empty label, over 253 octets) raises
  `DnsNameError` (a permerror for the caller).

`AsyncResolver` implements it over dnspython's asyncio resolver with a cache that
honours TTLs (capped), negative caching of NXDOMAIN/NODATA (RFC 2308, from the SOA
minimum, capped), single-flight per (name, type), per-query timeouts, and the
nameservers from `[dns] nameservers` (host:port) or the system's resolv.conf.

Theory of operation (`AsyncResolver`)
-------------------------------------
Names are normalised before anything else: a U-label name is encoded to A-labels (IDNA),
the name is made absolute and lowercased; `DnsResult.name` is that form without the final
dot, and it is also the cache key together with the type. An empty name, an empty label,
a label over 63 octets or a name over 255 octets on the wire raises `DnsNameError` at
once, without a query. An unknown or meta type (ANY, AXFR) is a programming error:
`ValueError`.

Life of a cache entry per (name, type)::

    absent ── query() ──► in flight (one dnspython resolve, in its own task) ──┐
      ▲                      every query() meanwhile awaits the same task       │
      │                                                                         ▼
      │        answer (ttl > 0) ──► positive entry, ttl = min(RRset/CNAME TTLs, max_ttl)
      │        NXDOMAIN / NODATA ──► negative entry, ttl = min(SOA TTL, SOA minimum,
      │                              CNAME TTLs, max_negative_ttl); no SOA: not stored
      │        temporary error ────► error entry for error_ttl seconds (2 s by default)
      │        ttl 0 ──────────────► returned to the callers of this fetch, not stored
      └── expired (clock() >= expires_at), clear(), LRU eviction (cache_size entries)

* A cache hit returns the stored result with `ttl` set to the seconds it has left
  (rounded up), like a recursive resolver counts TTLs down.
* Temporary errors are cached briefly (`error_ttl`, default 2 s; 0 turns it off) so that
  the SPF, DMARC and DKIM checks of one message, and the sessions arriving in the same
  second, do not each wait a full timeout on a sick server. Every caller gets its own
  `DnsTemporaryError`; the next query after `error_ttl` asks again. There is no
  serve-stale: an expired answer is never returned in place of an error.
* Single-flight: the fetch runs in its own task and callers await it through
  `asyncio.shield`, so a caller that is cancelled (its session timed out) stops waiting
  while the fetch goes on for the others and still fills the cache.
* Timeouts: `timeout` is the budget of one query, all attempts and nameservers included
  (`[dns] timeout`). Each attempt to one nameserver may take `timeout / attempts`;
  dnspython moves on to the next nameserver or round until the budget is spent, and an
  `asyncio.timeout(timeout)` around the whole resolve guarantees the bound. A nameserver
  that refuses the connection (ICMP port unreachable), answers SERVFAIL, REFUSED or
  FORMERR, or sends something unparsable is dropped for the rest of that query; when none
  is left the query fails at once (`NoNameservers`), without waiting for the budget.
* Error mapping: NXDOMAIN -> `DnsResult(nxdomain=True)`; NOERROR without the type (NODATA)
  -> empty `records`; SERVFAIL, REFUSED, FORMERR, garbage, timeouts, unreachable
  nameservers, YXDOMAIN, an over-long CNAME chain and a referral (NOERROR, not
  authoritative, no answer, no SOA, NS records in the authority section: a nameserver that
  is not a recursive resolver) -> `DnsTemporaryError`.
* Records in text form: TXT - the RR's character-strings joined as bytes and decoded as
  UTF-8 with errors="replace" (SPF and DKIM records are ASCII; a stray byte becomes
  U+FFFD, which their parsers reject as a syntax error, i.e. a permerror, as they should);
  A/AAAA - the address in its canonical text (IPv6 compressed, lowercase); MX -
  "preference exchange"; PTR, CNAME, NS, DNAME - the target; all names lowercase, without
  the final dot, escaped as in a zone file (`\\032` for a space); the root as "." (so a
  null MX, RFC 7505, is "0 ."). Other types: dnspython's presentation format. Records
  keep the order the server sent. CNAMEs are followed by the recursive resolver: the
  records are those of the end of the chain, `name` stays the name asked for.
* Counters, plain ints for the metrics exporter (also `stats()`): `hits` (answered from
  the cache, cached errors included), `misses` (not in the cache: started or joined a
  fetch), `queries` (fetches sent upstream), `errors` (fetches that ended in a temporary
  error), `evictions` (LRU).
* Nothing here blocks the event loop: dnspython's asyncio backend does all network I/O.
  Only the constructor reads /etc/resolv.conf (when no nameservers are given), once.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.resolver

__all__ = [
    "AsyncResolver",
    "DnsError",
    "DnsNameError",
    "DnsResult",
    "DnsTemporaryError",
    "Resolver",
    "parse_nameservers",
]


class DnsError(Exception):
    """Base of the DNS layer's errors."""


class DnsTemporaryError(DnsError):
    """No answer now (SERVFAIL, REFUSED, timeout, unreachable): try again later."""


class DnsNameError(DnsError):
    """The name cannot be looked up at all (malformed)."""


@dataclass(frozen=True, slots=True)
class DnsResult:
    name: str
    rdtype: str
    records: tuple[str, ...] = ()
    ttl: int = 0
    nxdomain: bool = False

    @property
    def exists(self) -> bool:
        return not self.nxdomain


class Resolver(Protocol):
    async def query(self, name: str, rdtype: str) -> DnsResult:
        """Look `name` up; raises DnsTemporaryError or DnsNameError."""
        ...


# -- configuration strings ------------------------------------------------------------

DEFAULT_PORT = 53


def parse_nameservers(items: Sequence[str]) -> list[tuple[str, int]]:
    """Parse `[dns] nameservers` strings into (ip, port) pairs.

    Accepted: "10.0.0.1", "127.0.0.1:5353", "::1", "[::1]", "[::1]:53" (port 53 unless
    given). Nameservers must be IP addresses: a resolver cannot look its own nameservers
    up. Raises `ValueError` naming the first item that is not one of these forms.
    """
    if isinstance(items, str):
        raise TypeError("parse_nameservers takes a sequence of strings, not one string")
    return [_parse_nameserver(item) for item in items]


def _parse_nameserver(item: str) -> tuple[str, int]:
    text = item.strip() if isinstance(item, str) else ""
    host, port_text = text, None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"nameserver {item!r}: no closing bracket")
        host, rest = text[1:close], text[close + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"nameserver {item!r}: expected [address]:port")
            port_text = rest[1:]
        if ":" not in host:
            raise ValueError(f"nameserver {item!r}: brackets are for IPv6 addresses")
    elif text.count(":") == 1:  # IPv4 (or a name) with a port; IPv6 has two or more
        host, port_text = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        message = f"nameserver {item!r}: not an IP address (with an optional port)"
        raise ValueError(message) from None
    port = DEFAULT_PORT
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
            raise ValueError(f"nameserver {item!r}: the port must be 1-65535")
        port = int(port_text)
    return str(address), port


# -- the resolver -----------------------------------------------------------------------

Clock = Callable[[], float]
#: EDNS(0) UDP payload size (the DNS flag day 2020 value); larger answers come over TCP.
EDNS_PAYLOAD = 1232

_NAME_ERRORS: tuple[type[Exception], ...] = (
    dns.exception.DNSException,  # EmptyLabel, LabelTooLong, NameTooLong, BadEscape, IDNA
    UnicodeError,
    ValueError,
)


@dataclass(frozen=True, slots=True)
class _Entry:
    result: DnsResult | None  # None: a cached temporary error
    error: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Outcome:
    result: DnsResult | None
    error: str = ""


class AsyncResolver:
    """`Resolver` over dnspython's asyncio stub resolver, with a TTL cache.

    `nameservers`: (IP, port) pairs, asked in order; None: the system's resolv.conf.
    `timeout`: seconds one `query` may take at most, all attempts included; `attempts`:
    tries per nameserver within it. `max_ttl` and `max_negative_ttl` cap what positive
    and negative answers are cached for; `error_ttl` is how long a temporary error is
    remembered (0: not at all). `cache_size`: LRU capacity in entries. `clock`: a
    monotonic clock for the cache (tests pass a fake one).
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] | None = None,
        *,
        timeout: float = 2.0,
        attempts: int = 2,
        cache_size: int = 50_000,
        max_ttl: int = 3600,
        max_negative_ttl: int = 900,
        error_ttl: float = 2.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds: {timeout!r}")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1: {attempts!r}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0: {cache_size!r}")
        if max_ttl < 0 or max_negative_ttl < 0:
            raise ValueError("max_ttl and max_negative_ttl must be >= 0")
        if not (math.isfinite(error_ttl) and error_ttl >= 0):
            raise ValueError(f"error_ttl must be >= 0: {error_ttl!r}")
        if nameservers is not None:
            if not nameservers:
                raise ValueError("nameservers is empty (pass None for the system's resolv.conf)")
            servers: list[dns.nameserver.Nameserver] = []
            for host, port in nameservers:
                try:
                    address = str(ipaddress.ip_address(host))
                except ValueError:
                    raise ValueError(f"nameserver {host!r} is not an IP address") from None
                if not 0 < port < 65536:
                    raise ValueError(f"nameserver port {port!r} is not 1-65535")
                servers.append(dns.nameserver.Do53Nameserver(address, port))
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = servers
        else:
            try:
                resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.exception.DNSException as exc:  # NoResolverConfiguration
                raise DnsError(f"no nameservers configured in resolv.conf: {exc}") from exc
        resolver.cache = None  # ours is below
        resolver.retry_servfail = False
        resolver.rotate = False
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        resolver.timeout = timeout / attempts
        resolver.lifetime = timeout
        self._resolver = resolver
        self._timeout = timeout
        self._cache_size = cache_size
        self._max_ttl = max_ttl
        self._max_negative_ttl = max_negative_ttl
        self._error_ttl = error_ttl
        self._clock = clock
        self._cache: OrderedDict[tuple[str, int], _Entry] = OrderedDict()
        self._inflight: dict[tuple[str, int], asyncio.Task[_Outcome]] = {}
        self._generation = 0
        self.hits = 0
        self.misses = 0
        self.queries = 0
        self.errors = 0
        self.evictions = 0

    # ------------------------------------------------------------------ inspection

    @property
    def nameservers(self) -> tuple[tuple[str, int], ...]:
        """The (address, port) pairs asked, in order."""
        pairs: list[tuple[str, int]] = []
        for server in self._resolver.nameservers:
            if isinstance(server, dns.nameserver.AddressAndPortNameserver):
                pairs.append((server.address, server.port))
            elif isinstance(server, str):
                pairs.append((server, self._resolver.port))
        return tuple(pairs)

    @property
    def timeout(self) -> float:
        """The most seconds one `query` takes, all attempts included."""
        return self._timeout

    @property
    def in_flight(self) -> int:
        """Fetches running now."""
        return len(self._inflight)

    def __len__(self) -> int:
        """Entries in the cache (expired ones included until they are next touched)."""
        return len(self._cache)

    def stats(self) -> dict[str, int]:
        """The counters, for a metrics exporter."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "queries": self.queries,
            "errors": self.errors,
            "evictions": self.evictions,
            "entries": len(self._cache),
            "in_flight": len(self._inflight),
        }

    def clear(self) -> None:
        """Forget every cached entry; fetches in flight still answer their callers but
        store nothing."""
        self._cache.clear()
        self._generation += 1

    async def aclose(self) -> None:
        """Cancel the fetches in flight (their callers get CancelledError)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---------------------------------------------------------------------- lookup

    async def query(self, name: str, rdtype: str) -> DnsResult:
        """Look `name` up; raises DnsTemporaryError or DnsNameError (see the module)."""
        key_name, qname = _normalise_name(name)
        type_code = _rdtype(rdtype)
        key = (key_name, int(type_code))
        entry = self._cache.get(key)
        if entry is not None:
            now = self._clock()
            if now < entry.expires_at:
                self._cache.move_to_end(key)
                self.hits += 1
                if entry.result is None:
                    raise DnsTemporaryError(entry.error)
                left = min(entry.result.ttl, max(1, math.ceil(entry.expires_at - now)))
                return replace(entry.result, ttl=left)
            del self._cache[key]
        self.misses += 1
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._fetch(key, qname, type_code), name=f"dns {key_name} {rdtype}"
            )
            self._inflight[key] = task
            task.add_done_callback(self._fetch_done(key))
        outcome = await asyncio.shield(task)
        if outcome.result is None:
            raise DnsTemporaryError(outcome.error)
        return outcome.result

    def _fetch_done(self, key: tuple[str, int]) -> Callable[[asyncio.Task[_Outcome]], None]:
        def done(task: asyncio.Task[_Outcome]) -> None:
            if self._inflight.get(key) is task:
                del self._inflight[key]
            if not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" noise if all left
        return done

    async def _fetch(
        self, key: tuple[str, int], qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> _Outcome:
        generation = self._generation
        self.queries += 1
        name_text, type_text = key[0], dns.rdatatype.to_text(rdtype)
        try:
            result = await self._resolve(name_text, qname, rdtype, type_text)
        except DnsTemporaryError as exc:
            self.errors += 1
            message = str(exc)
            if self._error_ttl > 0 and generation == self._generation:
                self._store(key, _Entry(None, message, self._clock() + self._error_ttl))
            return _Outcome(None, message)
        if result.ttl > 0 and generation == self._generation:
            self._store(key, _Entry(result, "", self._clock() + result.ttl))
        return _Outcome(result)

    def _store(self, key: tuple[str, int], entry: _Entry) -> None:
        if self._cache_size == 0:
            return
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
            self.evictions += 1

    async def _resolve(
        self,
        name: str,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        type_text: str,
    ) -> DnsResult:
        what = f"{name} {type_text}"
        try:
            async with asyncio.timeout(self._timeout):
                answer = await self._resolver.resolve(
                    qname, rdtype, raise_on_no_answer=False, search=False,
                    lifetime=self._timeout,
                )
        except dns.resolver.NXDOMAIN as exc:
            responses: dict[dns.name.Name, dns.message.Message] = exc.kwargs.get(
                "responses"
            ) or {}
            response = responses.get(qname) or next(iter(responses.values()), None)
            ttl = self._negative_ttl(response)
            return DnsResult(name, type_text, (), ttl, nxdomain=True)
        except (TimeoutError, dns.exception.Timeout):
            raise DnsTemporaryError(f"{what}: no answer within {self._timeout:g}s") from None
        except dns.resolver.NoNameservers as exc:
            raise DnsTemporaryError(f"{what}: {_describe_failures(exc)}") from None
        except dns.resolver.YXDOMAIN:
            message = f"{what}: YXDOMAIN (DNAME substitution too long)"
            raise DnsTemporaryError(message) from None
        except dns.exception.DNSException as exc:  # ChainTooLong, AnswerForNXDOMAIN, ...
            raise DnsTemporaryError(f"{what}: {type(exc).__name__}: {exc}") from None
        response = answer.response
        if answer.rrset is None:
            if _is_referral(response):
                raise DnsTemporaryError(
                    f"{what}: the nameserver answered with a referral (not a recursive "
                    f"resolver?)"
                )
            return DnsResult(name, type_text, (), self._negative_ttl(response))
        records = tuple(_rdata_text(rdata) for rdata in answer.rrset)
        ttl = min(answer.chaining_result.minimum_ttl, self._max_ttl)
        return DnsResult(name, type_text, records, max(0, ttl))

    def _negative_ttl(self, response: dns.message.Message | None) -> int:
        """RFC 2308: min(SOA TTL, SOA minimum, CNAME TTLs), capped; 0 without an SOA."""
        if response is None:
            return 0
        ttls: list[int] = []
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset) > 0:
                soa = rrset[0]
                ttls += [rrset.ttl, int(soa.minimum)]
                break
        if not ttls:
            return 0
        ttls += [rrset.ttl for rrset in response.answer if rrset.rdtype == dns.rdatatype.CNAME]
        return max(0, min(*ttls, self._max_negative_ttl))


@functools.lru_cache(maxsize=8192)  # the same names recur; dnspython's parse is not cheap
def _normalise_name(name: str) -> tuple[str, dns.name.Name]:
    """(lowercase text without the final dot, absolute dnspython name), or DnsNameError.

    Memoised: a cache hit in `query` was mostly this parse (dns.name.Name is immutable,
    so sharing one is safe; errors are raised again each time, never cached).
    """
    if not isinstance(name, str):
        raise TypeError(f"a DNS name is a str, not {type(name).__name__}")
    if name in ("", "."):
        raise DnsNameError("empty DNS name")
    try:
        qname = dns.name.from_text(name, origin=dns.name.root).canonicalize()
        qname.to_wire()  # checks the length of names built from U-labels too
    except _NAME_ERRORS as exc:
        raise DnsNameError(f"cannot look up {name!r}: {exc}") from None
    return qname.to_text(omit_final_dot=True), qname


@functools.lru_cache(maxsize=64)
def _rdtype(rdtype: str) -> dns.rdatatype.RdataType:
    try:
        code = dns.rdatatype.RdataType.make(rdtype.upper().strip())
    except (dns.exception.DNSException, ValueError, AttributeError):
        raise ValueError(f"unknown DNS record type {rdtype!r}") from None
    if dns.rdatatype.is_metatype(code):
        raise ValueError(f"{rdtype!r} is a meta type, not a record type")
    return code


def _name_text(name: dns.name.Name) -> str:
    return name.canonicalize().to_text(omit_final_dot=True)


def _rdata_text(rdata: dns.rdata.Rdata) -> str:
    rdtype = rdata.rdtype
    if rdtype == dns.rdatatype.TXT:
        return b"".join(rdata.strings).decode("utf-8", "replace")  # type: ignore[attr-defined]
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return str(ipaddress.ip_address(rdata.address))  # type: ignore[attr-defined]
    if rdtype == dns.rdatatype.MX:
        return f"{rdata.preference} {_name_text(rdata.exchange)}"  # type: ignore[attr-defined]
    if rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME, dns.rdatatype.NS,
                  dns.rdatatype.DNAME):
        return _name_text(rdata.target)  # type: ignore[attr-defined]
    return rdata.to_text()


def _is_referral(response: dns.message.Message) -> bool:
    if response.flags & dns.flags.AA:
        return False
    types = {rrset.rdtype for rrset in response.authority}
    return dns.rdatatype.SOA not in types and dns.rdatatype.NS in types


_NAMESERVER_TEXT = re.compile(r"^(?:[A-Za-z0-9]+:)?(.*?)(?:@\d+)?$")


def _describe_failures(exc: dns.resolver.NoNameservers) -> str:
    """One line per nameserver: what went wrong ("127.0.0.1:53 SERVFAIL")."""
    errors = exc.kwargs.get("errors") or []
    parts: list[str] = []
    for server, _tcp, port, error, response in errors:
        if isinstance(response, dns.message.Message):
            what = dns.rcode.to_text(response.rcode())
        elif isinstance(error, OSError):
            what = error.strerror or type(error).__name__
        else:
            what = type(error).__name__
        address = _NAMESERVER_TEXT.sub(r"\1", str(server))  # "Do53:127.0.0.1@53"
        host = f"[{address}]" if ":" in address else address
        parts.append(f"{host}:{port} {what}")
    return "no nameserver answered: " + ("; ".join(parts) if parts else "none left")
