"""The asyncio driver: one LMTP connection over TCP or a UNIX socket.

`LmtpConnection` owns a socket and a `lmtp.protocol.ClientProtocol`, moves bytes between
them, and puts a deadline on every wait. It adds no protocol logic of its own.

Theory of operation
-------------------

Invariants:

1. A connection is used by one task at a time; `send()` calls do not overlap (a second
   caller gets `LocalProtocolError`). `LmtpPool` is how many tasks share a backend.
2. Any failure once bytes of a transaction have been written -- timeout, lost connection,
   malformed reply, 421, or the caller's task being cancelled -- aborts the socket. A
   connection whose state is in doubt is never used again, so a late reply can never be
   read as the answer to the next transaction.
3. Every phase has its own deadline (`LmtpTimeouts`): *connect* covers the TCP/UNIX
   connect, the greeting and LHLO (an overloaded backend that accepts but never greets
   counts as unreachable); *command* covers the replies to MAIL, RCPT, DATA (and a
   leading RSET), and QUIT; *data* covers writing the payload and reading every
   per-recipient reply after it. A transaction's deadlines are enforced by one timer
   per connection that re-arms itself when it fires early (the connect and QUIT
   phases use plain `asyncio.timeout`), so the usual transaction arms no timer at all.

The socket side is a small `asyncio.Protocol` rather than streams: every byte received
goes straight into the state machine, also while the connection sits idle in a pool, so
`is_reusable` can tell at once that the server closed it or sent something unasked (an
idle-timeout 421, say); unsolicited bytes close the socket.

A transaction costs two writes (envelope, then payload) and as many reads as the server
takes to answer; nothing is copied on the way except by the kernel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, cast

from .errors import (
    ConnectError,
    ConnectionLost,
    ExtensionNotSupported,
    LmtpError,
    LmtpTimeout,
    LocalProtocolError,
    RemoteProtocolError,
)
from .protocol import (
    NEED_DATA,
    ClientProtocol,
    Event,
    Greeting,
    SendPayload,
    SessionReady,
    TransactionDone,
)
from .replies import Reply

__all__ = ["DEFAULT_LHLO_NAME", "DEFAULT_TIMEOUTS", "LmtpConnection", "LmtpTimeouts"]

log = logging.getLogger(__name__)

#: Name sent with LHLO when none is configured. Backends log it; they do not check it.
DEFAULT_LHLO_NAME: Final = "localhost"

#: How long to wait for the socket to report closed after QUIT or an abort.
_CLOSE_WAIT: Final = 1.0
_NO_DEADLINE: Final = float("inf")


@dataclass(frozen=True, slots=True)
class LmtpTimeouts:
    """Seconds allowed per phase of a connection's life.

    ``LmtpTimeouts()`` gives the defaults; ``LmtpTimeouts(data=60.0)`` changes one.
    """

    #: Connect, greeting and LHLO together. Backends sit on the local network, so a
    #: healthy one answers in milliseconds; ten seconds is slow enough for a loaded
    #: Dovecot that is forking a process for us.
    connect: float = 10.0
    #: Each wait for the replies to the pipelined RSET/MAIL/RCPT/DATA, and for QUIT.
    command: float = 30.0
    #: Writing the payload and collecting every per-recipient reply. The backend stores
    #: the message once per recipient (Sieve, quota checks, fsync) before answering;
    #: Postfix allows 600 s for this (lmtp_data_done_timeout), we allow half.
    data: float = 300.0


DEFAULT_TIMEOUTS: Final = LmtpTimeouts()


class _SocketAdapter(asyncio.Protocol):
    """Feeds received bytes into the state machine and wakes the task waiting for them."""

    def __init__(self, proto: ClientProtocol, loop: asyncio.AbstractEventLoop) -> None:
        self._proto = proto
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.busy = False  # a call on the connection is waiting for replies
        self.lost = False
        self.closed: asyncio.Future[None] = loop.create_future()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # The deadline of the current phase (inf: none) and the one timer that
        # enforces it. A timer armed for an earlier deadline looks again when it fires
        # rather than being replaced, so a transaction usually arms none.
        self._deadline = _NO_DEADLINE
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _NO_DEADLINE

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._proto.receive_data(data)
        if self.busy:
            self._wake()
        elif self.transport is not None:
            # Nobody asked: the server is saying goodbye or is confused. The bytes stay
            # in the state machine (is_reusable is now False) for the next caller to see.
            self.transport.close()

    def eof_received(self) -> bool | None:
        if not self._proto.eof_received:
            self._proto.receive_data(b"")
        self._wake()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._proto.eof_received:
            self._proto.receive_data(b"")
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # used by LmtpConnection

    def set_deadline(self, seconds: float) -> None:
        """From now on, waits end with TimeoutError once `seconds` have passed."""
        deadline = self._loop.time() + seconds
        self._deadline = deadline
        self._expired = False
        if self._timer is not None:
            if self._timer_at <= deadline:
                return  # fires first, then re-arms for the rest
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def clear_deadline(self) -> None:
        self._deadline = _NO_DEADLINE
        self._expired = False

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, _NO_DEADLINE
        deadline = self._deadline
        if deadline == _NO_DEADLINE or self.lost:
            return
        if self._loop.time() < deadline:
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._expired = True
        for waiter in (self._waiter, self._drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(TimeoutError())

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_readable(self) -> None:
        """Wait until more bytes (or the end of the stream) have been fed in."""
        if self._expired:
            raise TimeoutError
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    async def write(self, data: bytes) -> None:
        """Write, then wait while the transport's buffer is over its high-water mark."""
        transport = self.transport
        if self.lost or transport is None or transport.is_closing():
            raise ConnectionLost("connection closed before the write")
        transport.write(data)
        while self._paused and not self.lost:
            if self._expired:
                raise TimeoutError
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            try:
                await waiter
            finally:
                self._drain_waiter = None
        if self.lost:
            raise ConnectionLost("connection lost while writing")

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()


