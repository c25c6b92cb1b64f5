"""Connection pools: reuse LMTP connections per backend and cap their number.

`Endpoint` names a backend ("127.0.0.1:24", "[::1]:24", "mail.internal:24",
"unix:/run/dovecot/lmtp"). `LmtpPool` delivers to one endpoint over at most
`max_connections` connections; `LmtpPools` keeps one pool per endpoint, created on
first use.

Theory of operation
-------------------

Invariants:

1. At most `max_connections` transactions run at once (an `asyncio.Semaphore`), and a
   connection is opened only when no idle one is available, so open connections never
   outnumber the cap either.
2. A connection goes back to the idle stack only if `LmtpConnection.is_reusable` says it
   is open, idle and nothing unasked arrived; anything else is closed. The stack is LIFO,
   so under light load a few connections stay warm and the rest expire.
3. An idle connection is closed (with QUIT) `idle_timeout` seconds after it was last
   used, by a timer cancelled when the connection is taken again. Keep `idle_timeout`
   below the backend's own idle timeout (Dovecot's LMTP server waits 5 minutes) so the
   client, not the server, ends quiet connections.
4. Retry at most once, and only when no delivery can be duplicated: a connection taken
   from the idle stack that turns out to be dead (`ConnectionLost`, or a 421 from a
   server that timed it out) before the server said anything about any recipient and
   before the payload was written. Everything else goes back to the caller, with
   `partial_results` telling what was delivered.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from .client import DEFAULT_LHLO_NAME, DEFAULT_TIMEOUTS, LmtpConnection, LmtpTimeouts
from .errors import ConnectionLost, ServerUnavailable
from .replies import Reply

__all__ = ["DEFAULT_LMTP_PORT", "Endpoint", "LmtpPool", "LmtpPools"]

log = logging.getLogger(__name__)

#: Port used when an endpoint names none. RFC 2033 assigns LMTP no TCP port (and
#: forbids 25); 24 is what Dovecot and Cyrus deployments conventionally use.
DEFAULT_LMTP_PORT: Final = 24


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an LMTP backend listens: `host` and `port`, or a UNIX socket `path`."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if self.path is not None:
            if not self.path or self.host is not None or self.port is not None:
                raise ValueError("a UNIX endpoint has a path and no host or port")
        elif not self.host or self.port is None or not 0 < self.port < 65536:
            raise ValueError("a TCP endpoint needs a host and a port in 1..65535")

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    @classmethod
    def parse(cls, text: str, *, default_port: int = DEFAULT_LMTP_PORT) -> Endpoint:
        """Parse "host:port", "[v6]:port", "host" (default port), "unix:/path" or "/path".

        Raises ValueError with a reason for anything else, including an IPv6 address
        without brackets (is "::1:24" a port or part of the address?).
        """
        text = text.strip()
        if text.startswith("unix:") or text.startswith("/"):
            path = text[5:] if text.startswith("unix:") else text
            if not path:
                raise ValueError(f"endpoint {text!r}: empty socket path")
            return cls(path=path)
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise ValueError(f"endpoint {text!r}: missing ']'")
            host, rest = text[1:end], text[end + 1 :]
            try:
                ipaddress.IPv6Address(host.partition("%")[0])
            except ValueError:
                raise ValueError(f"endpoint {text!r}: not an IPv6 address in []") from None
            if rest and not rest.startswith(":"):
                raise ValueError(f"endpoint {text!r}: expected ':port' after ']'")
            port_text = rest[1:] if rest else ""
        else:
            if text.count(":") > 1:
                raise ValueError(f"endpoint {text!r}: write IPv6 addresses as [addr]:port")
            host, sep, port_text = text.partition(":")
            if sep and not port_text:
                raise ValueError(f"endpoint {text!r}: empty port")
            if not host or any(c.isspace() or c in "/[]@" for c in host):
                raise ValueError(f"endpoint {text!r}: invalid host")
        if not port_text:
            port = default_port
        elif port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536:
            port = int(port_text)
        else:
            raise ValueError(f"endpoint {text!r}: port must be 1..65535")
        return cls(host=host, port=port)

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


class LmtpPool:
    """Reusable connections to one LMTP backend, at most `max_connections` at a time."""

    def __init__(
        self,
        endpoint: Endpoint | str,
        *,
        max_connections: int = 10,
        idle_timeout: float = 30.0,
        lhlo_name: str = DEFAULT_LHLO_NAME,
        timeouts: LmtpTimeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.endpoint = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.lhlo_name = lhlo_name
        self.timeouts = timeouts
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[tuple[LmtpConnection, asyncio.TimerHandle]] = []
        self._open: set[LmtpConnection] = set()
        self._closers: set[asyncio.Task[None]] = set()
        self._in_use = 0
        self._closed = False

    # -- numbers for metrics and tests ---------------------------------------------

    @property
    def open_connections(self) -> int:
        """Connections opened and not yet closed (in use, idle, or closing)."""
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def in_use(self) -> int:
        """Transactions running now."""
        return self._in_use

    # -- delivering ----------------------------------------------------------------

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        smtputf8: bool = False,
        eight_bit: bool = False,
    ) -> list[Reply]:
        """`LmtpConnection.send` on a pooled connection; same results and errors.

        Waits for a free slot first. Raises `ConnectError`/`LmtpTimeout`/
        `ServerUnavailable` when a new connection cannot be opened, and RuntimeError
        once the pool is closed.
        """
        async with self._slots:
            if self._closed:
                raise RuntimeError(f"LMTP pool for {self.endpoint} is closed")
            self._in_use += 1
            try:
                return await self._send(sender, recipients, message, smtputf8, eight_bit)
            finally:
                self._in_use -= 1

    async def _send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        smtputf8: bool,
        eight_bit: bool,
    ) -> list[Reply]:
        conn = self._take_idle()
        if conn is not None:
            try:
                return await conn.send(
                    sender, recipients, message, smtputf8=smtputf8, eight_bit=eight_bit
                )
            except (ConnectionLost, ServerUnavailable) as exc:
                if exc.data_sent or exc.any_reply:
                    raise
                log.debug("lmtp %s: idle connection was dead (%s); retrying", conn.remote, exc)
            finally:
                self._put_back(conn)
        conn = await self._connect()
        try:
            return await conn.send(
                sender, recipients, message, smtputf8=smtputf8, eight_bit=eight_bit
            )
        finally:
            self._put_back(conn)

    async def _connect(self) -> LmtpConnection:
        ep = self.endpoint
        if ep.path is not None:
            conn = await LmtpConnection.open_unix(
                ep.path, lhlo_name=self.lhlo_name, timeouts=self.timeouts
            )
        else:
            assert ep.host is not None and ep.port is not None
            conn = await LmtpConnection.open_tcp(
                ep.host, ep.port, lhlo_name=self.lhlo_name, timeouts=self.timeouts
            )
        self._open.add(conn)
        return conn

    def _take_idle(self) -> LmtpConnection | None:
        while self._idle:
            conn, timer = self._idle.pop()
            timer.cancel()
            if conn.is_reusable:
                return conn
            self._close_later(conn)
        return None

    def _put_back(self, conn: LmtpConnection) -> None:
        if conn.is_reusable and not self._closed:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self.idle_timeout, self._expire, conn)
            self._idle.append((conn, timer))
        else:
            self._close_later(conn)

    def _expire(self, conn: LmtpConnection) -> None:
        for i, (idle, _timer) in enumerate(self._idle):
            if idle is conn:
                del self._idle[i]
                self._close_later(conn)
                return

    def _close_later(self, conn: LmtpConnection) -> None:
        task = asyncio.get_running_loop().create_task(self._close(conn))
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def _close(self, conn: LmtpConnection) -> None:
        try:
            await conn.aclose()
        finally:
            self._open.discard(conn)

    # -- closing -------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close idle connections (with QUIT) and refuse new sends.

        Transactions already running finish; their connections close when they do.
        """
        self._closed = True
        while self._idle:
            conn, timer = self._idle.pop()
            timer.cancel()
            self._close_later(conn)
        while self._closers:
            await asyncio.gather(*self._closers, return_exceptions=True)

    async def __aenter__(self) -> LmtpPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"<LmtpPool {self.endpoint} open={self.open_connections} "
            f"idle={self.idle_connections} in_use={self.in_use}>"
        )


