"""Forward-confirmed reverse DNS (FCrDNS) of the client: recorded, enforced per tenant.

Theory of operation
-------------------
`forward_confirmed(resolver, ip)`:

1. PTR of the client's reverse name (``1.2.0.192.in-addr.arpa``, or the 32 nibbles under
   ``ip6.arpa``; RFC 1035 §3.5, RFC 3596 §2.5). An IPv4-mapped IPv6 client is its IPv4
   address.
2. For each PTR name, at most `MAX_NAMES` (10, the limit RFC 7208 §4.6.4 sets for the
   same walk in SPF's "ptr"; the rest are ignored), the addresses of the client's family
   (A for IPv4, AAAA for IPv6), all names concurrently.
3. The first name, in the order the PTR answer gave them, whose addresses include the
   client's is the confirmed name.

The result is the fact ``"rdns"`` (`rdns_of(ctx)`, an `RdnsResult`): ``name`` is the
confirmed name or None, ``confirmed`` whether there is one, ``ptr`` the names the PTR
answer gave (unconfirmed: anyone controlling the reverse zone can claim any name, so only
``name`` belongs in a Received header, RFC 5321 §4.4 TCP-info, or in a reputation
decision). A temporary DNS failure that kept the check from confirming a name sets
``temperror``; a missing PTR, a PTR name without the address, or a name that cannot be
looked up is simply "not confirmed".

`RdnsCheck` (``rdns``) runs at CONNECT, where it only records (it never refuses by
itself, and `on_error` is CONTINUE: it is advisory), and at RCPT, where a tenant whose
policy sets ``require_fcrdns`` defers clients without a confirmed name:

* ``450 4.7.25 Client host rejected: reverse DNS not confirmed for [ip]`` - RFC 7372
  §3.2 defines X.7.25 ("reverse DNS validation failed"); 4xx rather than its 550, as
  Postfix's reject_unknown_client_hostname does by default (unknown_client_reject_code =
  450): missing or inconsistent reverse DNS is often a mistake its operator fixes, and a
  deferral loses nothing meanwhile;
* ``451 4.4.3 Reverse DNS lookup failed, try again later`` when DNS trouble kept the
  check from deciding (RFC 3463 X.4.3: directory server failure).

postmaster@ and abuse@ are never deferred for it (RFC 5321 §4.5.1, RFC 2142; the same
rule the pipeline applies to held denials). The fact is computed once per results
record; at RCPT that is the transaction's, and the resolver's cache answers again what
CONNECT asked.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from filters.access_lists import recipient_always_reachable
from filters.base import CONTINUE, Action, Context, Outcome, Reply, Stage, Verdict
from filters.dns import DnsError, DnsNameError, DnsTemporaryError, Resolver
from filters.dnsbl import client_address

__all__ = [
    "FCRDNS_TEMPFAIL",
    "RDNS_DNS_ERROR",
    "RdnsCheck",
    "RdnsResult",
    "forward_confirmed",
    "rdns_of",
]

FACT = "rdns"
#: PTR names checked at most (RFC 7208 §4.6.4 sets 10 for the same walk).
MAX_NAMES = 10
#: Seconds the PTR query, and then the forward queries, may take each.
LOOKUP_TIMEOUT = 4.0

FCRDNS_TEMPFAIL = "Client host rejected: reverse DNS not confirmed for [{ip}]"
RDNS_DNS_ERROR = Reply(451, "4.4.3", "Reverse DNS lookup failed, try again later")


@dataclass(frozen=True, slots=True)
class RdnsResult:
    """The client's reverse DNS (the fact ``"rdns"``)."""

    ip: str
    name: str | None = None  # the forward-confirmed name (None: none confirmed)
    ptr: tuple[str, ...] = ()  # the PTR names (at most MAX_NAMES), not confirmed
    temperror: bool = False  # DNS trouble kept a name from being confirmed
    detail: str = ""

    @property
    def confirmed(self) -> bool:
        return self.name is not None


