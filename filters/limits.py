"""CONNECT, MAIL, RCPT: per-client resource limits (connections, rates of mail).

Theory of operation
-------------------
Four limits, each per client unit — the IPv4 address, or the IPv6 /64 (one host can
use every address of its /64, so counting single IPv6 addresses limits nothing) — and
each off when set to 0 (`LimitSettings`):

* `max_connections_per_ip` — concurrent sessions, **per node** (per process). At
  CONNECT the filter takes a *lease* for the session in an in-process table and gives it
  back when the session ends (`session_closed`, the disconnect hook the gateway calls).
  It is node-local by decision: a cluster-wide gauge needs a decrement that can never be
  lost, and a node that dies or a worker that is killed would leak its increments into
  Redis until they expire, blocking innocent clients. Behind an L4 balancer or several
  MX records a client's sessions spread over the nodes, so the effective cluster limit is
  about (number of nodes) times this value. As a safety net a lease also expires on its own
  `connection_lease` seconds after the session was last seen by this filter (leases are
  renewed at MAIL and RCPT), so a missed disconnect costs a slot for a while, never
  forever. Over the limit: 421 4.7.0, acted on at once.
* `connection_rate_per_minute` — new connections in a sliding minute, **cluster-wide**
  (`StateStore.hit`). Over the limit: 421 4.7.0, acted on at once.
* `messages_per_ip_per_hour` — MAIL commands in a sliding hour, cluster-wide. Over the
  limit: 451 4.7.1 at MAIL, which the gateway holds until RCPT like every MAIL denial
  (postmaster@ and abuse@ stay reachable).
* `recipients_per_ip_per_hour` — RCPT commands that passed recipient verification, in a
  sliding hour, cluster-wide. Over the limit: 451 4.7.1 for that recipient.

Only what is let through is counted (check with `window_count`, then record with `hit`):
a client that sends faster than its limit still gets exactly its limit through, instead
of falling off a cliff to nothing because its refused attempts kept the window full (which
is what counting every attempt, as Postfix's anvil does, would do to a big sender's
queue runs). Check and record are two store calls, so sessions admitted at the same
moment on several nodes can overshoot a limit by at most their number; a rate limit can
afford that. A 421 reply means "closing the channel" (RFC 5321 §3.8): the SMTP handler
sends it instead of the banner and hangs up, rather than holding it until RCPT.

Clients in `exempt` networks (monitoring, the provider's own relays) are not limited.
When the store is degraded (Redis down), it counts node-locally by itself; when it
raises, the filter's error action is CONTINUE — limits protect resources, and a broken
counter must not defer all mail.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from filters.base import (
    CONTINUE,
    Action,
    Context,
    Outcome,
    Reply,
    SessionInfo,
    Stage,
    Verdict,
)
from filters.reputation import aggregate, parse_ip
from filters.state import StateStore

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your host, "
                                           "try again later")
CONNECTION_RATE = Reply(421, "4.7.0", "Too many connections from your host in a short "
                                      "time, try again later")
TOO_MANY_MESSAGES = Reply(451, "4.7.1", "Too many messages from your host, slow down")
TOO_MANY_RECIPIENTS = Reply(451, "4.7.1", "Too many recipients from your host, slow down")

MINUTE = 60.0
HOUR = 3600.0
KEY_PREFIX = "lim"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """`[limits]`: per-client limits; 0 switches a limit off.

    max_connections_per_ip      concurrent sessions per client, per node (421 4.7.0)
    connection_rate_per_minute  new connections per client per minute, cluster-wide
                                (421 4.7.0)
    messages_per_ip_per_hour    MAIL commands per client per hour, cluster-wide
                                (451 4.7.1, held until RCPT)
    recipients_per_ip_per_hour  verified RCPTs per client per hour, cluster-wide
                                (451 4.7.1)
    connection_lease            seconds after which a session not seen since (connect,
                                MAIL, RCPT) stops counting, if its disconnect was missed
    exempt                      networks never limited ("127.0.0.0/8", "2001:db8::/32")

    A client is its IPv4 address or its IPv6 /64. The defaults leave room for the
    biggest legitimate senders a hosting provider's MX sees.
    """

    max_connections_per_ip: int = 20
    connection_rate_per_minute: int = 120
    messages_per_ip_per_hour: int = 3600
    recipients_per_ip_per_hour: int = 10000
    connection_lease: float = 3600.0
    exempt: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_connections_per_ip", "connection_rate_per_minute",
                     "messages_per_ip_per_hour", "recipients_per_ip_per_hour"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"limits.{name} must be a non-negative integer")
        if self.connection_lease <= 0:
            raise ValueError("limits.connection_lease must be greater than 0")
        for text in self.exempt:
            try:
                ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"limits.exempt: {text!r} is not a network") from None

    def is_exempt(self, ip: str) -> bool:
        address = parse_ip(ip)
        return address is not None and any(address in n for n in _networks(self.exempt))


@functools.lru_cache(maxsize=32)
def _networks(texts: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(text, strict=False) for text in texts)


def client_unit(ip: str) -> str:
    """The unit a client is limited as: its IPv4 address or its IPv6 /64."""
    return aggregate(ip, 32, 64)


def settings_of(ctx: Context) -> LimitSettings:
    """`ctx.services.settings.limits`, or the defaults when none is wired."""
    found = getattr(getattr(ctx.services, "settings", None), "limits", None)
    return found if isinstance(found, LimitSettings) else LimitSettings()


class ConnectionTable:
    """Node-local leases of live sessions per client unit.

    A lease is taken at connect, renewed while the session is active, returned at
    disconnect, and dropped on its own `lease` seconds after it was last renewed.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_unit: dict[str, dict[str, float]] = {}  # unit -> session id -> expiry
        self._unit_of: dict[str, str] = {}  # session id -> unit

    def count(self, unit: str) -> int:
        sessions = self._by_unit.get(unit)
        if not sessions:
            return 0
        now = self._clock()
        for session_id in [s for s, expiry in sessions.items() if expiry <= now]:
            self.release(session_id)
        return len(self._by_unit.get(unit, ()))

    def acquire(self, unit: str, session_id: str, lease: float) -> None:
        self.release(session_id)
        self._by_unit.setdefault(unit, {})[session_id] = self._clock() + lease
        self._unit_of[session_id] = unit

    def renew(self, session_id: str, lease: float) -> None:
        unit = self._unit_of.get(session_id)
        if unit is not None:
            self._by_unit[unit][session_id] = self._clock() + lease

    def release(self, session_id: str) -> None:
        unit = self._unit_of.pop(session_id, None)
        if unit is None:
            return
        sessions = self._by_unit[unit]
        sessions.pop(session_id, None)
        if not sessions:
            del self._by_unit[unit]

    def __len__(self) -> int:
        return len(self._unit_of)


