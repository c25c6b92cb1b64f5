"""DNS blocklists and allowlists (DNSBL / DNSWL, RFC 5782) for the client's address.

Theory of operation
-------------------
`DnsblCheck` runs at CONNECT. It asks every configured zone about the client's address
at once (one A query per distinct zone name, concurrently) and adds up the weights of
the zones that list it: a `kind="block"` zone adds its weight, a `kind="allow"` zone
(a DNSWL) subtracts it. A score at or above the threshold is a REJECT

    554 5.7.1 Client host [192.0.2.1] blocked using zen.example

naming the block zone with the highest weight among those that listed the client. The
pipeline *holds* that denial and applies it at RCPT in the tenant's context, so that
postmaster@ and abuse@ stay reachable (RFC 5321 §4.5.1, RFC 2142) and a blocked sender
can still ask why; an allowlisted client (`filters.access_lists.allowlisted`) is not
refused by it at all.

Query names (RFC 5782 §2.1, §2.4): IPv4 ``192.0.2.1`` is looked up as
``1.2.0.192.<zone>``; IPv6 as its 32 nibbles in reverse order, each a label
(``2001:db8::1`` -> ``1.0.0. ... .8.b.d.0.1.0.0.2.<zone>``). An IPv4-mapped IPv6 client
(``::ffff:192.0.2.1``, a dual-stack socket) is looked up as the IPv4 address it is.

Answers:

* NXDOMAIN, or a name without A records: not listed (RFC 5782 §2.1).
* A records in 127.0.0.0/8 are return codes (RFC 5782 §2.1, §2.3). A zone entry with
  `codes` counts only if one of the codes is among them (several entries may name the
  same zone with different codes and weights: one query serves them all, as in
  Postfix's ``postscreen_dnsbl_sites = zen.example=127.0.0.[10;11]*2``); `codes=None`
  counts any return code. Codes are exact addresses or networks (``127.0.0.0/30``).
* Answers in 127.255.255.0/24 are the list's *error codes*, not listings (Spamhaus'
  convention, followed by others: 127.255.255.252 typing error, .254 query through a
  public resolver, .255 over the free-use limit). They are ignored, and logged at most
  once per zone and code every `LOG_INTERVAL` seconds, because they mean that the list
  stopped working for us and the operator has to act.
* Answers outside 127.0.0.0/8 are not return codes (RFC 5782 §2.1 keeps them inside it
  so that a listing can never be mistaken for a host): a zone answering with one is
  broken or hijacked (an expired list domain parked with a wildcard). Ignored, logged.
* A temporary DNS failure (SERVFAIL, timeout; `DnsTemporaryError`) or no answer within
  `ZONE_TIMEOUT`: that zone is left out of the score and the failure recorded.

Fail open, deliberately. DESIGN.md says a broken dependency defers mail; reputation
lookups are the exception that Postfix's postscreen, rspamd and SpamAssassin all make:
a third-party list is advisory data, often slow or rate-limited, and deferring every
sender whenever one list is unreachable would turn its outage into ours. The failure is
in the results record (outcome ERROR when no zone answered) and in the logs. The same
reasoning makes `on_error` CONTINUE.

Facts: the `DnsblResult` (score, listings, allowlisted, errors) is the fact ``"dnsbl"``
(`dnsbl_of(ctx)`), computed once per results record; greylisting and reputation read
`allowlisted` (a DNSWL listed the client) and `listings` from it.

Settings (`ctx.services.settings.dnsbl`, a `DnsblSettings`; built from the ``[dnsbl]``
table with `build_dnsbl_settings`):

* ``zones``: list of ``{name, weight = 1.0, codes = [...] (absent: any), kind =
  "block" | "allow"}``;
* ``threshold`` (> 0, default 1.0): the score at which a client is refused. The defaults
  are postscreen's (weight 1, threshold 1: any listing blocks).

No settings or no zones: the filter records a skip and does nothing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from filters.base import CONTINUE, Action, Context, Outcome, Reply, Stage, Verdict
from filters.dns import DnsError, DnsNameError, Resolver

log = logging.getLogger(__name__)

__all__ = [
    "DnsblCheck",
    "DnsblResult",
    "DnsblSettings",
    "DnsblSettingsError",
    "DnsblZone",
    "Listing",
    "build_dnsbl_settings",
    "client_address",
    "dnsbl_of",
    "lookup",
    "reversed_ip",
]

FACT = "dnsbl"
Kind = Literal["block", "allow"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: RFC 5782 §2.1: return codes are 127.0.0.0/8 addresses.
RETURN_CODES = ipaddress.IPv4Network("127.0.0.0/8")
#: The lists' error codes (query refused, over the limit): never a listing.
ERROR_CODES = ipaddress.IPv4Network("127.255.255.0/24")
#: Seconds one zone may take; a slower zone is left out (its result is lost, not waited).
ZONE_TIMEOUT = 5.0
#: Seconds between two log lines about the same zone answering the same error.
LOG_INTERVAL = 300.0

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_MAX_ZONE_LENGTH = 253 - 64  # room for the 32 nibble labels of an IPv6 query name


class DnsblSettingsError(ValueError):
    """The DNSBL settings have problems; `problems` lists every one of them."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


