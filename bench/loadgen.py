"""SMTP load clients of the benchmark (issue 6), run by bench/bench.py as subprocesses.

Standard library only (uvloop when importable), so its CPU time is its own process's and
never the bench process's. Two commands:

``send``: C concurrent sessions send M copies of one message file (already DKIM-signed
by bench.py) to 127.0.0.1:PORT, like ``smtp-source`` but with a given file, which
smtp-source cannot send. Commands are sent one at a time and each reply read before the
next (no pipelining: smtp-source does the same). Each message goes to R recipients
``{n}<suffix>`` with n counting 1, 2, 3, ... over the whole run (smtp-source ``-N``
numbering), so every recipient is a distinct mailbox. With ``--unique`` every message
starts with its own ``X-Bench-Id: <random run token>.<n>`` field (not DKIM-signed, so the
signature still verifies): like real mail, no two messages are byte-identical, and no
scanner can answer from a cache of earlier identical content (clamd caches clean results
by hash). With ``--keepalive`` a session
sends many messages over one connection, otherwise one per connection. A session stops
at its first non-2xx/3xx reply or error; the others go on. Prints one JSON object:
``sent`` (messages that got 250 after the dot), ``errors`` (count), ``first_errors``,
``seconds``.

``idle``: opens N connections (at most ``--concurrency`` connecting at once, so the
server's listen backlog never overflows), reads each greeting, sends EHLO, reads the
reply and keeps the connection open doing nothing. Connections are spread over
``--sources`` source addresses 127.0.0.1, 127.0.0.2, ... (Linux routes all of 127/8 to
lo). Each connect and greeting is bounded by ``--greet-timeout``; a connection that
gets no greeting in time is closed and counted as failed, or with ``--keep-waiting``
held as ``waiting`` (it is queued at the server: Postfix with all its smtpd processes
busy). After the last one it prints one JSON line (``opened`` = greeted, EHLO answered
and held; ``waiting``, ``greeted``, ``greeted_within_1s``, ``ehlo_ok``, ``failed``,
greeting latency percentiles, ``open_seconds``) and holds the sessions until a line
arrives on stdin, stdin closes, or ``--hold`` seconds pass; then it closes everything
and exits. RLIMIT_NOFILE is raised to what N needs (the bench runs as root).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import sys
import time
from pathlib import Path

CRLF = b"\r\n"


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One (possibly multi-line) SMTP reply; returns its last line."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        if line[3:4] != b"-":
            return line


def stuffed(message: bytes) -> bytes:
    """CRLF line endings, dot-stuffed, with the final CRLF.CRLF: ready for DATA."""
    text = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if not text.endswith(CRLF):
        text += CRLF
    lines = text.split(CRLF)
    text = CRLF.join(b"." + line if line.startswith(b".") else line for line in lines)
    return text + b".\r\n"


class Sender:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.body = stuffed(Path(args.file).read_bytes())
        self.token = os.urandom(8).hex()
        self.sequence = 0
        self.remaining = args.messages
        self.next_rcpt = 1
        self.sent = 0
        self.errors = 0
        self.first_errors: list[str] = []

    def _take(self) -> bool:
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True

    def _error(self, text: str) -> None:
        self.errors += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(text)

    async def session(self) -> None:
        args = self.args
        while self._take():
            try:
                reader, writer = await asyncio.open_connection(args.host, args.port)
            except OSError as exc:
                self._error(f"connect: {exc}")
                return
            try:
                line = await _reply(reader)
                if not line.startswith(b"220"):
                    raise ValueError(line)
                writer.write(f"EHLO {args.helo}\r\n".encode())
                line = await _reply(reader)
                if not line.startswith(b"250"):
                    raise ValueError(line)
                first = True
                while first or (args.keepalive and self._take()):
                    first = False
                    if not await self._message(reader, writer):
                        return
                writer.write(b"QUIT\r\n")
                await writer.drain()
                with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                    await _reply(reader)
            except (OSError, ConnectionError, ValueError) as exc:
                self._error(f"{type(exc).__name__}: {exc!s}"[:300])
                return
            finally:
                writer.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()
            if args.keepalive:
                return

    async def _message(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> bool:
        args = self.args
        commands = [f"MAIL FROM:<{args.sender}>".encode()]
        for _ in range(args.recipients):
            commands.append(f"RCPT TO:<{self.next_rcpt}{args.rcpt_suffix}>".encode())
            self.next_rcpt += 1
        commands.append(b"DATA")
        for command in commands:
            writer.write(command + CRLF)
            line = await _reply(reader)
            if line[:1] not in (b"2", b"3"):
                self._error(f"{command.decode()}: {line.decode(errors='replace').strip()}")
                return False
        if args.unique:
            self.sequence += 1
            writer.write(b"X-Bench-Id: %s.%d\r\n" % (self.token.encode(), self.sequence))
        writer.write(self.body)
        line = await _reply(reader)
        if not line.startswith(b"250"):
            self._error(f"end of data: {line.decode(errors='replace').strip()}")
            return False
        self.sent += 1
        return True


async def send_main(args: argparse.Namespace) -> dict[str, object]:
    sender = Sender(args)
    start = time.monotonic()
    tasks = [asyncio.create_task(sender.session()) for _ in range(args.sessions)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.timeout)
    except TimeoutError:
        sender._error(f"timeout after {args.timeout} s")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"sent": sender.sent, "errors": sender.errors, "first_errors": sender.first_errors,
            "seconds": time.monotonic() - start}


# ---------------------------------------------------------------------------- idle


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def _connect_from(source: str, host: str, port: int) -> tuple[asyncio.StreamReader,
                                                                    asyncio.StreamWriter]:
    """Connect from `source`. IP_BIND_ADDRESS_NO_PORT leaves the choice of the local
    port to connect(), which picks it per destination: a plain bind(source, 0) searches
    for a port unused by every socket and gets slower with each of thousands."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


