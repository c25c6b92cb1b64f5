"""The exceptions `lmtp` raises, and what each one means for the recipients of an attempt.

The tree::

    LmtpError                      base class; never raised itself
    ├── ConnectError               backend unreachable: refused, no route, DNS failure  [T]
    ├── ConnectionLost             the backend closed or reset an open connection       [T]
    ├── LmtpTimeout                a phase (connect, command, data) ran out of time     [T]
    ├── ServerUnavailable          421 at any point, a greeting other than 220, or
    │                              LHLO refused: the backend will not serve us now      [T]
    ├── LmtpProtocolError          the dialogue broke
    │   ├── RemoteProtocolError    the server sent something malformed or out of order  [T]
    │   └── LocalProtocolError     we used the state machine wrongly: a bug, not the
    │                              backend's fault (bad address, call out of sequence)
    └── ExtensionNotSupported      the transaction needs an extension (SMTPUTF8) that
                                   the server did not advertise in its LHLO reply

[T] = *temporary for every recipient that has no reply yet*: the delivery agent should
retry those recipients later (4xx), never bounce them. The class attribute
`temporary` says the same in code.

Except for `LocalProtocolError` and `ExtensionNotSupported` raised before anything was
written, every one of these means the connection is finished: the driver closes it and a
pool never hands it out again.

An error raised while a transaction was under way carries what is already known:

* `partial_results`: one entry per recipient, aligned with the recipients passed in.
  An entry is the server's final word on that recipient (a refused RCPT, or a reply after
  the final dot); `None` means no final word was received.
* `data_sent`: True once the message payload was handed to the transport. When it is
  True, a recipient whose entry is `None` may or may not have been delivered (the server
  can deliver and then fail to send the reply), so a retry can duplicate that copy --
  the classic SMTP "lost reply" problem of RFC 1047, which no client can fully avoid.
  When it is False nothing of the transaction can have been delivered, and a retry is
  always safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .replies import Reply

__all__ = [
    "ConnectError",
    "ConnectionLost",
    "ExtensionNotSupported",
    "LmtpError",
    "LmtpProtocolError",
    "LmtpTimeout",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ServerUnavailable",
]


class LmtpError(Exception):
    """Base class of everything `lmtp` raises on purpose."""

    #: True when every recipient without a reply should be retried later (a 4xx).
    temporary: ClassVar[bool] = True

    def __init__(
        self,
        message: str,
        *,
        partial_results: Sequence[Reply | None] = (),
        data_sent: bool = False,
    ) -> None:
        super().__init__(message)
        self.partial_results: tuple[Reply | None, ...] = tuple(partial_results)
        self.data_sent = data_sent

    @property
    def any_reply(self) -> bool:
        """True if the server gave a final word on at least one recipient."""
        return any(r is not None for r in self.partial_results)


class ConnectError(LmtpError):
    """The backend could not be reached: connection refused, no route, unknown host."""


class ConnectionLost(LmtpError):
    """The backend closed or reset a connection while we were waiting for it."""


class LmtpTimeout(LmtpError):
    """A phase did not finish within its timeout. `phase` is connect, command or data."""

    def __init__(
        self,
        message: str,
        *,
        phase: str,
        partial_results: Sequence[Reply | None] = (),
        data_sent: bool = False,
    ) -> None:
        super().__init__(message, partial_results=partial_results, data_sent=data_sent)
        self.phase = phase


class ServerUnavailable(LmtpError):
    """The server said it will not serve us now (421, a bad greeting, LHLO refused).

    `reply` is the reply that said so.
    """

    def __init__(
        self,
        message: str,
        *,
        reply: Reply | None = None,
        partial_results: Sequence[Reply | None] = (),
        data_sent: bool = False,
    ) -> None:
        super().__init__(message, partial_results=partial_results, data_sent=data_sent)
        self.reply = reply


class LmtpProtocolError(LmtpError):
    """The LMTP dialogue broke; the subclass says whose fault it was."""


class RemoteProtocolError(LmtpProtocolError):
    """The server sent a malformed reply, or a reply nobody asked for."""


class LocalProtocolError(LmtpProtocolError):
    """We misused the client: a call out of sequence or an address that cannot be sent.

    This is a bug in the caller (or data that should have been refused earlier), not a
    backend problem, so it is not temporary.
    """

    temporary: ClassVar[bool] = False


class ExtensionNotSupported(LmtpError):
    """The transaction needs an extension the server did not advertise (e.g. SMTPUTF8).

    Raised before anything is written; the connection stays usable. Whether this is a
    permanent failure or a misconfigured backend to wait for is the caller's policy.
    """

    temporary: ClassVar[bool] = False

    def __init__(self, message: str, *, extension: str) -> None:
        super().__init__(message)
        self.extension = extension