# -- settings -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DnsblZone:
    """One DNSBL/DNSWL zone entry: which return codes count, with which weight.

    `name` is lowercased and loses a final dot; `codes` become a frozenset of canonical
    texts (addresses or networks). Invalid values raise `DnsblSettingsError`.
    """

    name: str
    weight: float = 1.0
    codes: Collection[str] | None = None  # None: any return code outside the error range
    kind: Kind = "block"
    _networks: tuple[ipaddress.IPv4Network, ...] = field(
        init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        problems: list[str] = []
        name = self.name.strip().rstrip(".").lower() if isinstance(self.name, str) else ""
        if not name:
            problems.append("name: must be a DNS zone name")
        elif len(name) > _MAX_ZONE_LENGTH or not all(
                _LABEL.match(label) for label in name.split(".")):
            problems.append(f"name: {self.name!r} is not a DNS zone name "
                            f"(letters, digits, '-', '_'; at most {_MAX_ZONE_LENGTH} octets)")
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not (
                math.isfinite(weight) and weight >= 0):
            problems.append(f"weight: must be a number >= 0, not {weight!r}")
        if self.kind not in ("block", "allow"):
            problems.append(f"kind: must be 'block' or 'allow', not {self.kind!r}")
        networks: list[ipaddress.IPv4Network] = []
        if self.codes is not None:
            if isinstance(self.codes, str):
                problems.append("codes: must be a list of return codes, not one string")
            else:
                for code in self.codes:
                    network, problem = _return_code(code)
                    if problem:
                        problems.append(f"codes: {problem}")
                    elif network is not None:
                        networks.append(network)
                if not networks and not problems:
                    problems.append("codes: empty (leave it out to count any return code)")
        if problems:
            raise DnsblSettingsError(problems)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "weight", float(weight))
        if self.codes is not None:
            object.__setattr__(self, "codes", frozenset(
                str(n.network_address) if n.prefixlen == 32 else str(n) for n in networks))
        object.__setattr__(self, "_networks", tuple(networks))

    def matching(self, codes: Iterable[ipaddress.IPv4Address]) -> tuple[str, ...]:
        """The return codes (already outside the error range) this entry counts."""
        if self.codes is None:
            return tuple(str(code) for code in codes)
        return tuple(str(code) for code in codes
                     if any(code in network for network in self._networks))


def _return_code(code: Any) -> tuple[ipaddress.IPv4Network | None, str]:
    if not isinstance(code, str):
        return None, f"{code!r} is not a string"
    try:
        network = ipaddress.IPv4Network(code.strip(), strict=True)
    except ValueError:
        return None, f"{code!r} is not an IPv4 address or network"
    if not network.subnet_of(RETURN_CODES):
        return None, f"{code!r} is outside 127.0.0.0/8 (RFC 5782 §2.1)"
    if network.overlaps(ERROR_CODES):
        return None, f"{code!r} overlaps the lists' error codes 127.255.255.0/24"
    return network, ""


@dataclass(frozen=True, slots=True)
class DnsblSettings:
    """The zones to ask and the score that blocks (``[dnsbl]``)."""

    zones: tuple[DnsblZone, ...] = ()
    threshold: float = 1.0

    def __post_init__(self) -> None:
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not (
                math.isfinite(threshold) and threshold > 0):
            raise DnsblSettingsError([f"threshold: must be a number > 0, not {threshold!r}"])
        object.__setattr__(self, "threshold", float(threshold))
        object.__setattr__(self, "zones", tuple(self.zones))


_ZONE_KEYS = frozenset({"name", "weight", "codes", "kind"})


