"""Sender authentication in the pipeline: SPF, DKIM, ARC and DMARC, decided per tenant.

Theory of operation
-------------------
The checks are computed once per transaction (`ctx.once`, scan once) and decided by
each tenant's policy (decide per tenant):

* `spf` runs at MAIL: the MAIL FROM identity (RFC 7208 §2.4; postmaster@HELO for the
  null sender) and the HELO identity (§2.3) are evaluated and recorded. The HELO
  identity depends only on the client and the HELO name, so it is evaluated once per
  connection and name (`ctx.session_once`), again only after a temperror. Nothing is
  refused at MAIL: an aligned DKIM pass can still save the message (RFC 7489 §10.1), so
  the decision waits for the end of DATA. There, a tenant with `spf_fail_reject`
  refuses SPF `fail` without a DMARC pass with 550 5.7.23 (RFC 7372), and defers an
  SPF `temperror` that could be such a fail with 451 4.7.24.
* `dkim` verifies every signature up to a cap; `arc` validates the ARC chain. Both
  only record.
* `dmarc` evaluates RFC 7489 from the SPF and DKIM results and applies the tenant's
  `dmarc_enforcement`: `enforce` honours p=reject (550 5.7.1) and p=quarantine
  (the copy goes to the tenant's quarantine), `quarantine_only` quarantines instead of
  rejecting, `monitor` only records. A failure on forwarded mail whose ARC chain passes
  and whose newest sealer the tenant trusts (`arc_trusted_sealers`) is not acted on.

Fail safe: when DNS trouble (a temperror in SPF or in a DKIM key lookup) could be why
a message fails a policy that asks for rejection, the answer is 451, never 5xx. When
the DMARC policy itself cannot be fetched, nothing is known to be asked for: the
temperror is recorded and the message goes on. The computed results also feed the
message's Authentication-Results header (gateway/headers.py).
"""

from __future__ import annotations

from typing import Any, ClassVar

from filters.arc import ArcResult, verify_arc
from filters.base import CONTINUE, Action, Context, Outcome, Reply, Stage, Verdict
from filters.dkim import DkimResult, verify_dkim
from filters.dmarc import (
    DkimIdentity,
    DmarcResult,
    DmarcStatus,
    FromError,
    Policy,
    SpfIdentity,
    discover_policy,
    evaluate,
    from_domain,
)
from filters.dns import Resolver
from filters.spf import SpfResult, check_helo, check_spf

SPF = "spf"
SPF_HELO = "spf_helo"
DKIM = "dkim"
ARC = "arc"
DMARC = "dmarc"

SPF_FAIL = Reply(550, "5.7.23", "SPF validation failed")  # RFC 7372
SPF_TEMPFAIL = Reply(451, "4.7.24", "SPF validation error, try again later")  # RFC 7372
DMARC_REJECT = Reply(550, "5.7.1", "Rejected by the sender domain's DMARC policy")
DMARC_TEMPFAIL = Reply(451, "4.7.5", "Sender authentication temporarily unavailable")
DNS_TIMEOUT = 30.0  # a whole SPF evaluation may make up to ~20 lookups


def _resolver(ctx: Context) -> Resolver:
    resolver: Resolver = ctx.services.dns
    return resolver


async def spf_of(ctx: Context) -> SpfResult:
    session, sender = ctx.session, ctx.envelope.sender
    return await ctx.once(SPF, lambda: check_spf(
        _resolver(ctx), ip=session.client_ip, sender=sender, helo=session.helo or "",
        receiver=ctx.services.hostname))


async def spf_helo_of(ctx: Context) -> SpfResult:
    """The HELO identity's SPF result: evaluated once per connection and HELO name.

    It depends only on the client address and the HELO name, so the transactions of one
    connection share it (a temperror is evaluated again by the next transaction).
    """
    session = ctx.session
    helo = session.helo or ""
    return await ctx.once(SPF_HELO, lambda: ctx.session_once(
        f"{SPF_HELO} {helo}",
        lambda: check_helo(_resolver(ctx), ip=session.client_ip, helo=helo,
                           receiver=ctx.services.hostname),
        keep=lambda result: result.result != "temperror"))


