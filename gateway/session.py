"""Typed per-connection and per-transaction state; no I/O.

A `Session` lives as long as the connection: the client's address (after PROXY),
HELO name, TLS state, denials held from CONNECT/HELO/MAIL until RCPT, and the ids.
A `Transaction` lives from MAIL to the end of DATA or RSET: the sender, the accepted
recipients with their tenants, and the results record. Both implement the read-only
views of `filters.base` so filters can look at them without seeing the rest.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from filters.base import Results, Stage, Verdict
from gateway.addresses import Address
from tenant_api_client.models import Recipient, Tenant

_id_prefix: tuple[int, str] = (0, "")
_id_counter = itertools.count()


def new_session_id() -> str:
    """12 hex digits: a random per-process prefix and a counter (cheaper than 6 random
    bytes per session; the prefix is drawn again in a forked worker)."""
    global _id_prefix
    pid = os.getpid()
    if _id_prefix[0] != pid:
        _id_prefix = (pid, secrets.token_hex(3).upper())
    return f"{_id_prefix[1]}{next(_id_counter) & 0xFFFFFF:06X}"


@dataclass(slots=True)
class HeldDenial:
    """A REJECT/TEMPFAIL from before RCPT, applied at RCPT in the tenant's context."""

    stage: Stage
    filter: str
    verdict: Verdict


@dataclass(slots=True)
class Session:
    session_id: str
    client_ip: str
    client_port: int
    local_ip: str = ""
    local_port: int = 0
    proxied_by: str | None = None  # the balancer's address when PROXY protocol was used
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    started: float = field(default_factory=time.monotonic)
    held: list[HeldDenial] = field(default_factory=list)
    results: Results = field(default_factory=Results)  # CONNECT/HELO notes
    transactions: int = 0
    errors: int = 0


@dataclass(slots=True)
class AcceptedRecipient:
    """A recipient accepted at RCPT: what the client said and what the directory said."""

    given: Address
    recipient: Recipient

    @property
    def address(self) -> str:
        return self.given.text

    @property
    def lookup_key(self) -> str:
        return self.recipient.address

    @property
    def tenant(self) -> str:
        return self.recipient.tenant


@dataclass(slots=True)
class Transaction:
    sender: Address | None  # None for the null sender
    mail_params: dict[str, str]
    started: float = field(default_factory=time.monotonic)
    recipients: list[AcceptedRecipient] = field(default_factory=list)
    accepted_rcpt_commands: int = 0  # duplicates included: what the limit counts
    tenants: dict[str, Tenant] = field(default_factory=dict)
    results: Results = field(default_factory=Results)
    declared_size: int = 0
    smtputf8: bool = False
    eight_bit: bool = False

    @property
    def sender_text(self) -> str:
        return "" if self.sender is None else self.sender.text


# Policy -> its mapping. Building the mapping walks ~25 fields (msgspec has no cheap
# asdict), and it was built for every recipient and every message; a Policy is frozen,
# so its mapping can be shared. Keyed by id() with the policy kept alive beside it, so
# an id is never reused while its entry exists; emptied when full (policies are
# replaced when the directory refreshes).
_POLICY_MAPPINGS: dict[int, tuple[Any, dict[str, Any]]] = {}
_POLICY_MAPPINGS_MAX = 1024


def _policy_mapping(policy: Any) -> dict[str, Any]:
    cached = _POLICY_MAPPINGS.get(id(policy))
    if cached is not None and cached[0] is policy:
        return cached[1]
    if len(_POLICY_MAPPINGS) >= _POLICY_MAPPINGS_MAX:
        _POLICY_MAPPINGS.clear()
    mapping: dict[str, Any] = policy.as_mapping()
    _POLICY_MAPPINGS[id(policy)] = (policy, mapping)
    return mapping


class TenantViewImpl:
    """A tenant as filters see it; `overrides` add a mailbox group's own settings.

    `policy` is a read-only mapping (filters.base.TenantView); without overrides it is
    the one shared mapping of the tenant's Policy object.
    """

    def __init__(self, tenant: Tenant, overrides: dict[str, Any] | None = None) -> None:
        self._tenant = tenant
        self._policy = ({**_policy_mapping(tenant.policy), **overrides} if overrides
                        else _policy_mapping(tenant.policy))

    @property
    def id(self) -> str:
        return self._tenant.id

    @property
    def policy(self) -> dict[str, Any]:
        return self._policy


class SessionView:
    def __init__(self, session: Session) -> None:
        self._s = session

    @property
    def session_id(self) -> str:
        return self._s.session_id

    @property
    def client_ip(self) -> str:
        return self._s.client_ip

    @property
    def client_port(self) -> int:
        return self._s.client_port

    @property
    def helo(self) -> str | None:
        return self._s.helo

    @property
    def tls(self) -> bool:
        return self._s.tls


class EnvelopeViewImpl:
    def __init__(self, txn: Transaction | None, recipients: Sequence[AcceptedRecipient],
                 current: AcceptedRecipient | None, size: int) -> None:
        self._txn = txn
        self._recipients = recipients
        self._current = current
        self._size = size

    @property
    def sender(self) -> str:
        return "" if self._txn is None else self._txn.sender_text

    @property
    def recipients(self) -> Sequence[AcceptedRecipient]:
        return self._recipients

    @property
    def current_recipient(self) -> AcceptedRecipient | None:
        return self._current

    @property
    def size(self) -> int:
        return self._size


@dataclass(slots=True)
class MessageData:
    """The received message in memory (the MESSAGE stage's view)."""

    data: bytes
    header_size: int

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def header_bytes(self) -> bytes:
        return self.data[: self.header_size]

    def content(self) -> bytes:
        return self.data


def header_end(content: bytes) -> int:
    """Offset just past the blank line ending the header section (or 0 if none)."""
    if content.startswith(b"\r\n"):
        return 2
    index = content.find(b"\r\n\r\n")
    return len(content) if index < 0 else index + 4