def build_dnsbl_settings(zones: Any = (), threshold: Any = 1.0) -> DnsblSettings:
    """`DnsblSettings` from the raw ``[dnsbl]`` values (TOML), every problem reported.

    `zones` is a list of tables ``{name, weight?, codes?, kind?}``. Raises
    `DnsblSettingsError` (a ValueError) whose `problems` name the key of each problem,
    e.g. ``"zones[1].codes: '127.0.0.300' is not an IPv4 address or network"``.
    """
    problems: list[str] = []
    built: list[DnsblZone] = []
    if not isinstance(zones, list | tuple):
        problems.append("zones: must be a list of tables")
        zones = ()
    for index, raw in enumerate(zones):
        where = f"zones[{index}]"
        if not isinstance(raw, Mapping):
            problems.append(f"{where}: must be a table like {{name = \"zen.example\"}}")
            continue
        problems.extend(f"{where}.{key}: unknown key" for key in raw if key not in _ZONE_KEYS)
        if "name" not in raw:
            problems.append(f"{where}.name: missing")
            continue
        codes = raw.get("codes")
        if codes is not None and not isinstance(codes, list | tuple):
            problems.append(f"{where}.codes: must be a list of return codes")
            continue
        try:
            built.append(DnsblZone(name=raw["name"], weight=raw.get("weight", 1.0),
                                   codes=codes, kind=raw.get("kind", "block")))
        except DnsblSettingsError as exc:
            problems.extend(f"{where}.{problem}" for problem in exc.problems)
    try:
        settings = DnsblSettings(tuple(built), threshold)
    except DnsblSettingsError as exc:
        problems.extend(exc.problems)
    if problems:
        raise DnsblSettingsError(problems)
    return settings


# -- the lookup -----------------------------------------------------------------------------


def client_address(ip: str) -> IPAddress | None:
    """The client's address as an object; IPv4-mapped IPv6 as IPv4; None if not an IP."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])  # no zone id in a lookup
    except (ValueError, AttributeError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def reversed_ip(address: IPAddress) -> str:
    """The DNSxL query prefix (RFC 5782 §2.1, §2.4): reversed octets or nibbles."""
    if isinstance(address, ipaddress.IPv4Address):
        return ".".join(reversed(str(address).split(".")))
    return ".".join(reversed(address.exploded.replace(":", "")))


@dataclass(frozen=True, slots=True)
class Listing:
    """One configured entry that listed the client."""

    zone: str
    kind: Kind
    weight: float
    codes: tuple[str, ...]  # the return codes that matched


@dataclass(frozen=True, slots=True)
class DnsblResult:
    """What the zones said about one address (the fact ``"dnsbl"``)."""

    ip: str
    score: float = 0.0  # block weights minus allow weights
    threshold: float = 1.0
    listings: tuple[Listing, ...] = ()
    errors: tuple[str, ...] = ()  # zones left out: "zone: why"
    asked: int = 0  # distinct zone names asked

    @property
    def blocked(self) -> bool:
        return self.score >= self.threshold

    @property
    def allowlisted(self) -> bool:
        """A DNSWL (a zone of kind "allow") lists the client."""
        return any(listing.kind == "allow" for listing in self.listings)

    @property
    def blocked_by(self) -> str | None:
        """The block zone named in the reply: highest weight, first configured on ties."""
        blocks = [listing for listing in self.listings if listing.kind == "block"]
        if not blocks:
            return None
        return max(blocks, key=lambda listing: listing.weight).zone

    def describe(self) -> str:
        parts = [f"{x.zone}={'+' if x.kind == 'block' else '-'}{x.weight:g}"
                 f"({','.join(x.codes)})" for x in self.listings]
        parts += [f"error {error}" for error in self.errors]
        return f"score {self.score:g}/{self.threshold:g}" + (
            ": " + " ".join(parts) if parts else ": not listed")


_last_logged: dict[tuple[str, str], float] = {}


def _log_broken(zone: str, what: str, detail: str) -> None:
    """Log a list's error answers at most once per LOG_INTERVAL (they repeat per client)."""
    now = time.monotonic()
    key = (zone, what)
    if now - _last_logged.get(key, -math.inf) >= LOG_INTERVAL:
        _last_logged[key] = now
        log.warning("dnsbl zone %s: %s (ignored; logged once per %gs)", zone, detail,
                    LOG_INTERVAL)