async def _query(resolver: Resolver, name: str, rdtype: str) -> tuple[str, ...]:
    """Records of `name` (() when there are none); DnsTemporaryError on DNS trouble."""
    try:
        async with asyncio.timeout(LOOKUP_TIMEOUT):
            answer = await resolver.query(name, rdtype)
    except TimeoutError:
        raise DnsTemporaryError(f"{name} {rdtype}: no answer within {LOOKUP_TIMEOUT:g}s"
                                ) from None
    return answer.records


async def forward_confirmed(resolver: Resolver, ip: str) -> RdnsResult:
    """FCrDNS of `ip` (see the module); never raises for DNS failures."""
    address = client_address(ip)
    if address is None:
        return RdnsResult(ip, detail="not an IP address")
    text = str(address)
    try:
        ptr = await _query(resolver, address.reverse_pointer, "PTR")
    except DnsNameError as exc:
        return RdnsResult(text, detail=str(exc))
    except DnsError as exc:
        return RdnsResult(text, temperror=True, detail=f"PTR: {exc}")
    names = tuple(dict.fromkeys(name for name in ptr if name and name != "."))[:MAX_NAMES]
    if not names:
        return RdnsResult(text, detail="no PTR record")
    rdtype = "A" if isinstance(address, ipaddress.IPv4Address) else "AAAA"

    async def confirms(name: str) -> bool | None:
        """True: `name` has the address; False: not; None: DNS trouble."""
        try:
            records = await _query(resolver, name, rdtype)
        except DnsNameError:
            return False
        except DnsError:
            return None
        return any(client_address(record) == address for record in records)

    answers = await asyncio.gather(*(confirms(name) for name in names))
    for name, confirmed in zip(names, answers, strict=True):
        if confirmed:
            return RdnsResult(text, name, names, detail=f"{name} confirmed")
    if None in answers:
        return RdnsResult(text, None, names, temperror=True,
                          detail="forward lookup failed for " + ",".join(
                              n for n, a in zip(names, answers, strict=True) if a is None))
    return RdnsResult(text, None, names, detail=f"{rdtype} of {','.join(names)} "
                      f"does not include {text}")


async def rdns_of(ctx: Context) -> RdnsResult:
    """The fact ``"rdns"``, computed once per results record."""
    resolver: Resolver = ctx.services.dns
    ip = ctx.session.client_ip
    return await ctx.once(FACT, lambda: forward_confirmed(resolver, ip))


def _policy(ctx: Context) -> Mapping[str, Any]:
    return {} if ctx.tenant is None else ctx.tenant.policy


class RdnsCheck:
    """CONNECT: record the client's forward-confirmed reverse DNS (never refuses).
    RCPT: defer when the tenant's policy ``require_fcrdns`` asks for a confirmed name.

    Settings: tenant policy ``require_fcrdns`` (bool, default false). Replies (RCPT
    only): ``450 4.7.25`` not confirmed (RFC 7372), ``451 4.4.3`` DNS failure.
    """

    name: ClassVar[str] = "rdns"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT, Stage.RCPT})
    timeout: ClassVar[float] = 2 * LOOKUP_TIMEOUT + 2.0
    on_error: ClassVar[Action] = Action.CONTINUE  # advisory; DNS failures are handled

    async def check(self, ctx: Context) -> Verdict:
        if ctx.stage is Stage.RCPT:
            if not _policy(ctx).get("require_fcrdns"):
                ctx.note(Outcome.SKIP, "fcrdns not required")
                return CONTINUE
            if recipient_always_reachable(ctx):
                ctx.note(Outcome.SKIP, "postmaster/abuse stay reachable")
                return CONTINUE
        result = await rdns_of(ctx)
        if result.confirmed:
            ctx.note(Outcome.PASS, result.detail)
            return CONTINUE
        ctx.note(Outcome.ERROR if result.temperror else Outcome.FAIL, result.detail)
        if ctx.stage is not Stage.RCPT:
            return CONTINUE
        if result.temperror:
            return Verdict(Action.TEMPFAIL, RDNS_DNS_ERROR,
                           reason=f"fcrdns temperror: {result.detail}")
        return Verdict(Action.TEMPFAIL,
                       Reply(450, "4.7.25", FCRDNS_TEMPFAIL.format(ip=result.ip)),
                       reason=f"fcrdns required: {result.detail}")