async def dkim_of(ctx: Context) -> list[DkimResult]:
    message = ctx.message
    assert message is not None, "DKIM runs at the MESSAGE stage"
    return await ctx.once(DKIM, lambda: verify_dkim(message.content(), _resolver(ctx)))


async def arc_of(ctx: Context) -> ArcResult:
    message = ctx.message
    assert message is not None, "ARC runs at the MESSAGE stage"
    return await ctx.once(ARC, lambda: verify_arc(message.content(), _resolver(ctx)))


async def dmarc_of(ctx: Context) -> DmarcResult | FromError | None:
    """DMARC for the message; a FromError when the From field makes it impossible."""
    async def compute() -> DmarcResult | FromError | None:
        message = ctx.message
        assert message is not None
        domain = from_domain(message.header_bytes)
        if domain is None or isinstance(domain, FromError):
            return domain
        spf = await spf_of(ctx)
        dkim = await dkim_of(ctx)
        lookup = await discover_policy(domain, _resolver(ctx))
        return evaluate(domain, lookup, SpfIdentity(spf.result, spf.domain),
                        [DkimIdentity(d.result, d.domain) for d in dkim])
    return await ctx.once(DMARC, compute)


def _policy(ctx: Context) -> Any:
    return {} if ctx.tenant is None else ctx.tenant.policy


class SpfCheck:
    """MAIL: evaluate and record SPF; MESSAGE: apply the tenant's SPF policy."""

    name: ClassVar[str] = "spf"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MAIL, Stage.MESSAGE})
    timeout: ClassVar[float] = DNS_TIMEOUT
    on_error: ClassVar[Action] = Action.TEMPFAIL

    async def check(self, ctx: Context) -> Verdict:
        spf = await spf_of(ctx)
        if ctx.stage is Stage.MAIL:
            helo = await spf_helo_of(ctx)
            ctx.note(Outcome.PASS if spf.result == "pass" else
                     Outcome.ERROR if spf.result in ("temperror", "permerror") else
                     Outcome.FAIL if spf.result in ("fail", "softfail") else Outcome.SKIP,
                     f"mailfrom={spf.result} ({spf.domain}) helo={helo.result}")
            return CONTINUE
        if not _policy(ctx).get("spf_fail_reject") or spf.result not in ("fail", "temperror"):
            return CONTINUE
        dmarc = await dmarc_of(ctx)
        if isinstance(dmarc, DmarcResult) and dmarc.result is DmarcStatus.PASS:
            ctx.note(Outcome.PASS, f"spf {spf.result}, saved by DMARC pass")
            return CONTINUE
        if spf.result == "temperror":
            ctx.note(Outcome.ERROR, f"spf temperror for {spf.domain}: {spf.problem}")
            return Verdict(Action.TEMPFAIL, SPF_TEMPFAIL, reason=f"spf temperror {spf.domain}")
        ctx.note(Outcome.FAIL, f"spf fail for {spf.domain}, no DMARC pass")
        return Verdict(Action.REJECT, SPF_FAIL, reason=f"spf fail {spf.domain} ({spf.mechanism})")


class DkimCheck:
    """MESSAGE: verify DKIM signatures and record each result (decisions: `dmarc`)."""

    name: ClassVar[str] = "dkim"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MESSAGE})
    timeout: ClassVar[float] = DNS_TIMEOUT
    on_error: ClassVar[Action] = Action.TEMPFAIL

    async def check(self, ctx: Context) -> Verdict:
        results = await dkim_of(ctx)
        if not results:
            ctx.note(Outcome.SKIP, "no signature")
        for result in results:
            ctx.note(Outcome.PASS if result.result == "pass" else
                     Outcome.ERROR if result.result in ("temperror", "permerror") else
                     Outcome.FAIL, f"d={result.domain} s={result.selector} {result.result}"
                     + (f" ({result.reason})" if result.reason else ""))
        return CONTINUE


