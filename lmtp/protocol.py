"""The LMTP client as a sans-IO state machine: bytes in, events and bytes out.

`ClientProtocol` knows the LMTP dialogue (RFC 2033) and nothing about sockets, event
loops or time; the asyncio driver in `lmtp.client` moves bytes between it and a
connection and enforces timeouts. Tests drive it by feeding scripted server bytes.

Theory of operation
-------------------

Invariants first:

1. Everything that decides what to send next and how to read a reply lives here. The
   driver only writes what this class returns, feeds it what it reads, and maps waiting
   too long onto `LmtpTimeout`.
2. Replies are matched to commands purely by order (RFC 2920 pipelining): the class keeps
   a cursor over the commands it has sent and not yet seen answered.
3. Every recipient passed to `begin()` ends with exactly one final `Reply` in
   `TransactionDone.results`, at the same index -- or the transaction raises an
   `LmtpError` whose `partial_results` holds what was known (see `lmtp.errors`).
4. After any raised error except a `LocalProtocolError` from `begin()`/`lhlo()`/`quit()`
   validation, the state is ERROR and stays there: the connection must be closed.

The caller's side, in order::

    proto = ClientProtocol()
    proto.receive_data(bytes_read)        # b"" means the server closed (EOF)
    proto.next_event()  -> Greeting       # or NEED_DATA: read more and feed it
    write(proto.lhlo("gw.example"))
    proto.next_event()  -> SessionReady   # extensions recorded from the LHLO reply
    write(proto.begin(sender, recipients, message))
    proto.next_event()  -> SendPayload    # write event.data ...
    proto.next_event()  -> TransactionDone(results)
    ...                                   # more transactions on the same connection
    write(proto.quit())
    proto.next_event()  -> ConnectionClosed

One transaction: `begin()` returns MAIL FROM, every RCPT TO and DATA as one buffer (an
LMTP server must support PIPELINING, RFC 2033), preceded by RSET when the previous
transaction failed midway. The replies come back in that order:

* RSET: anything but 2yz ends the connection (the server is confused).
* MAIL: 2yz goes on. Anything else refuses the whole transaction: every recipient gets
  that reply (the RCPT and DATA replies that follow are read and ignored).
* RCPT: 2yz marks the recipient accepted; 4yz/5yz is that recipient's final reply.
* DATA: 354 with at least one accepted recipient yields `SendPayload` with the encoded
  message (`lmtp.dotstuff`), and then one reply per accepted recipient arrives, in RCPT
  order (RFC 2033 §4.2); each is that recipient's final reply. 354 with nobody accepted
  (a server may pipeline its way there) yields `SendPayload(b".\\r\\n")`: an empty
  message, whose single reply is read and discarded. 4yz/5yz to DATA is the final reply
  of every accepted recipient.
* 421 to any command means the server is closing the connection: `ServerUnavailable`.

A transaction that ended before its data was delivered leaves the server's transaction
state undefined, so the next `begin()` (but not `quit()`) starts with RSET. Before the
payload has been handed out, nothing can have been delivered: `data_sent` tells the
caller whether a retry could duplicate a delivery.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from .dotstuff import encode_data
from .errors import (
    ConnectionLost,
    ExtensionNotSupported,
    LmtpError,
    LocalProtocolError,
    RemoteProtocolError,
    ServerUnavailable,
)
from .replies import Reply, ReplyParser

__all__ = [
    "NEED_DATA",
    "ClientProtocol",
    "ConnectionClosed",
    "Event",
    "Greeting",
    "NeedData",
    "SendPayload",
    "SessionReady",
    "State",
    "TransactionDone",
]


class State(enum.Enum):
    """Where the client is in the dialogue."""

    AWAIT_GREETING = "await-greeting"  # connected, waiting for the 220 banner
    GREETED = "greeted"  # banner received: send LHLO (or QUIT)
    AWAIT_LHLO = "await-lhlo"  # LHLO sent
    READY = "ready"  # idle between transactions
    AWAIT_ENVELOPE = "await-envelope"  # [RSET,] MAIL, RCPT..., DATA sent
    AWAIT_DATA_REPLIES = "await-data-replies"  # payload sent: one reply per accepted RCPT
    AWAIT_DOT_REPLY = "await-dot-reply"  # lone "." sent after an unwanted 354
    AWAIT_QUIT = "await-quit"  # QUIT sent
    CLOSED = "closed"  # QUIT answered, or the server closed an idle connection
    ERROR = "error"  # an error was raised; the connection must be closed


class NeedData(enum.Enum):
    """Type of the `NEED_DATA` sentinel."""

    NEED_DATA = "NEED_DATA"


#: Returned by `next_event()` when no event is possible until more bytes are received.
NEED_DATA: Final = NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's 220 banner arrived; send LHLO next."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class SessionReady:
    """LHLO was accepted; `extensions` maps upper-case keywords to their parameters."""

    reply: Reply
    extensions: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class SendPayload:
    """DATA got 354: write `data` now (the payload, or ".\\r\\n" if nobody was accepted)."""

    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class TransactionDone:
    """The transaction is over; one final reply per recipient, in the order given."""

    results: tuple[Reply, ...]


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """QUIT was answered (`reply`), or the server closed an idle connection (None)."""

    reply: Reply | None


Event = Greeting | SessionReady | SendPayload | TransactionDone | ConnectionClosed

_END_OF_DATA: Final = b".\r\n"
_DATA_CMD: Final = "DATA\r\n"
_RSET_CMD: Final = "RSET\r\n"

# Characters that must never reach a command line: controls (CR and LF would let an
# address smuggle a command), and the angle brackets that delimit the address (a ">"
# would let it append parameters). Addresses arrive here already parsed and validated
# by the SMTP side; this is the last line of defence, not an address parser.
_BAD_ADDRESS: Final = re.compile(r"[\x00-\x1f\x7f<>]")
_BAD_HOSTNAME: Final = re.compile(r"[\x00-\x20\x7f-\uffff]")


class _Transaction:
    """Bookkeeping for one transaction, from `begin()` to its last reply."""

    __slots__ = (
        "accepted",
        "data_sent",
        "mail_reply",
        "n",
        "next_accepted",
        "payload",
        "position",
        "results",
        "rset_pending",
    )

    def __init__(self, n: int, payload: bytes, rset_pending: bool) -> None:
        self.n = n
        self.payload = payload
        self.rset_pending = rset_pending
        self.position = 0  # 0 = MAIL, 1..n = RCPT, n+1 = DATA
        self.mail_reply: Reply | None = None  # set when MAIL was refused
        self.results: list[Reply | None] = [None] * n
        self.accepted: list[int] = []  # indexes of recipients whose RCPT got 2yz
        self.next_accepted = 0  # cursor into `accepted` after the payload
        self.data_sent = False

    def partial(self) -> tuple[Reply | None, ...]:
        if self.mail_reply is not None:
            return (self.mail_reply,) * self.n
        return tuple(self.results)


class ClientProtocol:
    """One client connection's LMTP state; see the module docstring."""

    def __init__(self) -> None:
        self.state = State.AWAIT_GREETING
        self.greeting: Reply | None = None
        self.lhlo_reply: Reply | None = None
        #: LHLO extensions: upper-case keyword -> parameters ("" when none).
        self.extensions: dict[str, str] = {}
        self._parser = ReplyParser()
        self._replies: deque[Reply] = deque()  # parsed, not yet consumed
        self._input_error: RemoteProtocolError | None = None  # raised after _replies
        self._eof = False
        self._needs_reset = False
        self._tx: _Transaction | None = None

    # -- input ---------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the server; b"" means the server closed its side.

        Never raises for what the server sent: a malformed reply is reported by the
        `next_event()` call that reaches it.
        """
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        if not data:
            self._eof = True
        elif self._input_error is None:
            try:
                self._replies.extend(self._parser.feed(data))
            except RemoteProtocolError as exc:
                self._input_error = exc

    @property
    def eof_received(self) -> bool:
        """True once `receive_data(b"")` was called."""
        return self._eof

    @property
    def has_pending_input(self) -> bool:
        """True if received bytes have not all been consumed as replies."""
        return bool(self._replies) or self._parser.pending or self._input_error is not None

    @property
    def is_idle(self) -> bool:
        """True if a transaction may start now with nothing unexplained on the wire."""
        return self.state is State.READY and not self._eof and not self.has_pending_input

    @property
    def data_sent(self) -> bool:
        """True once the current (or last failed) transaction's payload was handed out."""
        return self._tx is not None and self._tx.data_sent

    def partial_results(self) -> tuple[Reply | None, ...]:
        """Final replies known so far for the transaction under way (see lmtp.errors)."""
        return () if self._tx is None else self._tx.partial()

    def next_event(self) -> Event | NeedData:
        """The next event, or `NEED_DATA` if more bytes must be received first.

        Raises `ServerUnavailable` (421, bad greeting, LHLO refused), `ConnectionLost`
        (end of stream while a reply was due), `RemoteProtocolError` (a malformed or
        unexpected reply); each leaves the state ERROR, with the transaction's progress
        attached. Raises `LocalProtocolError` if called in the ERROR or CLOSED state
        (after `ConnectionClosed` there is nothing more to read).
        """
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is in the error state; close it")
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        try:
            while True:
                reply = self._next_reply()
                if reply is None:
                    return self._on_no_reply()
                event = self._dispatch(reply)
                if event is not None:
                    return event
        except LmtpError as exc:
            raise self._fail(exc) from None

    # -- output --------------------------------------------------------------------

    def lhlo(self, name: str) -> bytes:
        """The LHLO command, after the `Greeting` event."""
        self._require(State.GREETED, "LHLO")
        if not name or _BAD_HOSTNAME.search(name):
            raise LocalProtocolError(f"invalid LHLO name {name!r}")
        self.state = State.AWAIT_LHLO
        return f"LHLO {name}\r\n".encode("ascii")

    def begin(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        smtputf8: bool = False,
        eight_bit: bool = False,
    ) -> bytes:
        """Start a transaction; return [RSET,] MAIL, RCPT..., DATA as one buffer.

        `sender` "" is the null sender. `message` is the message as stored (any line
        endings); it is encoded for DATA here. `eight_bit` adds BODY=8BITMIME if the
        server advertised 8BITMIME (LMTP servers store 8-bit mail either way);
        `smtputf8` adds SMTPUTF8 and allows UTF-8 addresses, and raises
        `ExtensionNotSupported` if the server did not advertise it.

        Raises `LocalProtocolError` when called outside READY, with no recipients, or
        with an address that cannot be sent; the state is unchanged then.
        """
        self._require(State.READY, "a transaction")
        if self.has_pending_input or self._eof:
            self._check_idle()
        if not recipients:
            raise LocalProtocolError("a transaction needs at least one recipient")
        params = ""
        if eight_bit and "8BITMIME" in self.extensions:
            params = " BODY=8BITMIME"
        if smtputf8:
            if "SMTPUTF8" not in self.extensions:
                raise ExtensionNotSupported(
                    "the server did not advertise SMTPUTF8", extension="SMTPUTF8"
                )
            params += " SMTPUTF8"
        _check_address(sender, "sender")
        parts = [_RSET_CMD] if self._needs_reset else []
        parts.append(f"MAIL FROM:<{sender}>{params}\r\n")
        for rcpt in recipients:
            if not rcpt:
                raise LocalProtocolError("empty recipient address")
            _check_address(rcpt, "recipient")
            parts.append(f"RCPT TO:<{rcpt}>\r\n")
        parts.append(_DATA_CMD)
        text = "".join(parts)
        try:
            wire = text.encode("utf-8" if smtputf8 else "ascii")
        except UnicodeEncodeError:
            raise LocalProtocolError("a non-ASCII address needs smtputf8=True") from None
        self._tx = _Transaction(len(recipients), encode_data(message), self._needs_reset)
        self._needs_reset = False
        self.state = State.AWAIT_ENVELOPE
        return wire

    def quit(self) -> bytes:
        """The QUIT command; allowed after the greeting and between transactions."""
        if self.state is not State.READY and self.state is not State.GREETED:
            raise LocalProtocolError(f"cannot QUIT in state {self.state.value}")
        self.state = State.AWAIT_QUIT
        return b"QUIT\r\n"

    # -- internals -----------------------------------------------------------------

    def _require(self, state: State, what: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"cannot start {what} in state {self.state.value}")

    def _fail(self, exc: LmtpError) -> LmtpError:
        """Enter ERROR and attach the transaction's progress to `exc`."""
        self.state = State.ERROR
        if self._tx is not None:
            exc.partial_results = self._tx.partial()
            exc.data_sent = self._tx.data_sent
        return exc

    def _next_reply(self) -> Reply | None:
        if self._replies:
            return self._replies.popleft()
        if self._input_error is not None:
            raise self._input_error
        return None

    def _check_idle(self) -> None:
        """Raise for anything the server sent while no command was outstanding."""
        try:
            reply = self._next_reply()
            if reply is not None:
                self._dispatch(reply)  # READY: always raises
            if self._parser.pending:
                raise RemoteProtocolError("server sent data while no command was pending")
            raise ConnectionLost("server closed the connection")
        except LmtpError as exc:
            raise self._fail(exc) from None

    def _on_no_reply(self) -> Event | NeedData:
        if not self._eof:
            return NEED_DATA
        state = self.state
        if state is State.AWAIT_QUIT or (
            (state is State.READY or state is State.GREETED) and not self._parser.pending
        ):
            self.state = State.CLOSED
            return ConnectionClosed(None)
        raise ConnectionLost(f"server closed the connection in state {state.value}")

    def _dispatch(self, reply: Reply) -> Event | None:
        state = self.state
        if reply.code == 421 and state is not State.AWAIT_QUIT:
            raise ServerUnavailable(f"server is closing the connection: {reply}", reply=reply)
        if state is State.AWAIT_ENVELOPE:
            return self._on_envelope_reply(reply)
        if state is State.AWAIT_DATA_REPLIES:
            return self._on_data_reply(reply)
        if state is State.AWAIT_DOT_REPLY:
            return self._on_dot_reply(reply)
        if state is State.AWAIT_GREETING:
            return self._on_greeting(reply)
        if state is State.AWAIT_LHLO:
            return self._on_lhlo_reply(reply)
        if state is State.AWAIT_QUIT:
            self.state = State.CLOSED
            return ConnectionClosed(reply)
        raise RemoteProtocolError(f"unexpected reply in state {state.value}: {reply}")

    def _on_greeting(self, reply: Reply) -> Event:
        self.greeting = reply
        if reply.code != 220:
            raise ServerUnavailable(f"server refused the session: {reply}", reply=reply)
        self.state = State.GREETED
        return Greeting(reply)

    def _on_lhlo_reply(self, reply: Reply) -> Event:
        self.lhlo_reply = reply
        if not reply.is_positive:
            raise ServerUnavailable(f"LHLO refused: {reply}", reply=reply)
        extensions: dict[str, str] = {}
        for line in reply.lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            if keyword:
                extensions[keyword.upper()] = params.strip()
        self.extensions = extensions
        self.state = State.READY
        return SessionReady(reply, extensions)

    def _on_envelope_reply(self, reply: Reply) -> Event | None:
        tx = self._tx
        assert tx is not None
        if tx.rset_pending:
            tx.rset_pending = False
            if not reply.is_positive:
                raise RemoteProtocolError(f"RSET refused: {reply}")
            return None
        position = tx.position
        tx.position = position + 1
        if position <= tx.n:
            if reply.is_intermediate:
                what = "MAIL" if position == 0 else "RCPT"
                raise RemoteProtocolError(f"{what} answered with an intermediate reply: {reply}")
            if position == 0:
                if not reply.is_positive:
                    tx.mail_reply = reply
            elif tx.mail_reply is None:
                if reply.is_positive:
                    tx.accepted.append(position - 1)
                else:
                    tx.results[position - 1] = reply
            return None
        # The DATA reply.
        if reply.code == 354:
            if tx.accepted:
                tx.data_sent = True
                self.state = State.AWAIT_DATA_REPLIES
                return SendPayload(tx.payload)
            self.state = State.AWAIT_DOT_REPLY
            return SendPayload(_END_OF_DATA)
        if reply.is_positive or reply.is_intermediate:
            raise RemoteProtocolError(f"DATA answered with {reply.code} instead of 354")
        for i in tx.accepted:
            tx.results[i] = reply
        self._needs_reset = True
        return self._finish(tx)

    def _on_data_reply(self, reply: Reply) -> Event | None:
        tx = self._tx
        assert tx is not None
        if reply.is_intermediate:
            raise RemoteProtocolError(f"intermediate reply after the payload: {reply}")
        k = tx.next_accepted
        tx.results[tx.accepted[k]] = reply
        tx.next_accepted = k + 1
        if k + 1 < len(tx.accepted):
            return None
        return self._finish(tx)

    def _on_dot_reply(self, reply: Reply) -> Event:
        tx = self._tx
        assert tx is not None
        if reply.is_intermediate:
            raise RemoteProtocolError(f"intermediate reply after end of data: {reply}")
        self._needs_reset = True
        return self._finish(tx)

    def _finish(self, tx: _Transaction) -> TransactionDone:
        partial = tx.partial()
        results = tuple(r for r in partial if r is not None)
        assert len(results) == tx.n, "every recipient must have a final reply"
        if tx.mail_reply is not None:
            self._needs_reset = True
        self._tx = None
        self.state = State.READY
        return TransactionDone(results)


def _check_address(address: str, what: str) -> None:
    if _BAD_ADDRESS.search(address):
        raise LocalProtocolError(f"{what} address contains a forbidden character")