async def _ask(resolver: Resolver, zone: str, query: str
               ) -> tuple[tuple[ipaddress.IPv4Address, ...], str]:
    """(return codes, "") or ((), why the zone is left out)."""
    try:
        async with asyncio.timeout(ZONE_TIMEOUT):
            answer = await resolver.query(query, "A")
    except TimeoutError:
        return (), f"{zone}: no answer within {ZONE_TIMEOUT:g}s"
    except DnsNameError as exc:
        return (), f"{zone}: {exc}"
    except DnsError as exc:  # DnsTemporaryError: fail open for this zone
        return (), f"{zone}: temporary DNS failure ({exc})"
    if answer.nxdomain or not answer.records:
        return (), ""
    codes: list[ipaddress.IPv4Address] = []
    errors: list[str] = []
    for record in answer.records:
        try:
            code = ipaddress.IPv4Address(record)
        except ValueError:
            errors.append(record)
            continue
        if code in ERROR_CODES:
            _log_broken(zone, str(code), f"error code {code} (query refused or over "
                        "the list's limit?)")
            errors.append(str(code))
        elif code not in RETURN_CODES:
            _log_broken(zone, "outside", f"answer {code} outside 127.0.0.0/8 "
                        "(broken or hijacked list?)")
            errors.append(str(code))
        else:
            codes.append(code)
    if errors and not codes:
        return (), f"{zone}: error answer {','.join(errors)}"
    return tuple(codes), ""


async def lookup(resolver: Resolver, ip: str, settings: DnsblSettings) -> DnsblResult:
    """Ask every zone of `settings` about `ip` concurrently and score the answers."""
    address = client_address(ip)
    if address is None:
        return DnsblResult(ip, threshold=settings.threshold,
                           errors=(f"{ip!r} is not an IP address",))
    prefix = reversed_ip(address)
    names = list(dict.fromkeys(zone.name for zone in settings.zones))
    answers = dict(zip(names, await asyncio.gather(
        *(_ask(resolver, name, f"{prefix}.{name}") for name in names)), strict=True))
    listings: list[Listing] = []
    score = 0.0
    for zone in settings.zones:
        codes, _ = answers[zone.name]
        matched = zone.matching(codes)
        if matched:
            listings.append(Listing(zone.name, zone.kind, zone.weight, matched))
            score += zone.weight if zone.kind == "block" else -zone.weight
    errors = tuple(error for _, error in answers.values() if error)
    return DnsblResult(str(address), score, settings.threshold, tuple(listings), errors,
                       len(names))


def dnsbl_settings(ctx: Context) -> DnsblSettings | None:
    """The node's DNSBL settings (None when none are configured)."""
    settings: DnsblSettings | None = ctx.services.settings.dnsbl
    return settings


async def dnsbl_of(ctx: Context) -> DnsblResult | None:
    """The fact ``"dnsbl"`` for this client, computed once; None without any zone."""
    settings = dnsbl_settings(ctx)
    if settings is None or not settings.zones:
        return None
    resolver: Resolver = ctx.services.dns
    ip = ctx.session.client_ip
    return await ctx.once(FACT, lambda: lookup(resolver, ip, settings))


class DnsblCheck:
    """CONNECT: score the client's address on DNSBLs/DNSWLs (RFC 5782); refuse at or
    above the threshold.

    Settings: ``[dnsbl] zones`` and ``threshold`` (see the module). Replies:
    ``554 5.7.1 Client host [ip] blocked using <zone>`` (RFC 3463 X.7.1: delivery not
    authorized; 554 as Postfix's reject_rbl_client), held by the pipeline until RCPT.
    DNS failures of a zone leave it out (fail open, see the module); an error of the
    filter itself lets the client through (`on_error` CONTINUE).
    """

    name: ClassVar[str] = "dnsbl"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT})
    timeout: ClassVar[float] = ZONE_TIMEOUT + 2.0
    on_error: ClassVar[Action] = Action.CONTINUE

    async def check(self, ctx: Context) -> Verdict:
        result = await dnsbl_of(ctx)
        if result is None:
            ctx.note(Outcome.SKIP, "no zones configured")
            return CONTINUE
        detail = result.describe()
        if not result.blocked:
            all_failed = bool(result.errors) and len(result.errors) >= result.asked
            ctx.note(Outcome.ERROR if all_failed and not result.listings else Outcome.PASS,
                     detail)
            return CONTINUE
        zone = result.blocked_by
        ctx.note(Outcome.FAIL, detail)
        return Verdict(Action.REJECT,
                       Reply(554, "5.7.1", f"Client host [{result.ip}] blocked using {zone}"),
                       reason=f"dnsbl {detail}")