#: Starts the connect for an adapter: a bound loop.create_connection or similar.
_Connector = Callable[[_SocketAdapter], Awaitable[object]]


class LmtpConnection:
    """One LMTP session with a backend. Create it with `open_tcp()` or `open_unix()`.

    Use ``async with`` or call `aclose()`; `send()` runs one transaction.
    """

    def __init__(
        self,
        remote: str,
        *,
        lhlo_name: str = DEFAULT_LHLO_NAME,
        timeouts: LmtpTimeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        """Prefer `open_tcp`/`open_unix`; this only builds the unconnected object."""
        self.remote = remote  # "lmtp 127.0.0.1:24" style, for logs
        self.lhlo_name = lhlo_name
        self.timeouts = timeouts
        self._proto = ClientProtocol()
        self._adapter: _SocketAdapter | None = None
        self.transactions = 0  # completed transactions, for pool policy and logs

    # -- opening -------------------------------------------------------------------

    @classmethod
    async def open_tcp(
        cls,
        host: str,
        port: int,
        *,
        lhlo_name: str = DEFAULT_LHLO_NAME,
        timeouts: LmtpTimeouts = DEFAULT_TIMEOUTS,
    ) -> LmtpConnection:
        """Connect over TCP, read the greeting and send LHLO."""
        remote = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        conn = cls(remote, lhlo_name=lhlo_name, timeouts=timeouts)
        loop = asyncio.get_running_loop()
        await conn._open(lambda adapter: loop.create_connection(lambda: adapter, host, port))
        return conn

    @classmethod
    async def open_unix(
        cls,
        path: str,
        *,
        lhlo_name: str = DEFAULT_LHLO_NAME,
        timeouts: LmtpTimeouts = DEFAULT_TIMEOUTS,
    ) -> LmtpConnection:
        """Connect to a UNIX-domain socket, read the greeting and send LHLO."""
        conn = cls(f"unix:{path}", lhlo_name=lhlo_name, timeouts=timeouts)
        loop = asyncio.get_running_loop()
        await conn._open(lambda adapter: loop.create_unix_connection(lambda: adapter, path))
        return conn

    async def _open(self, connect: _Connector) -> None:
        if self._adapter is not None:
            raise LocalProtocolError("connection already opened")
        adapter = _SocketAdapter(self._proto, asyncio.get_running_loop())
        self._adapter = adapter
        adapter.busy = True
        try:
            async with asyncio.timeout(self.timeouts.connect):
                try:
                    await connect(adapter)
                except OSError as exc:
                    raise ConnectError(f"cannot connect to {self.remote}: {exc}") from exc
                event = await self._next_event()
                if not isinstance(event, Greeting):  # pragma: no cover - protocol guarantee
                    raise RemoteProtocolError(f"expected the greeting, got {event}")
                await adapter.write(self._proto.lhlo(self.lhlo_name))
                event = await self._next_event()
                if not isinstance(event, SessionReady):  # pragma: no cover
                    raise RemoteProtocolError(f"expected the LHLO reply, got {event}")
        except TimeoutError:
            adapter.abort()
            raise LmtpTimeout(
                f"{self.remote}: no greeting and LHLO reply within {self.timeouts.connect} s",
                phase="connect",
            ) from None
        except BaseException:
            adapter.abort()
            raise
        finally:
            adapter.busy = False
        log.debug("lmtp connected to %s", self.remote)

    # -- state ---------------------------------------------------------------------

    @property
    def extensions(self) -> dict[str, str]:
        """Extensions from the LHLO reply: upper-case keyword -> parameters."""
        return self._proto.extensions

    @property
    def greeting(self) -> Reply | None:
        return self._proto.greeting

    @property
    def is_reusable(self) -> bool:
        """True if a transaction can start now: open, idle, and nothing unexplained read."""
        adapter = self._adapter
        return adapter is not None and not adapter.lost and not adapter.busy and self._proto.is_idle

    @property
    def is_closed(self) -> bool:
        """True once the socket is closed (by us or by the server)."""
        return self._adapter is not None and self._adapter.lost

    # -- transactions --------------------------------------------------------------

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        smtputf8: bool = False,
        eight_bit: bool = False,
    ) -> list[Reply]:
        """Deliver `message` to `recipients`; one final `Reply` per recipient, same order.

        A recipient's reply is its RCPT reply if that was refused, the reply to MAIL if
        MAIL was refused, the reply to DATA if DATA was refused, else its own reply after
        the payload. Those replies are results, not errors: they come back as 4yz/5yz
        `Reply` objects and the connection stays usable.

        Raises (see `lmtp.errors`): `LocalProtocolError` or `ExtensionNotSupported`
        before anything is written (the connection stays usable); `LmtpTimeout`,
        `ConnectionLost`, `ServerUnavailable` or `RemoteProtocolError` after, with
        `partial_results` and `data_sent` set -- the connection is closed then.
        """
        adapter = self._adapter
        if adapter is None:
            raise LocalProtocolError("connection was never opened")
        if adapter.busy:
            raise LocalProtocolError("another call is using this connection")
        proto = self._proto
        try:
            wire = proto.begin(sender, recipients, message, smtputf8=smtputf8, eight_bit=eight_bit)
        except (LocalProtocolError, ExtensionNotSupported):
            raise
        except BaseException:
            adapter.abort()  # the server sent something while idle; begin() said what
            raise
        adapter.busy = True
        phase = "command"
        try:
            adapter.set_deadline(self.timeouts.command)
            await adapter.write(wire)
            event = await self._next_event()
            if isinstance(event, SendPayload):
                phase = "data"
                adapter.set_deadline(self.timeouts.data)
                await adapter.write(event.data)
                event = await self._next_event()
            if not isinstance(event, TransactionDone):  # pragma: no cover - guarantee
                raise RemoteProtocolError(f"expected the end of the transaction, got {event}")
        except TimeoutError:
            adapter.abort()
            limit = self.timeouts.command if phase == "command" else self.timeouts.data
            raise LmtpTimeout(
                f"{self.remote}: no reply within {limit} s ({phase} phase)",
                phase=phase,
                partial_results=proto.partial_results(),
                data_sent=proto.data_sent,
            ) from None
        except LmtpError as exc:
            adapter.abort()
            exc.partial_results = proto.partial_results()
            exc.data_sent = proto.data_sent
            raise
        except BaseException:
            adapter.abort()  # cancelled mid-transaction: the dialogue is out of step
            raise
        finally:
            adapter.clear_deadline()
            adapter.busy = False
        self.transactions += 1
        return list(event.results)

    async def _next_event(self) -> Event:
        proto = self._proto
        adapter = self._adapter
        assert adapter is not None
        while True:
            event = proto.next_event()
            if event is not NEED_DATA:
                return event
            await adapter.wait_readable()

    # -- closing -------------------------------------------------------------------

    def abort(self) -> None:
        """Close the socket at once, without QUIT."""
        if self._adapter is not None:
            self._adapter.abort()

    async def aclose(self) -> None:
        """Send QUIT if the session is idle and healthy, then close the socket.

        Never raises for a backend problem; a dead connection is simply closed.
        """
        adapter = self._adapter
        if adapter is None or adapter.lost:
            return
        try:
            if self.is_reusable:
                adapter.busy = True
                try:
                    async with asyncio.timeout(self.timeouts.command):
                        await adapter.write(self._proto.quit())
                        await self._next_event()
                except (LmtpError, TimeoutError) as exc:
                    log.debug("lmtp %s: QUIT failed: %s", self.remote, exc)
                finally:
                    adapter.busy = False
            if adapter.transport is not None and not adapter.lost:
                adapter.transport.close()
            try:
                async with asyncio.timeout(_CLOSE_WAIT):
                    await asyncio.shield(adapter.closed)
            except TimeoutError:
                adapter.abort()
        except BaseException:
            adapter.abort()
            raise
        log.debug("lmtp connection to %s closed", self.remote)

    async def __aenter__(self) -> LmtpConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else self._proto.state.value
        return f"<LmtpConnection {self.remote} {state}>"
