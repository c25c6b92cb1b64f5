"""MESSAGE: scan the message with clamd once, then apply each tenant's virus policy.

Theory of operation
-------------------
Scan once, decide per tenant. The first tenant's filter call starts the scan
(``ctx.once("antivirus", ...)`` with the :class:`~filters.clamav.ClamdClient` in
``ctx.services.clamav``); the calls for the other tenants of the transaction await the
same :class:`~filters.clamav.ScanResult`. Each tenant's policy then turns it into that
tenant's verdict:

============  =====================================  =======================================
scan result   policy                                 verdict (results record)
============  =====================================  =======================================
clean         -                                      CONTINUE (pass)
infected      ``virus_action = "reject"`` (default)  REJECT 554 5.7.1 (fail)
infected      ``virus_action = "quarantine"``        QUARANTINE (fail)
error         ``antivirus_fail_open = false``        TEMPFAIL 451 4.3.2 (error)
error         ``antivirus_fail_open = true``         CONTINUE + unscanned header (error)
too_large     -                                      CONTINUE + unscanned header (skip)
============  =====================================  =======================================

* The reply to the peer is bland ("Message contains a virus"); the signature name goes
  to the operator's side only (the verdict's reason and the results record).
* ``error`` is temporary (clamd down, hung, overloaded): fail safe means 4xx, unless the
  tenant chose to take mail unscanned while its scanner is down.
* ``too_large`` (over the scan limit, or clamd's StreamMaxLength) recurs on every retry,
  so it never defers: such a message is delivered marked as unscanned. The node's
  ``[inbound] max_message_size`` and the tenant's ``max_message_size`` are what bound
  message sizes; the scan limit only bounds what is scanned.
* A message that goes on unscanned carries ``X-Mailedge-Virus-Scan: unscanned (...)`` so
  that mailbox rules and the user can tell.
* With no scanner configured (``ctx.services.clamav`` absent or None) the filter records
  a skip and lets the message through: naming ``antivirus`` in the pipeline without a
  clamd is a configuration choice the node reports at startup, not a per-message failure.

A scan never raises for scanner trouble (see filters/clamav.py); anything else that goes
wrong is the pipeline's business (``on_error`` TEMPFAIL). The client's own timeout should
stay below this filter's ``timeout`` so that a hung clamd is an ``error`` result (which a
fail-open tenant can accept) rather than a filter timeout (always 4xx).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from filters.base import CONTINUE, Action, Context, Outcome, Reply, Stage, Verdict
from filters.clamav import ClamdClient, ScanResult, ScanVerdict

__all__ = [
    "FACT",
    "SCANNER_UNAVAILABLE",
    "SCAN_HEADER",
    "VIRUS_REJECT",
    "AntivirusCheck",
    "scan_of",
]

#: The results-record fact holding the message's ScanResult.
FACT = "antivirus"
#: Added to copies that are delivered without a completed scan.
SCAN_HEADER = "X-Mailedge-Virus-Scan"
UNSCANNED_TOO_LARGE = "unscanned (too large to scan)"
UNSCANNED_SCANNER_DOWN = "unscanned (scanner unavailable)"

VIRUS_REJECT = Reply(554, "5.7.1", "Message contains a virus")
SCANNER_UNAVAILABLE = Reply(451, "4.3.2", "Virus scanner temporarily unavailable, "
                                          "try again later")


def _client(ctx: Context) -> ClamdClient | None:
    client: ClamdClient | None = getattr(ctx.services, "clamav", None)
    return client


async def scan_of(ctx: Context) -> ScanResult | None:
    """The message's scan result, computed once per transaction; None without a scanner."""
    client, message = _client(ctx), ctx.message
    if client is None or message is None:
        return None
    return await ctx.once(FACT, lambda: client.scan(message.content()))


def _policy(ctx: Context) -> Mapping[str, Any]:
    return {} if ctx.tenant is None else ctx.tenant.policy


class AntivirusCheck:
    """MESSAGE: clamd scan (once), virus_action and antivirus_fail_open (per tenant)."""

    name: ClassVar[str] = "antivirus"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MESSAGE})
    timeout: ClassVar[float] = 60.0
    on_error: ClassVar[Action] = Action.TEMPFAIL

    async def check(self, ctx: Context) -> Verdict:
        if ctx.message is None:
            ctx.note(Outcome.SKIP, "no message")
            return CONTINUE
        result = await scan_of(ctx)
        if result is None:
            ctx.note(Outcome.SKIP, "no virus scanner configured")
            return CONTINUE
        policy = _policy(ctx)
        if result.verdict is ScanVerdict.CLEAN:
            ctx.note(Outcome.PASS, "clean")
            return CONTINUE
        if result.verdict is ScanVerdict.INFECTED:
            action = policy.get("virus_action", "reject")
            ctx.note(Outcome.FAIL, f"infected: {result.signature} (virus_action={action})")
            reason = f"virus {result.signature}"
            if action == "quarantine":
                return Verdict(Action.QUARANTINE, reason=reason)
            # "reject", and anything this version does not know: refusing is the safe side.
            return Verdict(Action.REJECT, VIRUS_REJECT, reason=reason)
        if result.verdict is ScanVerdict.TOO_LARGE:
            ctx.note(Outcome.SKIP, f"not scanned, too large: {result.detail}")
            return Verdict(Action.CONTINUE, reason="too large to scan",
                           add_headers=((SCAN_HEADER, UNSCANNED_TOO_LARGE),))
        if policy.get("antivirus_fail_open", False) is True:
            ctx.note(Outcome.ERROR, f"scanner unavailable, accepted unscanned (fail-open): "
                     f"{result.detail}")
            return Verdict(Action.CONTINUE, reason="scanner unavailable, fail-open",
                           add_headers=((SCAN_HEADER, UNSCANNED_SCANNER_DOWN),))
        ctx.note(Outcome.ERROR, f"scanner unavailable: {result.detail}")
        return Verdict(Action.TEMPFAIL, SCANNER_UNAVAILABLE,
                       reason=f"virus scanner unavailable: {result.detail}")
