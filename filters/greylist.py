"""RCPT: greylisting for tenants that ask for it (policy `greylisting`).

Theory of operation
-------------------
Real mail servers retry after a temporary failure; most spam software does not. So the
first time a *triplet* is seen, its recipient is deferred with 451 4.7.1, and a retry
of the same triplet between `delay` (5 minutes) and `retry_window` (1 day) after that
first attempt passes. A passed triplet is remembered for `pass_ttl` (36 days, refreshed
by every message that passes), so a correspondent is delayed once, not every time.

The triplet is (client, envelope sender lowercased, recipient lookup key), where the
client is:

* the SPF-authenticated sender domain ("spf:example.org") when SPF passed for the MAIL
  FROM identity — large providers retry from other addresses, often in other networks,
  and a domain that authorises all of them vouches for each retry; otherwise
* the client's network: the /24 for IPv4, the /64 for IPv6 (retries commonly come from a
  neighbouring address of the same pool).

Triplets are hashed (BLAKE2b, 128 bits) into store keys of constant length:

    gl:w:<hash>   "first seen", expires after `retry_window` — the retry window
    gl:d:<hash>   "too early", expires after `delay` — set together with gl:w
    gl:p:<hash>   passed, expires `pass_ttl` after the last message that passed
    gl:spf:<dom>  a domain that passed greylisting with SPF pass, for `pass_ttl`

so the decision needs no clock of its own: only the store's expiry, which is the same
for every node (no skew between nodes' wall clocks). First seen means `put(gl:w,
only_if_absent)` succeeded; a retry passes when gl:w is still there and gl:d is gone.

Nothing is delayed when it need not be (in this order, cheapest first):

* the tenant's policy does not ask for greylisting → SKIP;
* the store is degraded (Redis unreachable) → SKIP, mail passes: greylisting is a nicety, and an
  outage of the shared store must never defer all mail (node-local triplets would defer
  every retry that lands on another node). The same holds when the store raises: the
  filter's error action is CONTINUE;
* the null sender (bounces, DSNs) and recipients postmaster@ and abuse@;
* allowlisted clients: the `allowlisted` fact, or a DNSWL hit (`dnsbl` fact whose
  `allowlisted` is true);
* a known triplet (passed before);
* an SPF pass from a domain that passed greylisting before (`gl:spf:<domain>`);
* a client with a good local reputation (`reputation.is_trusted`).

Retries too early get 451 again and do not restart the clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar

from filters.base import CONTINUE, Action, Context, Outcome, Reply, Stage, Verdict
from filters.reputation import is_trusted, network_unit
from filters.reputation import settings_of as reputation_settings
from filters.state import StateStore

GREYLISTED = Reply(451, "4.7.1", "Greylisted, please try again later")

EXEMPT_LOCAL_PARTS = frozenset({"postmaster", "abuse"})  # RFC 5321 §4.5.1, RFC 2142
KEY_PREFIX = "gl"
TRUSTED_FACT = "greylist_trusted"  # is_trusted for the transaction's client, once


@dataclass(frozen=True, slots=True)
class GreylistSettings:
    """`[greylist]`: the timing of greylisting (which tenants use it is their policy).

    delay         seconds a triplet must wait after its first attempt (default 5 min)
    retry_window  seconds after the first attempt in which a retry counts (default 1 day);
                  later, the triplet is new again
    pass_ttl      seconds a passed triplet (and an SPF domain that passed) is remembered
                  after the last message that passed (default 36 days)
    """

    delay: float = 300.0
    retry_window: float = 86400.0
    pass_ttl: float = 86400.0 * 36

    def __post_init__(self) -> None:
        if self.delay < 0:
            raise ValueError("greylist.delay must not be negative")
        if self.retry_window <= self.delay:
            raise ValueError("greylist.retry_window must be longer than greylist.delay")
        if self.pass_ttl <= 0:
            raise ValueError("greylist.pass_ttl must be greater than 0")


def settings_of(ctx: Context) -> GreylistSettings:
    """`ctx.services.settings.greylist`, or the defaults when none is wired."""
    found = getattr(getattr(ctx.services, "settings", None), "greylist", None)
    return found if isinstance(found, GreylistSettings) else GreylistSettings()


def triplet_hash(client: str, sender: str, recipient: str) -> str:
    raw = "\x00".join((client, sender.lower(), recipient.lower())).encode("utf-8",
                                                                         "surrogatepass")
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def spf_pass_domain(ctx: Context) -> str | None:
    """The MAIL FROM domain if SPF passed for it (the `spf` fact), else None."""
    spf = ctx.fact("spf")
    if getattr(spf, "result", None) != "pass":
        return None
    domain = getattr(spf, "domain", None)
    return domain.lower().rstrip(".") if isinstance(domain, str) and domain else None


def _flag(value: Any, attribute: str) -> bool:
    """A fact that is either a bool or an object with a bool attribute, read defensively."""
    if isinstance(value, bool):
        return value
    return getattr(value, attribute, False) is True


def _local_parts(ctx: Context) -> set[str]:
    recipient = ctx.envelope.current_recipient
    if recipient is None:
        return set()
    parts = set()
    for address in (recipient.address.strip("<>"), recipient.lookup_key):
        parts.add((address.rpartition("@")[0] if "@" in address else address).lower())
    return parts


class Greylist:
    """Defer the first attempt of an unknown (client, sender, recipient) triplet."""

    name: ClassVar[str] = "greylist"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.RCPT})
    timeout: ClassVar[float] = 5.0
    on_error: ClassVar[Action] = Action.CONTINUE  # fail open: a nicety, never an outage

    async def check(self, ctx: Context) -> Verdict:
        if ctx.tenant is None or not ctx.tenant.policy.get("greylisting"):
            ctx.note(Outcome.SKIP, "off for tenant")
            return CONTINUE
        store: StateStore | None = getattr(ctx.services, "state", None)
        if store is None or store.degraded:
            ctx.note(Outcome.SKIP, "no state store" if store is None else "state degraded")
            return CONTINUE
        recipient = ctx.envelope.current_recipient
        sender = ctx.envelope.sender
        if recipient is None or not sender:
            ctx.note(Outcome.SKIP, "null sender")
            return CONTINUE
        if _local_parts(ctx) & EXEMPT_LOCAL_PARTS:
            ctx.note(Outcome.SKIP, "postmaster/abuse")
            return CONTINUE
        if _flag(ctx.fact("allowlisted"), "allowlisted"):
            ctx.note(Outcome.SKIP, "allowlisted")
            return CONTINUE
        if _flag(ctx.fact("dnsbl"), "allowlisted"):
            ctx.note(Outcome.SKIP, "DNSWL listed")
            return CONTINUE

        settings = settings_of(ctx)
        spf_domain = spf_pass_domain(ctx)
        client = f"spf:{spf_domain}" if spf_domain else network_unit(ctx.session.client_ip)
        digest = triplet_hash(client, sender, recipient.lookup_key)
        passed_key = f"{KEY_PREFIX}:p:{digest}"
        if await store.fetch(passed_key) is not None:
            await self._passed(store, passed_key, spf_domain, settings)
            ctx.note(Outcome.PASS, f"known triplet ({client})")
            return CONTINUE
        if spf_domain and await store.fetch(f"{KEY_PREFIX}:spf:{spf_domain}") is not None:
            await self._passed(store, passed_key, spf_domain, settings)
            ctx.note(Outcome.PASS, f"SPF pass from known domain {spf_domain}")
            return CONTINUE
        ip = ctx.session.client_ip
        if await ctx.once(TRUSTED_FACT,
                          lambda: is_trusted(store, ip, reputation_settings(ctx))):
            ctx.note(Outcome.PASS, "good local reputation")
            return CONTINUE

        window_key, early_key = f"{KEY_PREFIX}:w:{digest}", f"{KEY_PREFIX}:d:{digest}"
        if await store.put(window_key, "1", ttl=settings.retry_window, only_if_absent=True):
            if settings.delay > 0:
                await store.put(early_key, "1", ttl=settings.delay)
            ctx.note(Outcome.FAIL, f"first attempt ({client}), deferred")
            return Verdict(Action.TEMPFAIL, GREYLISTED, reason=f"greylisted {client}")
        if await store.fetch(early_key) is not None:
            ctx.note(Outcome.FAIL, f"retried too early ({client}), deferred")
            return Verdict(Action.TEMPFAIL, GREYLISTED,
                           reason=f"greylisted {client}, retried too early")
        await self._passed(store, passed_key, spf_domain, settings)
        await store.delete(window_key)
        ctx.note(Outcome.PASS, f"retried in time ({client}), passed")
        return CONTINUE

    @staticmethod
    async def _passed(store: StateStore, passed_key: str, spf_domain: str | None,
                      settings: GreylistSettings) -> None:
        """Remember (or refresh) the triplet, and an SPF-passing domain, as passed."""
        await store.put(passed_key, "1", ttl=settings.pass_ttl)
        if spf_domain:
            await store.put(f"{KEY_PREFIX}:spf:{spf_domain}", "1", ttl=settings.pass_ttl)


__all__ = ["GREYLISTED", "Greylist", "GreylistSettings", "spf_pass_domain", "triplet_hash"]
