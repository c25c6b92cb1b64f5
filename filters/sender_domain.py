"""The MAIL FROM domain must be able to receive mail (RFC 5321 §5.1, RFC 7505).

Theory of operation
-------------------
A message whose envelope sender's domain does not exist can never be answered or
bounced: the non-delivery report it may cause would be undeliverable itself (RFC 5321
§6.1 makes the reverse-path the address of such reports). `check_sender_domain` decides,
with at most three queries:

1. MX of the domain.
   * NXDOMAIN: the domain does not exist -> ``nxdomain``.
   * The only MX is a null MX (``0 .``, RFC 7505 §3): the domain declares that it
     accepts no mail -> ``null_mx``. A null MX among other MX records is invalid (RFC
     7505 §3: it MUST be the only one); it is ignored and the others count.
   * Any other MX -> ``ok`` (the MX hosts themselves are not resolved: that would double
     the queries to catch very little).
2. No MX (NODATA): the implicit MX (RFC 5321 §5.1), A and AAAA concurrently. Either
   has an address -> ``ok``; neither -> ``no_mail_host`` (exists, but mail to it has
   nowhere to go, which Postfix's reject_unknown_sender_domain refuses as well).
3. A temporary DNS failure (SERVFAIL, timeout) at a step that decides ->
   ``temperror``; a failure of A when AAAA answered (or the reverse) does not matter.

Not checked: the null sender (``MAIL FROM:<>``, RFC 5321 §4.5.5: bounces must be
accepted), address literals (``user@[192.0.2.1]``: no DNS to ask), and an envelope
without a domain. The result is the fact ``"sender_domain"`` (`sender_domain_of`).

`SenderDomainCheck` (``sender_domain``) runs where ``[pipeline]`` puts it:

* at MAIL (the usual place): it always enforces, and the pipeline *holds* its
  verdict until RCPT like every MAIL verdict, so postmaster@ and abuse@ stay reachable;
  taking it out of ``[pipeline] mail`` is the node-wide off switch;
* at RCPT, for a per-tenant decision: the tenant's policy
  ``reject_unknown_sender_domain`` (default true) decides; postmaster@ and abuse@ are
  never refused here either.

Put it at one of the two, not both: a denial held from MAIL is applied before the RCPT
filters run, so a tenant's opt-out at RCPT could not undo it.

Replies:

* ``550 5.1.8 Sender address rejected: domain not found`` (NXDOMAIN; RFC 3463 X.1.8:
  bad sender's system address);
* ``550 5.1.8 Sender address rejected: domain has no mail server`` (no MX, A or AAAA);
* ``550 5.7.27 Sender domain does not accept mail`` (null MX; RFC 7505 §4.2, the code
  RFC 7505 registers for exactly this);
* ``550 5.1.7 Sender address rejected: invalid domain`` (a name DNS cannot carry;
  RFC 3463 X.1.7: bad sender's mailbox address syntax);
* ``451 4.4.3 Sender domain lookup failed, try again later`` (DNS temperror; RFC 3463
  X.4.3: directory server failure). Fail safe (DESIGN.md): a DNS outage never turns
  into a 5xx. An error of the filter itself is a TEMPFAIL too (`on_error`).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from filters.access_lists import recipient_always_reachable
from filters.base import CONTINUE, Action, Context, Outcome, Reply, Stage, Verdict
from filters.dns import DnsError, DnsNameError, DnsResult, Resolver

__all__ = [
    "REPLIES",
    "SenderDomainCheck",
    "SenderDomainResult",
    "SenderDomainStatus",
    "check_sender_domain",
    "sender_domain",
    "sender_domain_of",
]

FACT = "sender_domain"
#: Seconds one query may take (the MX step, then the A/AAAA step).
LOOKUP_TIMEOUT = 4.0


class SenderDomainStatus(enum.Enum):
    OK = "ok"
    NXDOMAIN = "nxdomain"
    NULL_MX = "null_mx"
    NO_MAIL_HOST = "no_mail_host"
    INVALID = "invalid"
    TEMPERROR = "temperror"
    SKIPPED = "skipped"  # null sender, address literal, no domain


REPLIES: dict[SenderDomainStatus, Reply] = {
    SenderDomainStatus.NXDOMAIN: Reply(550, "5.1.8", "Sender address rejected: domain not found"),
    SenderDomainStatus.NO_MAIL_HOST: Reply(
        550, "5.1.8", "Sender address rejected: domain has no mail server"),
    SenderDomainStatus.NULL_MX: Reply(550, "5.7.27", "Sender domain does not accept mail"),
    SenderDomainStatus.INVALID: Reply(550, "5.1.7", "Sender address rejected: invalid domain"),
    SenderDomainStatus.TEMPERROR: Reply(
        451, "4.4.3", "Sender domain lookup failed, try again later"),
}


@dataclass(frozen=True, slots=True)
class SenderDomainResult:
    """Whether the sender's domain can receive mail (the fact ``"sender_domain"``)."""

    domain: str
    status: SenderDomainStatus
    detail: str = ""


