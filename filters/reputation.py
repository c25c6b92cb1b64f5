"""CONNECT: local IP reputation, learned from what became of the client's recent mail.

Theory of operation
-------------------
Every message decision the gateway makes is fed back with `record_outcome(store, ip,
outcome)`: ACCEPTED, REJECTED (a 5xx for the message or an unknown recipient), SPAM or
VIRUS. Each outcome is counted in a sliding window (`window`, default 7 days) under two
keys in the shared `StateStore`, so every node of the cluster learns from every other:

* the client's own address ("host": the IPv4 address, or the whole IPv6 address), and
* its network: the /24 for IPv4, the /64 for IPv6 ("network"), which catches senders
  that rotate through the addresses of one network.

IPv4-mapped IPv6 addresses (::ffff:192.0.2.1) count as the IPv4 address.

The score of a tally is a number in [-1, 1]:

    bad   = rejected * rejected_weight + spam * spam_weight + virus * virus_weight
    score = 1 - 2 * bad / (accepted + bad)

so 1 is "everything accepted", 0 is "as much weighted bad as good" and -1 is "nothing
but bad". A virus (weight 5 by default) weighs more than a spam (2), which weighs more
than a plain rejection (1). A tally is only scored when it holds at least `min_samples`
messages (unweighted); below that the client is *unknown*, which is neutral.

The host's own tally decides when it is big enough, else the network's: a good mail
server in a bad neighbourhood keeps its own good name, and a new address in a network
that sent mostly spam inherits the network's. The filter then picks a band, first match:

* score < `reject_below` (-0.9: ~95% weighted bad) → REJECT 554 5.7.1,
* score < `tempfail_below` (-0.6: ~80%) → TEMPFAIL 451 4.7.1,
* score < `tarpit_below` (0.0: more bad than good) → CONTINUE, with the transaction
  fact `tarpit_seconds` (see `TARPIT_FACT`) telling the SMTP handler to slow its replies,
* otherwise CONTINUE.

REJECT and TEMPFAIL are CONNECT-stage denials, so the gateway holds them until RCPT and
postmaster@ and abuse@ stay reachable (that is also where a blocked sender is told to
write). A band is switched off by setting its threshold to -1 (no score is below -1).

`is_trusted(store, ip)` is the other use of the same data: a client whose score is at
least `trusted_above` (0.9) from at least `min_samples` messages is a known good
sender, which greylisting lets through without delay.

Feedback loops: denials made *because of* reputation happen at RCPT, before any message
is decided, and TEMPFAIL outcomes are never recorded, so a blocked client cannot keep
itself blocked just by retrying; its score recovers as the window slides past its
history. The gateway must not record an outcome for a message it never decided.

The store is read with eight `window_count` calls per connection (four outcomes for
host and network), issued concurrently. A store that raises makes the filter's error
action apply: CONTINUE, because reputation is advice and must never defer all mail.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
from dataclasses import dataclass
from typing import ClassVar, Literal

from filters.base import CONTINUE, Action, Context, Outcome, Reply, Stage, Verdict
from filters.state import StateStore

TARPIT_FACT = "tarpit_seconds"  # float seconds; set on the session's results at CONNECT
REPUTATION_FACT = "reputation"  # the Reputation computed at CONNECT

REJECTED_REPLY = Reply(554, "5.7.1", "Refused because of recent mail from your host, "
                                     "contact postmaster")
TEMPFAIL_REPLY = Reply(451, "4.7.1", "Too much unwanted mail from your host recently, "
                                     "try again later")

KEY_PREFIX = "rep"


class MailOutcome(enum.StrEnum):
    """What became of one message from a client, as reputation counts it."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    SPAM = "spam"
    VIRUS = "virus"


