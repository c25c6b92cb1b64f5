"""The LMTP delivery agent: the `lmtp` package behind the DeliveryAgent interface.

One agent per storage backend (endpoint). It turns the LMTP client's per-recipient
replies into Outcomes and its errors into a temporary outcome for every recipient
without a final reply — a backend that is down or breaks the dialogue never makes a
message bounce. A recipient whose reply was lost after the data was sent is retried
(at-least-once: a possible duplicate, never a loss).
"""

from __future__ import annotations

import logging

from gateway.delivery import DeliveryJob, Outcome
from lmtp.client import LmtpTimeouts
from lmtp.errors import (
    ConnectError,
    ConnectionLost,
    ExtensionNotSupported,
    LmtpError,
    LmtpTimeout,
    LocalProtocolError,
    ServerUnavailable,
)
from lmtp.pool import LmtpPool
from lmtp.replies import Reply

log = logging.getLogger(__name__)


def _outcome(reply: Reply, remote: str) -> Outcome:
    status = reply.enhanced or {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(reply.code // 100,
                                                                         "4.0.0")
    return Outcome(reply.code, status, reply.text, remote)


class LmtpAgent:
    def __init__(self, endpoint: str, *, lhlo_name: str, max_connections: int,
                 connect_timeout: float, command_timeout: float, data_timeout: float) -> None:
        self.endpoint = endpoint
        self.remote = f"lmtp {endpoint}"
        self.pool = LmtpPool(endpoint, max_connections=max_connections, lhlo_name=lhlo_name,
                             timeouts=LmtpTimeouts(connect=connect_timeout,
                                                   command=command_timeout, data=data_timeout))

    async def deliver(self, job: DeliveryJob) -> list[Outcome]:
        # SMTPUTF8 only where the addresses need it: a client may ask for it on any
        # message, and storage such as Dovecot 2.3 does not offer it; the UTF-8 headers
        # of an ASCII-addressed message pass through LMTP as 8-bit data anyway.
        needs_utf8 = job.smtputf8 and not (job.sender.isascii()
                                           and all(r.isascii() for r in job.recipients))
        try:
            replies = await self.pool.send(job.sender, job.recipients, job.message,
                                           smtputf8=needs_utf8, eight_bit=job.eight_bit)
        except ExtensionNotSupported as exc:
            # The backend cannot take this message as it is (e.g. SMTPUTF8): permanent.
            log.warning("queue=%s lmtp %s: %s", job.queue_id, self.endpoint, exc)
            return [Outcome(554, "5.6.7", f"Storage cannot accept this message: {exc}",
                            self.remote)] * len(job.recipients)
        except LocalProtocolError as exc:
            # Something LMTP cannot carry (a control character in an address): retrying
            # cannot help, so it fails now and the sender hears why.
            log.warning("queue=%s lmtp %s refused locally: %s", job.queue_id, self.endpoint,
                        exc)
            return [Outcome(553, "5.1.3", "Address not deliverable to storage", self.remote)
                    ] * len(job.recipients)
        except LmtpError as exc:
            # Nothing answered at all: the backend is unreachable or unwell (4.4.1/4.4.2,
            # which makes the router pause it); otherwise the dialogue broke midway.
            unreachable = (isinstance(exc, ConnectError | ConnectionLost | ServerUnavailable)
                           and not exc.any_reply and not exc.data_sent)
            status = ("4.4.2" if isinstance(exc, LmtpTimeout) else
                      "4.4.1" if unreachable else "4.3.0")
            log.warning("queue=%s lmtp %s: %s: %s", job.queue_id, self.endpoint,
                        type(exc).__name__, exc)
            partial = exc.partial_results or [None] * len(job.recipients)
            text = f"Storage backend error: {type(exc).__name__}"
            return [_outcome(r, self.remote) if r is not None
                    else Outcome(451, status, text, self.remote) for r in partial]
        return [_outcome(reply, self.remote) for reply in replies]

    async def aclose(self) -> None:
        await self.pool.aclose()
