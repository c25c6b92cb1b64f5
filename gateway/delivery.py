"""The delivery interface: what the queue hands to an agent and what it gets back.

A delivery agent takes one message and a group of its recipients that share a
destination (one LMTP backend, one Maildir root, one remote MX) and answers with one
outcome per recipient, in the same order. The queue decides what each outcome means:
2xx done, 4xx retry that recipient later, 5xx a DSN for that recipient only. Agents
never raise for a per-recipient or per-destination problem; they turn it into
outcomes (a backend that cannot be reached gives every recipient the same 4xx).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Outcome:
    """One recipient's result from a delivery attempt, in SMTP reply terms."""

    code: int
    status: str  # enhanced status code, e.g. "2.0.0", "4.4.1", "5.1.1"
    text: str  # the peer's reply text or our own description, for logs and DSNs
    remote: str = ""  # who answered: "lmtp 127.0.0.1:24", "maildir", "mx.example.net"

    @property
    def delivered(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def diagnostic(self) -> str:
        """The RFC 3464 Diagnostic-Code value: 'smtp; 550 5.1.1 text'."""
        return f"smtp; {self.code} {self.status} {self.text}".strip()


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """One attempt for a group of recipients sharing a destination."""

    queue_id: str
    sender: str  # envelope sender, "" for the null sender
    recipients: Sequence[str]  # the addresses the destination expects
    message: bytes  # the complete message as spooled (with our added headers), CRLF lines
    smtputf8: bool = False
    eight_bit: bool = False


class DeliveryAgent(Protocol):
    """Delivers a job to one destination; one Outcome per recipient, same order."""

    async def deliver(self, job: DeliveryJob) -> list[Outcome]: ...

    async def aclose(self) -> None: ...