class Idle:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.writers: list[asyncio.StreamWriter] = []
        self.waiting: list[asyncio.StreamWriter] = []
        self.latencies: list[float] = []
        self.greeted = self.ehlo_ok = self.failed = 0
        self.first_errors: list[str] = []

    async def open_one(self, index: int, gate: asyncio.Semaphore) -> None:
        args = self.args
        source = f"127.0.0.{1 + index % args.sources}"
        async with gate:
            t0 = time.monotonic()
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(args.greet_timeout):
                    reader, writer = await _connect_from(source, args.host, args.port)
                try:
                    async with asyncio.timeout(max(0.0, t0 + args.greet_timeout
                                                   - time.monotonic())):
                        line = await _reply(reader)
                except TimeoutError:
                    if args.keep_waiting:  # connected, queued for a greeting: hold it
                        self.waiting.append(writer)
                        writer = None
                        return
                    raise
                if not line.startswith(b"220"):
                    raise ValueError(line.decode(errors="replace").strip())
                self.greeted += 1
                self.latencies.append(time.monotonic() - t0)
                writer.write(f"EHLO {args.helo}\r\n".encode())
                async with asyncio.timeout(args.greet_timeout):
                    line = await _reply(reader)
                if not line.startswith(b"250"):
                    raise ValueError(line.decode(errors="replace").strip())
                self.ehlo_ok += 1
                self.writers.append(writer)
                writer = None
            except (OSError, ConnectionError, ValueError, TimeoutError) as exc:
                self.failed += 1
                if len(self.first_errors) < 5:
                    self.first_errors.append(f"{type(exc).__name__}: {exc!s}"[:200])
            finally:
                if writer is not None:
                    writer.close()

    def summary(self, seconds: float) -> dict[str, object]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else 0.0

        return {"opened": len(self.writers), "waiting": len(self.waiting),
                "greeted": self.greeted,
                "greeted_within_1s": sum(x <= 1.0 for x in lat), "ehlo_ok": self.ehlo_ok,
                "failed": self.failed, "first_errors": self.first_errors,
                "greet_p50_ms": pct(0.5), "greet_p99_ms": pct(0.99), "greet_max_ms": pct(1.0),
                "open_seconds": seconds}


async def idle_main(args: argparse.Namespace) -> None:
    idle = Idle(args)
    gate = asyncio.Semaphore(args.concurrency)
    start = time.monotonic()
    tasks = [asyncio.create_task(idle.open_one(i, gate)) for i in range(args.sessions)]
    _, pending = await asyncio.wait(tasks, timeout=args.timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    summary = idle.summary(time.monotonic() - start)
    summary["unfinished"] = len(pending)
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), args.hold)
    for writer in idle.writers + idle.waiting:
        writer.close()
    await asyncio.sleep(0.2)


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    send = sub.add_parser("send")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, required=True)
    send.add_argument("--file", required=True)
    send.add_argument("--sessions", type=int, default=20)
    send.add_argument("--messages", type=int, default=100)
    send.add_argument("--recipients", type=int, default=1)
    send.add_argument("--rcpt-suffix", default="rcpt@bench.example")
    send.add_argument("--sender", default="sender@client.example")
    send.add_argument("--helo", default="client.example")
    send.add_argument("--keepalive", action="store_true")
    send.add_argument("--unique", action="store_true",
                      help="make every message unique (an X-Bench-Id field on top)")
    send.add_argument("--timeout", type=float, default=300.0)
    idle = sub.add_parser("idle")
    idle.add_argument("--host", default="127.0.0.1")
    idle.add_argument("--port", type=int, required=True)
    idle.add_argument("--sessions", type=int, default=10000)
    idle.add_argument("--sources", type=int, default=1)
    idle.add_argument("--concurrency", type=int, default=200)
    idle.add_argument("--greet-timeout", type=float, default=10.0)
    idle.add_argument("--keep-waiting", action="store_true",
                      help="hold connections that got no greeting in time (queued)")
    idle.add_argument("--helo", default="client.example")
    idle.add_argument("--timeout", type=float, default=300.0, help="to open them all")
    idle.add_argument("--hold", type=float, default=600.0)
    args = parser.parse_args()
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    if args.command == "send":
        raise_nofile(args.sessions + 100)
        result = asyncio.run(send_main(args))
        print(json.dumps(result))
        return 0
    raise_nofile(args.sessions + 1000)
    asyncio.run(idle_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