class ConnectionLimits:
    """Connections, connection rate, messages and recipients per client."""

    name: ClassVar[str] = "limits"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT, Stage.MAIL, Stage.RCPT})
    timeout: ClassVar[float] = 5.0
    on_error: ClassVar[Action] = Action.CONTINUE  # a broken counter must not defer all mail

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.connections = ConnectionTable(clock)

    async def check(self, ctx: Context) -> Verdict:
        settings = settings_of(ctx)
        ip = ctx.session.client_ip
        if settings.is_exempt(ip):
            ctx.note(Outcome.SKIP, "exempt")
            return CONTINUE
        unit = client_unit(ip)
        if ctx.stage is Stage.CONNECT:
            return await self._connect(ctx, settings, unit)
        self.connections.renew(ctx.session.session_id, settings.connection_lease)
        if ctx.stage is Stage.MAIL:
            return await self._rate(ctx, "msg", unit, settings.messages_per_ip_per_hour,
                                    TOO_MANY_MESSAGES, "messages")
        return await self._rate(ctx, "rcpt", unit, settings.recipients_per_ip_per_hour,
                                TOO_MANY_RECIPIENTS, "recipients")

    async def session_closed(self, session: SessionInfo) -> None:
        """The disconnect hook: give the session's connection lease back (idempotent)."""
        self.connections.release(session.session_id)

    async def _connect(self, ctx: Context, settings: LimitSettings, unit: str) -> Verdict:
        store = _store(ctx)
        rate_limit = settings.connection_rate_per_minute
        rate_key = f"{KEY_PREFIX}:conn:{unit}"
        if rate_limit and store is not None:
            rate = await store.window_count(rate_key, window=MINUTE)
            if rate >= rate_limit:
                ctx.note(Outcome.FAIL, f"{rate} connections/min from {unit}, "
                         f"limit {rate_limit}")
                return Verdict(Action.TEMPFAIL, CONNECTION_RATE,
                               reason=f"connection rate {rate}/min from {unit}")
        concurrency_limit = settings.max_connections_per_ip
        if concurrency_limit:
            live = self.connections.count(unit)
            if live >= concurrency_limit:
                ctx.note(Outcome.FAIL, f"{live} connections from {unit} on this node, "
                         f"limit {concurrency_limit}")
                return Verdict(Action.TEMPFAIL, TOO_MANY_CONNECTIONS,
                               reason=f"{live} concurrent connections from {unit}")
        if rate_limit and store is not None:
            await store.hit(rate_key, window=MINUTE)
        if concurrency_limit:
            self.connections.acquire(unit, ctx.session.session_id, settings.connection_lease)
        ctx.note(Outcome.PASS, f"{unit}: {self.connections.count(unit)} live")
        return CONTINUE

    async def _rate(self, ctx: Context, kind: str, unit: str, limit: int, reply: Reply,
                    what: str) -> Verdict:
        store = _store(ctx)
        if not limit or store is None:
            ctx.note(Outcome.SKIP, "no limit" if not limit else "no state store")
            return CONTINUE
        key = f"{KEY_PREFIX}:{kind}:{unit}"
        count = await store.window_count(key, window=HOUR)
        if count >= limit:
            ctx.note(Outcome.FAIL, f"{count} {what}/h from {unit}, limit {limit}")
            return Verdict(Action.TEMPFAIL, reply, reason=f"{count} {what}/h from {unit}")
        count = await store.hit(key, window=HOUR)
        ctx.note(Outcome.PASS, f"{count} {what}/h from {unit}")
        return CONTINUE


def _store(ctx: Context) -> StateStore | None:
    store: StateStore | None = getattr(ctx.services, "state", None)
    return store


__all__ = [
    "CONNECTION_RATE",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_MESSAGES",
    "TOO_MANY_RECIPIENTS",
    "ConnectionLimits",
    "ConnectionTable",
    "LimitSettings",
    "client_unit",
]