def sender_domain(sender: str) -> str | None:
    """The domain of an envelope sender to check: lowercase, without a final dot;
    None for the null sender, an address literal or a sender without a domain."""
    local, at, domain = sender.rpartition("@")
    if not at or not local or not domain or domain.startswith("["):
        return None
    return domain.rstrip(".").lower() or None


async def _query(resolver: Resolver, name: str, rdtype: str) -> DnsResult:
    try:
        async with asyncio.timeout(LOOKUP_TIMEOUT):
            return await resolver.query(name, rdtype)
    except TimeoutError:
        raise DnsError(f"{name} {rdtype}: no answer within {LOOKUP_TIMEOUT:g}s") from None


async def check_sender_domain(resolver: Resolver, domain: str) -> SenderDomainResult:
    """Can `domain` receive mail? (see the module). Never raises for DNS failures."""
    status = SenderDomainStatus
    try:
        mx = await _query(resolver, domain, "MX")
    except DnsNameError as exc:
        return SenderDomainResult(domain, status.INVALID, str(exc))
    except DnsError as exc:
        return SenderDomainResult(domain, status.TEMPERROR, f"MX: {exc}")
    if mx.nxdomain:
        return SenderDomainResult(domain, status.NXDOMAIN, "NXDOMAIN")
    exchanges = [record.partition(" ")[2] for record in mx.records]
    if exchanges and all(exchange == "." for exchange in exchanges):
        return SenderDomainResult(domain, status.NULL_MX, "null MX (RFC 7505)")
    if any(exchange not in ("", ".") for exchange in exchanges):
        return SenderDomainResult(domain, status.OK, f"MX {exchanges[0]}")
    answers = await asyncio.gather(_query(resolver, domain, "A"),
                                   _query(resolver, domain, "AAAA"), return_exceptions=True)
    failures: list[str] = []
    for rdtype, answer in zip(("A", "AAAA"), answers, strict=True):
        if isinstance(answer, DnsResult):
            if answer.nxdomain:  # vanished between the queries: as if it never was
                return SenderDomainResult(domain, status.NXDOMAIN, f"{rdtype}: NXDOMAIN")
            if answer.records:
                return SenderDomainResult(domain, status.OK,
                                          f"no MX, {rdtype} {answer.records[0]}")
        elif isinstance(answer, DnsError):
            failures.append(f"{rdtype}: {answer}")
        else:
            raise answer  # a bug, not DNS: the pipeline turns it into on_error
    if failures:
        return SenderDomainResult(domain, status.TEMPERROR, "; ".join(failures))
    return SenderDomainResult(domain, status.NO_MAIL_HOST, "no MX, A or AAAA")


async def sender_domain_of(ctx: Context) -> SenderDomainResult:
    """The fact ``"sender_domain"`` for the transaction's sender, computed once."""
    sender = ctx.envelope.sender
    domain = sender_domain(sender)
    if domain is None:
        return SenderDomainResult("", SenderDomainStatus.SKIPPED,
                                  "null sender" if not sender else "no DNS domain")
    resolver: Resolver = ctx.services.dns
    return await ctx.once(FACT, lambda: check_sender_domain(resolver, domain))


def _policy(ctx: Context) -> Mapping[str, Any]:
    return {} if ctx.tenant is None else ctx.tenant.policy


class SenderDomainCheck:
    """MAIL (or RCPT, per tenant): the envelope sender's domain must accept mail.

    Settings: tenant policy ``reject_unknown_sender_domain`` (bool, default true), read
    at RCPT only. Replies: 550 5.1.8 (no such domain / no mail server), 550 5.7.27
    (null MX), 550 5.1.7 (invalid domain), 451 4.4.3 (DNS temperror); see the module.
    """

    name: ClassVar[str] = "sender_domain"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL, Stage.RCPT})
    timeout: ClassVar[float] = 2 * LOOKUP_TIMEOUT + 2.0
    on_error: ClassVar[Action] = Action.TEMPFAIL

    async def check(self, ctx: Context) -> Verdict:
        if ctx.stage is Stage.RCPT:
            if not _policy(ctx).get("reject_unknown_sender_domain", True):
                ctx.note(Outcome.SKIP, "not enforced for this tenant")
                return CONTINUE
            if recipient_always_reachable(ctx):
                ctx.note(Outcome.SKIP, "postmaster/abuse stay reachable")
                return CONTINUE
        result = await sender_domain_of(ctx)
        detail = f"{result.domain or '-'}: {result.status.value} ({result.detail})"
        if result.status in (SenderDomainStatus.OK, SenderDomainStatus.SKIPPED):
            ctx.note(Outcome.PASS if result.status is SenderDomainStatus.OK else Outcome.SKIP,
                     detail)
            return CONTINUE
        reply = REPLIES[result.status]
        if result.status is SenderDomainStatus.TEMPERROR:
            ctx.note(Outcome.ERROR, detail)
            return Verdict(Action.TEMPFAIL, reply, reason=f"sender domain {detail}")
        ctx.note(Outcome.FAIL, detail)
        return Verdict(Action.REJECT, reply, reason=f"sender domain {detail}")
