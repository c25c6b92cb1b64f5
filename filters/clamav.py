"""An asyncio client for clamd's INSTREAM command (ClamAV's scanning daemon).

Theory of operation
-------------------
One scan is one connection (clamd closes the connection after INSTREAM anyway):

1. connect to the endpoint: ``unix:/path/clamd.ctl`` (or a bare absolute path) or
   ``host:port`` (``[v6]:port`` for an IPv6 literal);
2. send ``zINSTREAM\\0``, then the message in frames ``<u32 big-endian length><chunk>`` of
   at most ``chunk`` bytes (64 KiB), then ``<u32 0>``. Each frame is one write with its
   length header coalesced (separate writes made small scans 2-3x slower); the command
   rides with the first frame and the end marker with the last, so a message up to one
   chunk is a single write. TCP connections set TCP_NODELAY so no write waits for an ACK;
3. read the reply up to its ``\\0`` and parse it (:func:`parse_reply`):

   ===========================================  ==============================
   ``stream: OK``                                :attr:`ScanVerdict.CLEAN`
   ``stream: <Signature> FOUND``                 :attr:`ScanVerdict.INFECTED`
   ``INSTREAM size limit exceeded. ERROR``       :attr:`ScanVerdict.TOO_LARGE`
   any other ``... ERROR``, no reply, refused,   :attr:`ScanVerdict.ERROR`
   reset, timeout
   ===========================================  ==============================

``too_large`` is a property of the message against the scanner's limits: it comes back
on every retry, so callers must not treat it as a temporary failure. ``error`` is
temporary (clamd down, restarting, overloaded, hung). A message larger than
``max_stream`` is not sent at all: the answer is ``too_large`` at once. Set
``max_stream`` at or below clamd's ``StreamMaxLength`` (25 MiB by default); if it is
larger, clamd cuts the stream off with the size-limit reply, which is still recognised.

Why raw non-blocking sockets (``loop.sock_*``) and not asyncio streams: when clamd stops
reading at its ``StreamMaxLength`` it replies and closes, so our next write fails with
EPIPE or ECONNRESET. A stream transport then closes itself at once and drops the reply
still waiting in the kernel's receive buffer (observed: 3-7 of 15 scans of 20 MiB against
a 1 MiB limit came back as an error instead of the size-limit reply). With the socket
in our hands, a failed write is followed by reading that reply, so ``too_large`` is
reported reliably and a misconfigured limit cannot turn into 4xx for ever.

The whole exchange (connect, send, reply) runs under one ``timeout``; a scan never raises
for scanner trouble, it returns an ``error`` result with the detail for the logs.
:meth:`ClamdClient.ping` sends ``zPING\\0`` and tells whether ``PONG`` came back, for
readiness checks. The client keeps no state between calls and is safe to share.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import struct
from dataclasses import dataclass

__all__ = [
    "DEFAULT_CHUNK",
    "ClamdClient",
    "Endpoint",
    "ScanResult",
    "ScanVerdict",
    "parse_endpoint",
    "parse_reply",
]

DEFAULT_CHUNK = 65536
#: clamd's own limit for a chunk it will accept (StreamMaxLength aside) is far larger;
#: this caps what we are willing to build per write.
_MAX_CHUNK = 8 * 1024 * 1024
_MAX_REPLY = 4096  # a reply longer than this is not clamd talking
_SIZE_LIMIT_REPLY = "INSTREAM size limit exceeded. ERROR"
_LENGTH = struct.Struct(">I")
_END = _LENGTH.pack(0)


class ScanVerdict(enum.Enum):
    CLEAN = "clean"
    INFECTED = "infected"
    TOO_LARGE = "too_large"  # the scanner's size limit: recurs on every retry
    ERROR = "error"  # temporary: scanner down, overloaded, hung, garbled answer


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What one scan found. ``signature`` is set for INFECTED only; ``detail`` is for logs."""

    verdict: ScanVerdict
    signature: str | None = None
    detail: str = ""

    @property
    def clean(self) -> bool:
        return self.verdict is ScanVerdict.CLEAN

    @property
    def infected(self) -> bool:
        return self.verdict is ScanVerdict.INFECTED


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where clamd listens: a UNIX socket path, or a TCP host and port."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """``unix:/run/clamav/clamd.ctl``, ``/run/clamav/clamd.ctl``, ``127.0.0.1:3310``,
    ``clamav.internal:3310`` or ``[::1]:3310``; ValueError for anything else."""
    text = text.strip()
    if text.startswith("unix:") or text.startswith("/"):
        path = text.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"clamd endpoint {text!r}: a UNIX socket needs an absolute path")
        return Endpoint(path=path)
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"clamd endpoint {text!r}: write an IPv6 address as [addr]:port")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"clamd endpoint {text!r}: expected unix:/path or host:port")
    return Endpoint(host=host, port=int(port_text))


def parse_reply(reply: str) -> ScanResult:
    """Classify one INSTREAM reply (without its terminating NUL)."""
    text = reply.strip()
    if text == _SIZE_LIMIT_REPLY:
        return ScanResult(ScanVerdict.TOO_LARGE, detail="clamd: " + text)
    body = text.removeprefix("stream:").strip() if text.startswith("stream:") else None
    if body == "OK":
        return ScanResult(ScanVerdict.CLEAN, detail="clamd: " + text)
    if body is not None and body.endswith(" FOUND"):
        signature = body.removesuffix(" FOUND").strip()
        if signature:
            return ScanResult(ScanVerdict.INFECTED, signature=signature,
                              detail="clamd: " + text)
    if text.endswith("ERROR"):
        return ScanResult(ScanVerdict.ERROR, detail="clamd: " + text)
    return ScanResult(ScanVerdict.ERROR, detail=f"clamd: unexpected reply {text[:200]!r}")


class _NoReply(Exception):
    """The connection ended before a complete reply."""


class ClamdClient:
    """Scans messages with a clamd at ``endpoint``; one connection per call.

    ``timeout`` bounds a whole call (connect, send, reply); ``max_stream`` is the largest
    message sent (larger ones are ``too_large`` without a connection); ``chunk`` is the
    INSTREAM frame size.
    """

    def __init__(self, endpoint: str, *, timeout: float, max_stream: int,
                 chunk: int = DEFAULT_CHUNK) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_stream <= 0:
            raise ValueError("max_stream must be positive")
        if not 0 < chunk <= _MAX_CHUNK:
            raise ValueError(f"chunk must be between 1 and {_MAX_CHUNK} bytes")
        self.endpoint = parse_endpoint(endpoint)
        self.timeout = timeout
        self.max_stream = max_stream
        self.chunk = chunk

    def __repr__(self) -> str:
        return (f"ClamdClient({str(self.endpoint)!r}, timeout={self.timeout}, "
                f"max_stream={self.max_stream})")

    async def scan(self, data: bytes) -> ScanResult:
        """Scan ``data``; never raises for scanner trouble (that is an ``error`` result)."""
        if len(data) > self.max_stream:
            return ScanResult(ScanVerdict.TOO_LARGE,
                              detail=f"{len(data)} bytes over the scan limit of "
                                     f"{self.max_stream}: not sent")
        try:
            async with asyncio.timeout(self.timeout):
                return parse_reply(await self._instream(data))
        except TimeoutError:
            return ScanResult(ScanVerdict.ERROR,
                              detail=f"clamd at {self.endpoint}: no answer in {self.timeout}s")
        except _NoReply as exc:
            return ScanResult(ScanVerdict.ERROR, detail=f"clamd at {self.endpoint}: {exc}")
        except OSError as exc:
            return ScanResult(ScanVerdict.ERROR, detail=f"clamd at {self.endpoint}: "
                              f"{type(exc).__name__}: {exc.strerror or exc}")

    async def ping(self) -> bool:
        """Whether clamd answers ``PING`` with ``PONG`` within the timeout."""
        try:
            async with asyncio.timeout(self.timeout):
                sock = await self._connect()
                with sock:
                    loop = asyncio.get_running_loop()
                    await loop.sock_sendall(sock, b"zPING\0")
                    return await self._read_reply(sock) == "PONG"
        except (TimeoutError, OSError, _NoReply):
            return False

    async def _instream(self, data: bytes) -> str:
        loop = asyncio.get_running_loop()
        sock = await self._connect()
        with sock:
            view = memoryview(data)
            try:
                # One write per frame; the command rides with the first frame and the
                # end marker with the last, so a small message is a single write.
                pending: list[bytes | memoryview] = [b"zINSTREAM\0"]
                for start in range(0, len(view), self.chunk):
                    part = view[start:start + self.chunk]
                    pending += (_LENGTH.pack(len(part)), part)
                    if start + self.chunk < len(view):
                        await loop.sock_sendall(sock, b"".join(pending))
                        pending = []
                pending.append(_END)
                await loop.sock_sendall(sock, b"".join(pending))
            except (BrokenPipeError, ConnectionResetError) as exc:
                # clamd stops reading when the stream passes its StreamMaxLength: it has
                # replied and closed. The reply is still in our receive buffer.
                try:
                    return await self._read_reply(sock)
                except (_NoReply, OSError):
                    raise exc from None
            return await self._read_reply(sock)

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        if endpoint.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, endpoint.path)
            except BaseException:
                sock.close()
                raise
            return sock
        assert endpoint.host is not None and endpoint.port is not None
        infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"no address for {endpoint.host}")
        for family, kind, proto, _name, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        raise error

    @staticmethod
    async def _read_reply(sock: socket.socket) -> str:
        loop = asyncio.get_running_loop()
        reply = bytearray()
        while True:
            received = await loop.sock_recv(sock, 1024)
            if not received:
                raise _NoReply(f"connection closed after {bytes(reply[:200])!r}"
                               if reply else "connection closed without a reply")
            reply += received
            end = reply.find(b"\0")
            if end >= 0:
                return reply[:end].decode("utf-8", "replace")
            if len(reply) > _MAX_REPLY:
                raise _NoReply(f"reply longer than {_MAX_REPLY} bytes without NUL")
