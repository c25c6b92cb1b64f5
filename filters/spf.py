"""SPF (RFC 7208) evaluation on mailedge's async DNS layer, with pyspf as the evaluator.

Theory of operation
-------------------
pyspf is a mature RFC 7208 evaluator (it passes the RFC 7208 and RFC 4408 test suites),
but it is synchronous: every lookup goes through the module-level function
`spf.DNSLookup`, which would do blocking DNS with dnspython. We keep pyspf's evaluator
and take its DNS away ("restart shim"):

1. At import, `spf.DNSLookup` is replaced, once, by `_served_lookup`. It never touches the
   network: it answers from the *answer store* of the evaluation running in the current
   context (a `ContextVar`, set only while pyspf runs). On a miss it records the wanted
   (name, type) in the store and raises `_NeedDns`, a `BaseException`, so that pyspf's
   `except TempError` / `except PermError` clauses let it through. Called outside an
   evaluation (someone using pyspf directly), it raises `spf.TempError`: a temperror,
   never a blocking query.
2. `check_spf` / `check_helo` drive *rounds*. A round runs a fresh
   `spf.query(...).check()` synchronously; it is pure CPU (a fraction of a millisecond)
   and stops at the first answer it does not have yet. If the run recorded no miss, its
   result is the result. Otherwise the driver awaits the missing queries through our
   `Resolver` — all misses of a round concurrently — stores each answer (or a temporary
   failure), and runs again from the start. pyspf wraps `exp=` (and, in harsh mode, `ptr`)
   in a bare `except:` that swallows `_NeedDns` and carries on; so a run that recorded a
   miss is never trusted, whatever it returned.
3. Fan-out: an MX answer starts the address lookups of its exchanges (pyspf looks up all
   of them, at most 10) and a PTR answer those of its names (likewise); when pyspf then
   misses one of them, the driver waits for the whole group, so an `mx` or `ptr`
   mechanism costs two rounds, not eleven. Prefetch (on by default): an SPF record's
   macro-free `include:`, `redirect=`, `exp=`, `a`, `mx` and `exists:` targets are looked up
   as soon as the record arrives, at most `PREFETCH_LIMIT` per evaluation, so a chain of
   includes resolves in parallel rather than one round-trip after another. At most
   `MAX_IN_FLIGHT` lookups of one evaluation are at the resolver at once (a record of
   ten `mx` terms may fan out to a hundred), and lookups still outstanding when the
   result is known are cancelled.
4. Bounds: at most `max_rounds` runs (`MAX_ROUNDS` = 30 by default; the worst legitimate
   evaluation — 10 DNS-querying terms, each an `mx` with 10 exchanges, plus `exp=` — needs
   about 22). Past it the result is temperror. RFC 7208's own limits (10 DNS-querying
   terms, 2 void lookups, 10 MX/PTR names) are enforced by pyspf in strict mode, as
   always. Time is bounded by the caller (the pipeline's filter timeout); cancelling
   `check_spf` cancels its lookups.

Mapping of `DnsResult` to what pyspf's hook returns (a list of ((name, type), data)):
TXT → a 1-tuple of bytes (the record's strings already concatenated; UTF-8, so any
non-ASCII text is a permerror in pyspf, as RFC 7208 §3.3 wants); A/AAAA → address
strings; MX → (preference, exchange); PTR → names. NXDOMAIN and NODATA are both an empty
list (both are "void lookups", RFC 7208 §4.6.4). `DnsTemporaryError` → `spf.TempError`,
so temperror (RFC 7208 §2.6.6), except in the PTR validation of `ptr` and `%{p}`, where
RFC 7208 §5.5 / §7.3 say an error skips the name (pyspf would give temperror there).
`DnsNameError` (a name that cannot be queried) → no such name: "none" for the checked
domain itself (RFC 7208 §4.3), permerror for an `include:` or `redirect=` target,
no match for `a`/`mx`/`exists`.

Every evaluation starts from an empty store: caching across messages is the DNS layer's
job (there is no result cache here), and the store makes the repeated runs cheap.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

import spf  # pyspf ships no type information (mypy override in pyproject)

from filters.dns import DnsNameError, DnsResult, DnsTemporaryError, Resolver

__all__ = [
    "MAX_IN_FLIGHT",
    "MAX_ROUNDS",
    "PREFETCH_LIMIT",
    "SpfIdentity",
    "SpfResult",
    "SpfResultCode",
    "check_helo",
    "check_spf",
]

log = logging.getLogger(__name__)

SpfResultCode = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
SpfIdentity = Literal["mailfrom", "helo"]

_RESULT_CODES: Final[frozenset[str]] = frozenset(
    ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
)

MAX_ROUNDS: Final = 30
PREFETCH_LIMIT: Final = 10
MAX_IN_FLIGHT: Final = 20  # lookups of one evaluation at the resolver at once
_FANOUT_LIMIT: Final = 10  # pyspf's MAX_MX / MAX_PTR in strict mode
_EXPLANATION_MAX: Final = 400  # leaves room for "550 5.7.23 " on a 512-octet reply line


# -- results ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpfResult:
    """The outcome of one check_host() (RFC 7208 §4) for one identity."""

    result: SpfResultCode
    domain: str  # the checked identity's domain (lowercase A-label when it is valid)
    identity: SpfIdentity
    sender: str  # the <sender> evaluated: local@domain (postmaster@helo for HELO/null sender)
    client_ip: str
    helo: str
    explanation: str = ""  # fail only: the domain's exp= text, or the default (ASCII)
    mechanism: str | None = None  # the matching term of the checked domain's record
    problem: str = ""  # permerror / temperror detail, for logs, never for the wire
    rounds: int = 0  # pyspf runs (restarts + 1)
    dns_queries: int = 0  # queries sent to the resolver (prefetches included)

    def auth_results_kwargs(self) -> dict[str, str]:
        """The pieces of an RFC 8601 `spf=` resinfo: method, result, property, value.

        property is "smtp.mailfrom" (value: the MAIL FROM identity, postmaster@helo for
        the null sender, RFC 7208 §2.4) or "smtp.helo" (value: the HELO name).
        """
        if self.identity == "helo":
            return {"method": "spf", "result": self.result,
                    "property": "smtp.helo", "value": self.helo}
        return {"method": "spf", "result": self.result,
                "property": "smtp.mailfrom", "value": self.sender}

    def resinfo(self) -> str:
        """`spf=<result> smtp.<identity>=<value>`, the value quoted when it must be."""
        kw = self.auth_results_kwargs()
        return f"spf={kw['result']} {kw['property']}={_pvalue(kw['value'])}"


_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]+")


def _pvalue(value: str) -> str:
    if value and _DOT_ATOM.fullmatch(value) and ".." not in value:
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


# -- the answer store and pyspf's DNS hook ------------------------------------------------

_Key = tuple[str, str]  # (lowercase name without final dot, type)
_Record = tuple[_Key, Any]  # what pyspf's DNSLookup yields


class _NeedDns(BaseException):
    """Raised inside pyspf when an answer is not in the store (not an Exception on
    purpose: pyspf's `except TempError/PermError` must not catch it)."""


@dataclass(frozen=True, slots=True)
class _Failure:
    """A stored temporary failure: pyspf sees spf.TempError for this (name, type)."""

    message: str


@dataclass(slots=True)
class _Store:
    answers: dict[_Key, tuple[_Record, ...] | _Failure] = field(default_factory=dict)
    missing: list[_Key] = field(default_factory=list)  # misses of the current run, in order

    def lookup(self, name: str, qtype: str) -> tuple[_Record, ...]:
        key = (_normal(name), qtype.upper())
        answer = self.answers.get(key)
        if answer is None:
            if key not in self.missing:
                self.missing.append(key)
            raise _NeedDns(key)
        if isinstance(answer, _Failure):
            raise spf.TempError(f"DNS {answer.message}")
        return answer


_current: contextvars.ContextVar[_Store | None] = contextvars.ContextVar(
    "mailedge_spf_store", default=None)


def _served_lookup(name: str, qtype: str, strict: object = True,
                   timeout: object = None) -> tuple[_Record, ...]:
    """pyspf's `DNSLookup`, served from the current evaluation's store (never the network)."""
    store = _current.get()
    if store is None:
        raise spf.TempError("DNS lookups outside mailedge's async SPF driver are disabled")
    return store.lookup(name, qtype)


def _install_hook() -> None:
    spf.DNSLookup = _served_lookup


_install_hook()


def _normal(name: str) -> str:
    return name.rstrip(".").lower()


def _to_pyspf(key: _Key, result: DnsResult) -> tuple[_Record, ...]:
    """Our DnsResult as pyspf's hook returns it (see the module docstring)."""
    if result.nxdomain or not result.records:
        return ()
    qtype = key[1]
    out: list[_Record] = []
    for text in result.records:
        data: Any
        if qtype in ("TXT", "SPF"):
            data = (text.encode("utf-8", "surrogateescape"),)
        elif qtype == "MX":
            pref, _, exchange = text.strip().partition(" ")
            try:
                data = (int(pref), exchange.strip().rstrip("."))
            except ValueError:
                log.warning("spf: ignoring malformed MX record %r for %s", text, key[0])
                continue
        elif qtype == "PTR":
            data = text.rstrip(".")
        else:
            data = text
        out.append((key, data))
    return tuple(out)


class _Query(spf.query):  # type: ignore[misc]  # pyspf is untyped
    """pyspf's query, with RFC 7208 §5.5 / §7.3 error handling in PTR validation: a DNS
    error on the PTR lookup means no validated names, and one on a name's address lookup
    skips that name (pyspf turns both into temperror for the whole check)."""

    _validating = 0

    def validated_ptrs(self) -> list[str]:
        self._validating += 1
        try:
            names: list[str] = super().validated_ptrs()
            return names
        finally:
            self._validating -= 1

    def dns_ptr(self, i: str) -> list[str]:
        try:
            names: list[str] = super().dns_ptr(i)
            return names
        except spf.TempError:
            return []

    def dns_a(self, domainname: str, A: str = "A") -> list[str]:  # pyspf names A
        try:
            addresses: list[str] = super().dns_a(domainname, A)
            return addresses
        except spf.TempError:
            if self._validating:
                return []
            raise


# -- the async driver --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Identity:
    kind: SpfIdentity
    sender: str  # local@domain as pyspf should see it
    local: str
    domain: str


@dataclass(frozen=True, slots=True)
class _Outcome:
    result: str
    explanation: str
    mechanism: str | None


class _Evaluation:
    """One check_host(): the store, the lookups in flight, and the rounds."""

    def __init__(self, resolver: Resolver, *, ip: str, address_type: str,
                 prefetch: bool) -> None:
        self.resolver = resolver
        self.ip = ip
        self.address_type = address_type
        self.prefetch = prefetch
        self.store = _Store()
        self.inflight: dict[_Key, asyncio.Task[tuple[_Record, ...] | _Failure]] = {}
        self.groups: dict[_Key, tuple[_Key, ...]] = {}  # fan-out member -> its whole group
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.speculative = 0
        self.queries = 0
        self.rounds = 0

    # lookups

    def start(self, key: _Key) -> None:
        if key in self.store.answers or key in self.inflight:
            return
        self.inflight[key] = asyncio.create_task(self._query(key))

    async def _query(self, key: _Key) -> tuple[_Record, ...] | _Failure:
        name, qtype = key
        try:
            async with self.slots:
                self.queries += 1
                result = await self.resolver.query(name, qtype)
        except DnsTemporaryError as exc:
            return _Failure(str(exc) or "temporary failure")
        except DnsNameError:
            return ()  # cannot exist: treated as a name that does not exist
        return _to_pyspf(key, result)

    async def fetch(self, keys: Iterable[_Key]) -> None:
        """Await `keys` (and their fan-out groups) concurrently, then store every answer
        that has arrived by then, in flight or not, and start what those answers hint."""
        wanted: set[_Key] = set()
        for key in keys:
            wanted.update(self.groups.get(key, (key,)))
        for key in wanted:
            self.start(key)
        waiting = [self.inflight[k] for k in wanted if k in self.inflight]
        if waiting:
            await asyncio.wait(waiting)
        for key, task in list(self.inflight.items()):
            if task.done():
                del self.inflight[key]
                answer = task.result()  # _query returns failures; other errors propagate
                self.store.answers[key] = answer
                if not isinstance(answer, _Failure):
                    self._hint(key, answer)

    def _hint(self, key: _Key, answer: tuple[_Record, ...]) -> None:
        name, qtype = key
        if qtype in ("MX", "PTR"):
            if qtype == "MX":
                if len(answer) > _FANOUT_LIMIT:
                    return  # pyspf: permerror, no address lookups
                targets = [exchange for _, (_, exchange) in sorted(answer, key=_mx_order)]
            else:
                targets = [data for _, data in answer[:_FANOUT_LIMIT]]
            group = tuple(dict.fromkeys(
                (_normal(t), self.address_type) for t in targets if _queryable(t)))
            for member in group:
                self.groups.setdefault(member, group)
                self.start(member)
            return
        if qtype == "TXT" and self.prefetch:
            records = [data[0] for _, data in answer if data and _SPF_VERSION.match(data[0])]
            if len(records) == 1:
                for target in _record_targets(name, records[0], self.address_type):
                    if self.speculative >= PREFETCH_LIMIT:
                        return
                    if target not in self.store.answers and target not in self.inflight:
                        self.speculative += 1
                        self.start(target)

    async def close(self) -> None:
        """Cancel what is still in flight and collect it (no background work survives)."""
        tasks = list(self.inflight.values())
        self.inflight.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # rounds

    def run(self, ident: _Identity, helo: str, receiver: str,
            default_explanation: str | None) -> _Outcome | None:
        """One synchronous pyspf run; None when it needed answers the store lacks."""
        self.rounds += 1
        store = self.store
        store.missing.clear()
        query = _Query(i=self.ip, s=ident.sender, h=helo, receiver=receiver or None,
                       strict=True)
        # pyspf splits the sender at its first "@"; ours is split at the last one.
        query.l, query.o, query.d = ident.local, ident.domain, ident.domain
        if default_explanation is not None:
            query.set_default_explanation(default_explanation)
        token = _current.set(store)
        try:
            result, _code, text = query.check()
        except _NeedDns:
            return None
        finally:
            _current.reset(token)
        if store.missing:  # a miss swallowed by one of pyspf's bare excepts
            return None
        return _Outcome(str(result), str(text), query.mechanism)


def _mx_order(record: _Record) -> tuple[int, str]:
    pref, exchange = record[1]
    return int(pref), str(exchange)


_SPF_VERSION = re.compile(rb"v=spf1( |$)", re.IGNORECASE)
_QUALIFIERS = "+-~?"


def _record_targets(domain: str, record: bytes, address_type: str) -> Iterator[_Key]:
    """Lookups an SPF record will (probably) ask for, from its macro-free terms: a hint
    only — pyspf does the real parsing and counting."""
    try:
        text = record.decode("ascii")
    except UnicodeDecodeError:
        return
    for term in text.split(" ")[1:]:
        if not term or "%" in term:
            continue
        lowered = term.lower()
        for modifier in ("redirect=", "exp="):
            if lowered.startswith(modifier):
                target = term[len(modifier):]
                if _queryable(target):
                    yield (_normal(target), "TXT")
                break
        else:
            if lowered[0] in _QUALIFIERS:
                lowered, term = lowered[1:], term[1:]
            mechanism, _, rest = lowered.partition(":")
            mechanism = mechanism.split("/", 1)[0]
            target = term.partition(":")[2].split("/", 1)[0] if rest else domain
            qtype = {"include": "TXT", "a": address_type, "mx": "MX",
                     "exists": "A"}.get(mechanism)
            if qtype is not None and (rest or mechanism in ("a", "mx")) and _queryable(target):
                yield (_normal(target), qtype)


def _queryable(name: str) -> bool:
    name = name.rstrip(".")
    if not name or len(name) > 253 or not name.isascii():
        return False
    return all(0 < len(label) < 64 for label in name.split("."))


# -- identities ------------------------------------------------------------------------


def _a_label(domain: str) -> str | None:
    """The lowercase A-label form of a domain, or None when it is not a usable FQDN."""
    domain = domain.strip().rstrip(".")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    domain = domain.lower()
    return domain if _queryable(domain) else None


def _is_fqdn(domain: str | None) -> bool:
    """RFC 7208 §2.3: the HELO check is only done for a fully qualified domain name."""
    if not domain or "." not in domain:
        return False
    return not domain.rsplit(".", 1)[1].isdigit()  # rules out IPv4 literals written bare


def _address_type(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"not an IP address: {ip!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is None:
        return "AAAA"
    return "A"


def _explanation(text: str) -> str:
    cleaned = "".join(c if " " <= c <= "~" else " " for c in text).strip()
    return cleaned[:_EXPLANATION_MAX]


async def _evaluate(resolver: Resolver, ident: _Identity, *, ip: str, address_type: str,
                    helo: str, receiver: str, default_explanation: str | None,
                    prefetch: bool, max_rounds: int) -> SpfResult:
    ev = _Evaluation(resolver, ip=ip, address_type=address_type, prefetch=prefetch)
    outcome: _Outcome | None = None
    try:
        while True:
            try:
                outcome = ev.run(ident, helo, receiver, default_explanation)
            except Exception as exc:  # a pyspf bug on odd input must not crash the check
                log.warning("spf: pyspf failed on %s for %s: %r", ident.domain, ip, exc,
                            exc_info=True)
                outcome = _Outcome("temperror", f"SPF evaluation failed: {exc!r}", None)
            if outcome is not None:
                break
            if ev.rounds >= max_rounds:
                outcome = _Outcome(
                    "temperror", f"SPF evaluation needed more than {max_rounds} DNS rounds",
                    None)
                break
            await ev.fetch(list(ev.store.missing))
    finally:
        await ev.close()
    result = outcome.result if outcome.result in _RESULT_CODES else "permerror"
    return SpfResult(
        result=result,  # type: ignore[arg-type]  # narrowed by _RESULT_CODES
        domain=ident.domain,
        identity=ident.kind,
        sender=ident.sender,
        client_ip=ip,
        helo=helo,
        explanation=_explanation(outcome.explanation) if result == "fail" else "",
        mechanism=outcome.mechanism if result not in ("temperror", "permerror") else None,
        problem=outcome.explanation if result in ("temperror", "permerror") else "",
        rounds=ev.rounds,
        dns_queries=ev.queries,
    )


def _helo_identity(helo: str, kind: SpfIdentity) -> _Identity | SpfResult:
    """postmaster@<helo> as the identity to check, or "none" when the HELO name is not a
    fully qualified domain name (RFC 7208 §2.3; an address literal, a bare word)."""
    domain = _a_label(helo) if helo and not helo.startswith("[") else None
    if domain is None or not _is_fqdn(domain):
        return SpfResult(result="none", domain=(domain or helo).lower(), identity=kind,
                         sender=f"postmaster@{helo}", client_ip="", helo=helo,
                         problem="HELO name is not a fully qualified domain name")
    return _Identity(kind, f"postmaster@{domain}", "postmaster", domain)


def _mailfrom_identity(sender: str) -> _Identity | SpfResult:
    local, at, raw_domain = sender.rpartition("@")
    if not at:
        local, raw_domain = "postmaster", sender  # no "@" at all: pyspf's reading
    local = local or "postmaster"  # RFC 7208 §4.3
    domain = _a_label(raw_domain)
    if domain is None:  # RFC 7208 §4.3: a malformed domain gives "none"
        return SpfResult(result="none", domain=raw_domain.lower(), identity="mailfrom",
                         sender=sender, client_ip="", helo="",
                         problem="sender domain is not a valid domain name")
    return _Identity("mailfrom", f"{local}@{domain}", local, domain)


async def check_spf(resolver: Resolver, *, ip: str, sender: str, helo: str, receiver: str,
                    default_explanation: str | None = None, prefetch: bool = True,
                    max_rounds: int = MAX_ROUNDS) -> SpfResult:
    """check_host() for the MAIL FROM identity (RFC 7208 §2.4).

    `sender` is the reverse-path without angle brackets. For the null sender ("") the
    MAIL FROM identity is postmaster@<helo> (RFC 7208 §2.4) — the same evaluation as
    check_helo, reported as smtp.mailfrom — and "none" when the HELO name is not a FQDN.
    `ip` is the SMTP client's address (IPv4-mapped IPv6 counts as IPv4); `receiver` is our
    host name (the %{r} macro). `default_explanation` replaces pyspf's explanation for
    fail results of records without exp=. `prefetch` and `max_rounds`: see the module
    docstring. Raises ValueError for an `ip` that is not an IP address; DNS trouble is a
    temperror result, never an exception.
    """
    ident = _helo_identity(helo, "mailfrom") if not sender else _mailfrom_identity(sender)
    return await _check(resolver, ident, ip=ip, helo=helo, receiver=receiver,
                        default_explanation=default_explanation, prefetch=prefetch,
                        max_rounds=max_rounds)


async def check_helo(resolver: Resolver, *, ip: str, helo: str, receiver: str,
                     default_explanation: str | None = None, prefetch: bool = True,
                     max_rounds: int = MAX_ROUNDS) -> SpfResult:
    """check_host() for the HELO identity (RFC 7208 §2.3): <domain> is the HELO name,
    <sender> postmaster@<helo>; "none", without any lookup, when the HELO name is not a
    fully qualified domain name. Same keywords and errors as check_spf."""
    return await _check(resolver, _helo_identity(helo, "helo"), ip=ip, helo=helo,
                        receiver=receiver, default_explanation=default_explanation,
                        prefetch=prefetch, max_rounds=max_rounds)


async def _check(resolver: Resolver, ident: _Identity | SpfResult, *, ip: str, helo: str,
                 receiver: str, default_explanation: str | None, prefetch: bool,
                 max_rounds: int) -> SpfResult:
    address_type = _address_type(ip)
    if isinstance(ident, SpfResult):
        return replace(ident, client_ip=ip, helo=helo)
    if spf.DNSLookup is not _served_lookup:
        raise RuntimeError("spf.DNSLookup was replaced: pyspf would do blocking DNS")
    return await _evaluate(resolver, ident, ip=ip, address_type=address_type, helo=helo,
                           receiver=receiver, default_explanation=default_explanation,
                           prefetch=prefetch, max_rounds=max_rounds)