class LmtpPools:
    """One `LmtpPool` per endpoint, created on first use with shared settings."""

    def __init__(
        self,
        *,
        max_connections: int = 10,
        idle_timeout: float = 30.0,
        lhlo_name: str = DEFAULT_LHLO_NAME,
        timeouts: LmtpTimeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.lhlo_name = lhlo_name
        self.timeouts = timeouts
        self._pools: dict[Endpoint, LmtpPool] = {}
        self._closed = False

    def get(self, endpoint: Endpoint | str) -> LmtpPool:
        """The pool for `endpoint`; equal endpoints ("h:24", " h:24") share one pool."""
        if self._closed:
            raise RuntimeError("LMTP pools are closed")
        ep = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
        pool = self._pools.get(ep)
        if pool is None:
            pool = LmtpPool(
                ep,
                max_connections=self.max_connections,
                idle_timeout=self.idle_timeout,
                lhlo_name=self.lhlo_name,
                timeouts=self.timeouts,
            )
            self._pools[ep] = pool
        return pool

    async def send(
        self,
        endpoint: Endpoint | str,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        smtputf8: bool = False,
        eight_bit: bool = False,
    ) -> list[Reply]:
        """`LmtpPool.send` on the pool for `endpoint`."""
        return await self.get(endpoint).send(
            sender, recipients, message, smtputf8=smtputf8, eight_bit=eight_bit
        )

    def __len__(self) -> int:
        return len(self._pools)

    async def aclose(self) -> None:
        """Close every pool."""
        self._closed = True
        pools = list(self._pools.values())
        self._pools.clear()
        await asyncio.gather(*(p.aclose() for p in pools))

    async def __aenter__(self) -> LmtpPools:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