class ArcCheck:
    """MESSAGE: validate the ARC chain and record it (decisions: `dmarc`)."""

    name: ClassVar[str] = "arc"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MESSAGE})
    timeout: ClassVar[float] = DNS_TIMEOUT
    on_error: ClassVar[Action] = Action.CONTINUE  # advisory: a broken chain is "fail"

    async def check(self, ctx: Context) -> Verdict:
        arc = await arc_of(ctx)
        ctx.note(Outcome.PASS if arc.result == "pass" else
                 Outcome.SKIP if arc.result == "none" else Outcome.FAIL,
                 f"arc={arc.result} i={arc.instances} sealers={','.join(arc.sealers)}")
        return CONTINUE


class DmarcCheck:
    """MESSAGE: DMARC per RFC 7489, enforced per the tenant's `dmarc_enforcement`."""

    name: ClassVar[str] = "dmarc"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MESSAGE})
    timeout: ClassVar[float] = DNS_TIMEOUT
    on_error: ClassVar[Action] = Action.TEMPFAIL

    async def check(self, ctx: Context) -> Verdict:
        dmarc = await dmarc_of(ctx)
        if not isinstance(dmarc, DmarcResult):
            ctx.note(Outcome.SKIP, "no usable From domain" if dmarc is None else dmarc.reason)
            return CONTINUE
        policy = _policy(ctx)
        enforcement = policy.get("dmarc_enforcement", "enforce")
        if dmarc.result is DmarcStatus.PASS:
            ctx.note(Outcome.PASS, f"{dmarc.from_domain} aligned")
            return CONTINUE
        if dmarc.result is not DmarcStatus.FAIL:
            # temperror here means the domain's policy itself could not be fetched: we
            # do not know that it asks for anything, so nothing is refused or deferred.
            ctx.note(Outcome.SKIP, f"{dmarc.from_domain}: {dmarc.result.value}")
            return CONTINUE
        if dmarc.disposition is Policy.NONE or enforcement == "monitor":
            ctx.note(Outcome.FAIL, f"{dmarc.from_domain} fails, policy "
                     f"{dmarc.policy_dmarc} applied as none ({enforcement})")
            return CONTINUE
        arc = await arc_of(ctx)
        trusted = {d.lower() for d in policy.get("arc_trusted_sealers", ())}
        if arc.result == "pass" and arc.newest_sealer in trusted:
            ctx.note(Outcome.PASS, f"{dmarc.from_domain} fails, overridden by trusted ARC "
                     f"sealer {arc.newest_sealer}")
            return CONTINUE
        if await self._dns_trouble(ctx, dmarc):
            ctx.note(Outcome.ERROR, f"{dmarc.from_domain} fails while DNS failed temporarily")
            return Verdict(Action.TEMPFAIL, DMARC_TEMPFAIL,
                           reason=f"dmarc fail with temperror for {dmarc.from_domain}")
        ctx.note(Outcome.FAIL, f"{dmarc.from_domain} fails, disposition "
                 f"{dmarc.disposition.value} ({enforcement})")
        if dmarc.disposition is Policy.REJECT and enforcement == "enforce":
            return Verdict(Action.REJECT, DMARC_REJECT,
                           reason=f"dmarc p=reject for {dmarc.from_domain}")
        return Verdict(Action.QUARANTINE,
                       reason=f"dmarc {dmarc.disposition.value} for {dmarc.from_domain}")

    @staticmethod
    async def _dns_trouble(ctx: Context, dmarc: DmarcResult) -> bool:
        """Could a DNS temperror be why nothing saved the message? Then defer, don't refuse.

        That is a temperror in SPF or in a DKIM key lookup, or an ARC chain from a sealer
        the tenant trusts that failed only because a key lookup failed temporarily.
        """
        spf = await spf_of(ctx)
        if spf.result == "temperror":
            return True
        if any(d.result == "temperror" for d in await dkim_of(ctx)):
            return True
        arc = await arc_of(ctx)
        trusted = {d.lower() for d in _policy(ctx).get("arc_trusted_sealers", ())}
        return arc.temporary and arc.newest_sealer in trusted