@dataclass(frozen=True, slots=True)
class ReputationSettings:
    """`[reputation]`: window, sample size, weights and the score bands.

    window           seconds of history that count (sliding), default 7 days
    min_samples      messages a tally needs before it is scored (host or network)
    rejected_weight, spam_weight, virus_weight   how much one such message weighs
                     against one accepted message
    tarpit_below     score below which replies are slowed by `tarpit_seconds`
    tempfail_below   score below which RCPT gets 451 4.7.1 (held from CONNECT)
    reject_below     score below which RCPT gets 554 5.7.1 (held from CONNECT)
    trusted_above    score at or above which `is_trusted` is true (greylisting skips)
    tarpit_seconds   the delay the SMTP handler adds to each reply of a tarpitted client

    Thresholds are scores in [-1, 1]; -1 switches a band off.
    """

    window: float = 7 * 86400.0
    min_samples: int = 10
    rejected_weight: float = 1.0
    spam_weight: float = 2.0
    virus_weight: float = 5.0
    tarpit_below: float = 0.0
    tempfail_below: float = -0.6
    reject_below: float = -0.9
    trusted_above: float = 0.9
    tarpit_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.window <= 0:
            raise ValueError("reputation.window must be greater than 0")
        if self.min_samples < 1:
            raise ValueError("reputation.min_samples must be at least 1")
        for name in ("rejected_weight", "spam_weight", "virus_weight", "tarpit_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"reputation.{name} must not be negative")
        for name in ("tarpit_below", "tempfail_below", "reject_below", "trusted_above"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"reputation.{name} must be between -1 and 1")


# -- addresses ------------------------------------------------------------------------


def parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client address, IPv4-mapped IPv6 unwrapped; None if it is not an address."""
    try:
        address = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)  # pure, and the same clients recur
def _is_address(ip: str) -> bool:
    return parse_ip(ip) is not None


@functools.lru_cache(maxsize=4096)  # pure, and the same clients recur: 4 calls a message
def aggregate(ip: str, v4_prefix: int, v6_prefix: int) -> str:
    """The unit `ip` is counted under: its network of the given prefix length.

    A full-length prefix gives the bare address ("192.0.2.1"), anything shorter the
    network in CIDR form ("192.0.2.0/24", "2001:db8:1:2::/64"). Something that is not
    an address (a Unix socket peer, "unknown") is its own unit, lowercased.
    """
    address = parse_ip(ip)
    if address is None:
        return ip.strip().lower()
    prefix = v4_prefix if address.version == 4 else v6_prefix
    if prefix >= address.max_prefixlen:
        return str(address)
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def host_unit(ip: str) -> str:
    return aggregate(ip, 32, 128)


def network_unit(ip: str) -> str:
    return aggregate(ip, 24, 64)


# -- tallies and scores ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tally:
    """Outcomes counted for one unit over the window."""

    accepted: int = 0
    rejected: int = 0
    spam: int = 0
    virus: int = 0

    @property
    def total(self) -> int:
        return self.accepted + self.rejected + self.spam + self.virus

    def __str__(self) -> str:
        return f"a={self.accepted} r={self.rejected} s={self.spam} v={self.virus}"


def score(tally: Tally, settings: ReputationSettings) -> float | None:
    """The tally's score in [-1, 1]; None below `min_samples` (unknown, neutral)."""
    if tally.total < settings.min_samples:
        return None
    bad = (tally.rejected * settings.rejected_weight + tally.spam * settings.spam_weight
           + tally.virus * settings.virus_weight)
    weighed = tally.accepted + bad
    if weighed <= 0:  # only zero-weight outcomes: nothing to hold against the client
        return 1.0
    return 1.0 - 2.0 * bad / weighed


@dataclass(frozen=True, slots=True)
class Reputation:
    """What is known about a client: the deciding tally and its score."""

    score: float | None  # None: unknown (too few samples anywhere)
    basis: Literal["host", "network", "none"]
    host: Tally
    network: Tally

    def describe(self) -> str:
        shown = "-" if self.score is None else f"{self.score:.2f}"
        return f"score={shown} basis={self.basis} host[{self.host}] net[{self.network}]"


def _key(outcome: MailOutcome, unit: str) -> str:
    return f"{KEY_PREFIX}:{outcome.value}:{unit}"


async def tally(store: StateStore, unit: str, window: float) -> Tally:
    counts = await asyncio.gather(*(store.window_count(_key(o, unit), window=window)
                                    for o in MailOutcome))
    by = dict(zip(MailOutcome, counts, strict=True))
    return Tally(accepted=by[MailOutcome.ACCEPTED], rejected=by[MailOutcome.REJECTED],
                 spam=by[MailOutcome.SPAM], virus=by[MailOutcome.VIRUS])


async def lookup(store: StateStore, ip: str,
                 settings: ReputationSettings | None = None) -> Reputation:
    """The client's reputation: its own tally if big enough, else its network's."""
    settings = settings or ReputationSettings()
    host, network = await asyncio.gather(tally(store, host_unit(ip), settings.window),
                                         tally(store, network_unit(ip), settings.window))
    host_score = score(host, settings)
    if host_score is not None:
        return Reputation(host_score, "host", host, network)
    network_score = score(network, settings)
    if network_score is not None:
        return Reputation(network_score, "network", host, network)
    return Reputation(None, "none", host, network)


async def record_outcome(store: StateStore, ip: str, outcome: MailOutcome | str,
                         settings: ReputationSettings | None = None) -> None:
    """Count one decided message from `ip` for its host and its network.

    Call once per message decision (not per recipient), never for a TEMPFAIL, and never
    for mail refused before it was decided (see the module docstring). Clients that are
    not IP addresses are not counted.
    """
    outcome = MailOutcome(outcome)
    if not _is_address(ip):
        return
    window = (settings or ReputationSettings()).window
    # One after the other: on the node-local store each finishes at once, where a
    # gather would make two Tasks per message; on Redis it is one more round trip.
    await store.hit(_key(outcome, host_unit(ip)), window=window)
    await store.hit(_key(outcome, network_unit(ip)), window=window)


async def is_trusted(store: StateStore, ip: str,
                     settings: ReputationSettings | None = None) -> bool:
    """True for a known good sender: score >= `trusted_above` from enough samples."""
    settings = settings or ReputationSettings()
    if parse_ip(ip) is None:
        return False
    found = await lookup(store, ip, settings)
    return found.score is not None and found.score >= settings.trusted_above


def settings_of(ctx: Context) -> ReputationSettings:
    """`ctx.services.settings.reputation`, or the defaults when none is wired."""
    found = getattr(getattr(ctx.services, "settings", None), "reputation", None)
    return found if isinstance(found, ReputationSettings) else ReputationSettings()


def store_of(ctx: Context) -> StateStore | None:
    """`ctx.services.state`, None when the node has no store wired."""
    store: StateStore | None = getattr(ctx.services, "state", None)
    return store


class ReputationCheck:
    """CONNECT: tarpit, defer or refuse clients whose recent mail was mostly unwanted."""

    name: ClassVar[str] = "reputation"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT})
    timeout: ClassVar[float] = 5.0
    on_error: ClassVar[Action] = Action.CONTINUE  # advice: a store failure must not defer

    async def check(self, ctx: Context) -> Verdict:
        store = store_of(ctx)
        ip = ctx.session.client_ip
        if store is None or parse_ip(ip) is None:
            ctx.note(Outcome.SKIP, "no state store" if store is None else "not an IP client")
            return CONTINUE
        settings = settings_of(ctx)
        found = await ctx.once(REPUTATION_FACT, lambda: lookup(store, ip, settings))
        if found.score is None:
            ctx.note(Outcome.SKIP, f"unknown ({found.describe()})")
            return CONTINUE
        if found.score < settings.reject_below:
            ctx.note(Outcome.FAIL, f"reject {found.describe()}")
            return Verdict(Action.REJECT, REJECTED_REPLY,
                           reason=f"poor reputation {found.score:.2f} ({found.basis})")
        if found.score < settings.tempfail_below:
            ctx.note(Outcome.FAIL, f"tempfail {found.describe()}")
            return Verdict(Action.TEMPFAIL, TEMPFAIL_REPLY,
                           reason=f"poor reputation {found.score:.2f} ({found.basis})")
        if found.score < settings.tarpit_below and settings.tarpit_seconds > 0:
            seconds = settings.tarpit_seconds

            async def delay() -> float:
                return seconds

            await ctx.once(TARPIT_FACT, delay)
            ctx.note(Outcome.FAIL, f"tarpit {seconds:g}s {found.describe()}")
            return CONTINUE
        ctx.note(Outcome.PASS, found.describe())
        return CONTINUE


__all__ = [
    "REPUTATION_FACT",
    "TARPIT_FACT",
    "MailOutcome",
    "Reputation",
    "ReputationCheck",
    "ReputationSettings",
    "Tally",
    "aggregate",
    "host_unit",
    "is_trusted",
    "lookup",
    "network_unit",
    "parse_ip",
    "record_outcome",
    "score",
]
