"""The filter contract: every check in mailedge is a `Filter` returning a `Verdict`.

A filter has a name, the SMTP stages it may run at, a timeout, and what an error
means (TEMPFAIL unless the check is purely advisory). The pipeline (in the gateway)
calls `check(ctx)` for the stages configured in `[pipeline]`, in order; the first
verdict other than CONTINUE settles the stage. Filters see the session, the envelope,
the tenant and the message only through the read-only views below, and reach the
outside world only through `ctx.services`, so they never import gateway internals
and can be tested with any object that fits these Protocols.

Every filter records what it found with `ctx.note(outcome, detail)`; the notes form the
message's results record, which feeds logs, metrics and Authentication-Results.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

T = TypeVar("T")


class Stage(enum.Enum):
    """Points in the SMTP dialogue where filters run, in protocol order."""

    CONNECT = "connect"  # after any PROXY header, before the banner
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"  # once per recipient; ctx.tenant is known from here on
    MESSAGE = "message"  # after end-of-data, once per tenant; the message is spooled


class Action(enum.Enum):
    CONTINUE = "continue"  # no opinion: ask the next filter
    ACCEPT = "accept"  # settle this stage now: skip the remaining filters
    TEMPFAIL = "tempfail"  # 4xx: the sender should try again later
    REJECT = "reject"  # 5xx: the sender should not try again
    QUARANTINE = "quarantine"  # MESSAGE only: accept, then hold instead of delivering
    DISCARD = "discard"  # MESSAGE only: accept, then drop (rare, always logged)


class Outcome(enum.Enum):
    """What a filter found, for the results record (not what should happen)."""

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply as the peer reads it: short, bland, with an enhanced status code."""

    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reply: Reply | None = None  # None: the pipeline uses the stage's default reply
    reason: str = ""  # for operators (logs, results record), never the wire
    add_headers: Sequence[tuple[str, str]] = ()  # MESSAGE only: applied to the accepted copy


CONTINUE = Verdict(Action.CONTINUE)


@dataclass(frozen=True, slots=True)
class ResultEntry:
    """One line of the results record."""

    filter: str
    stage: Stage
    outcome: Outcome
    detail: str = ""
    tenant: str | None = None


@dataclass(slots=True)
class Results:
    """The results record of one transaction (or of the connection before MAIL).

    `entries` is the pass/fail/skip/error line of every filter call; `facts` holds what
    checks computed once for the whole message (SPF, DKIM, DMARC, ARC results, each
    under its own key) so that every tenant's filters decide from the same scan.
    """

    entries: list[ResultEntry] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, entry: ResultEntry) -> None:
        self.entries.append(entry)

    def for_filter(self, name: str) -> list[ResultEntry]:
        return [e for e in self.entries if e.filter == name]


class SessionInfo(Protocol):
    """The connection as filters see it."""

    @property
    def session_id(self) -> str: ...
    @property
    def client_ip(self) -> str: ...  # after PROXY protocol, the real client
    @property
    def client_port(self) -> int: ...
    @property
    def helo(self) -> str | None: ...
    @property
    def tls(self) -> bool: ...


class RecipientView(Protocol):
    @property
    def address(self) -> str: ...  # as the client gave it
    @property
    def lookup_key(self) -> str: ...  # normalised local@domain
    @property
    def tenant(self) -> str: ...


class EnvelopeView(Protocol):
    @property
    def sender(self) -> str: ...  # "" for the null sender
    # accepted so far; at MESSAGE only the tenant's own
    @property
    def recipients(self) -> Sequence[RecipientView]: ...
    @property
    def current_recipient(self) -> RecipientView | None: ...  # at RCPT only
    @property
    def size(self) -> int: ...  # message size at MESSAGE, SIZE= parameter or 0 before


class TenantView(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def policy(self) -> Mapping[str, Any]: ...


class MessageView(Protocol):
    """The spooled message: headers parsed lazily, body read from memory or disk."""

    @property
    def size(self) -> int: ...
    @property
    def header_bytes(self) -> bytes: ...  # up to and including the empty line

    def content(self) -> bytes: ...


class Context(Protocol):
    """What a filter may look at. Everything is read-only except note()."""

    @property
    def stage(self) -> Stage: ...
    @property
    def session(self) -> SessionInfo: ...
    @property
    def envelope(self) -> EnvelopeView: ...
    @property
    def tenant(self) -> TenantView | None: ...  # None before RCPT
    @property
    def message(self) -> MessageView | None: ...  # MESSAGE stage only
    @property
    def services(self) -> Any: ...  # DNS, tenant directory, clock, scanners: injected

    def note(self, outcome: Outcome, detail: str = "") -> None:
        """Record pass / fail / skip / error for the calling filter."""

    async def once(self, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        """The transaction's fact `key`, computed by the first caller only.

        Scan once, decide per tenant: the MESSAGE filters of several tenants run
        concurrently, and all of them get the one computation's result (or exception).
        """
        ...

    async def session_once(self, key: str, compute: Callable[[], Awaitable[T]],
                           keep: Callable[[T], bool]) -> T:
        """The connection's fact `key`, computed once for all its transactions.

        For facts that depend only on the connection (client address, HELO name: put
        the name in `key`). A result for which `keep` is false, or an exception, is
        forgotten once it has been returned, so the next transaction computes it again
        (a temporary DNS failure must not stick to the whole connection).
        """
        ...

    def fact(self, key: str) -> Any:
        """A fact computed earlier in the transaction (None if it was not)."""


class Filter(Protocol):
    """One check with one job.

    A filter never opens sockets of its own, never sends mail and never decides the
    reply of another stage. The pipeline calls check() only at stages listed in
    `stages`, enforces `timeout`, and turns an exception or a timeout into `on_error`.
    """

    name: ClassVar[str]
    stages: ClassVar[frozenset[Stage]]
    timeout: ClassVar[float]
    on_error: ClassVar[Action]

    async def check(self, ctx: Context) -> Verdict: ...
