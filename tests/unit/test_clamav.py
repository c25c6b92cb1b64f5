"""The clamd INSTREAM client (filters/clamav.py) against a scripted clamd, and the
antivirus filter's per-tenant decisions (filters/antivirus.py) with a scripted scanner.

The scripted clamd speaks the protocol on 127.0.0.1 (or a UNIX socket) and parses what
it gets exactly: the command up to NUL, then ``<u32 length><chunk>`` frames up to the
zero-length one; it answers as told (OK, FOUND, ERROR, the size-limit reply), late, or
not at all. The real clamd is in tests/integration/test_antivirus.py.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from filters.antivirus import (
    FACT,
    SCAN_HEADER,
    SCANNER_UNAVAILABLE,
    VIRUS_REJECT,
    AntivirusCheck,
)
from filters.base import Action, Outcome, Results, Stage
from filters.clamav import (
    ClamdClient,
    Endpoint,
    ScanResult,
    ScanVerdict,
    parse_endpoint,
    parse_reply,
)
from gateway.pipeline import FilterContext
from tests.peers.ports import free_port

SIZE_LIMIT = b"INSTREAM size limit exceeded. ERROR\0"

# -- the scripted clamd ---------------------------------------------------------------------


@dataclass
class Connection:
    """What one client connection sent, as the scripted clamd parsed it."""

    command: bytes = b""
    frames: list[int] = field(default_factory=list)  # chunk lengths, in order
    data: bytearray = field(default_factory=bytearray)
    terminated: bool = False  # the zero-length frame arrived


class ScriptedClamd:
    """Answers every INSTREAM with ``reply`` after ``delay`` s (None: never answers).

    ``limit``: like clamd's StreamMaxLength - once more stream bytes than that arrived,
    answer the size-limit reply and close without reading the rest. ``close_early``:
    close without a reply once the command arrived.
    """

    def __init__(self, reply: bytes | None = b"stream: OK\0", *, delay: float = 0.0,
                 limit: int | None = None, close_early: bool = False) -> None:
        self.reply = reply
        self.delay = delay
        self.limit = limit
        self.close_early = close_early
        self.connections: list[Connection] = []
        self.errors: list[str] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start_tcp(self) -> ScriptedClamd:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def start_unix(self, path: Path) -> ScriptedClamd:
        self._server = await asyncio.start_unix_server(self._handle, str(path))
        return self

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = Connection()
        self.connections.append(conn)
        try:
            conn.command = await reader.readuntil(b"\0")
            if conn.command == b"zPING\0":
                writer.write(b"PONG\0")
                return
            if conn.command != b"zINSTREAM\0":
                self.errors.append(f"unexpected command {conn.command!r}")
                writer.write(b"UNKNOWN COMMAND\0")
                return
            if self.close_early:
                return
            while True:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                if length == 0:
                    conn.terminated = True
                    break
                conn.frames.append(length)
                conn.data += await reader.readexactly(length)
                if self.limit is not None and len(conn.data) > self.limit:
                    writer.write(SIZE_LIMIT)  # and close with the rest unread, as clamd does
                    return
            reply = self.reply
            if reply is None:
                await asyncio.Event().wait()  # hung: until the test ends
                return
            if self.delay:
                await asyncio.sleep(self.delay)
            writer.write(reply)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()
            self._tasks.discard(task)


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[ScriptedClamd]]]:
    servers: list[ScriptedClamd] = []

    async def make(*args: Any, **kwargs: Any) -> ScriptedClamd:
        server = await ScriptedClamd(*args, **kwargs).start_tcp()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


def client(server: ScriptedClamd, **kwargs: Any) -> ClamdClient:
    options: dict[str, Any] = {"timeout": 2.0, "max_stream": 10 * 1024 * 1024, **kwargs}
    return ClamdClient(server.endpoint, **options)


# -- replies and endpoints ------------------------------------------------------------------


@pytest.mark.parametrize(("reply", "expected"), [
    ("stream: OK", ScanResult(ScanVerdict.CLEAN, None, "clamd: stream: OK")),
    ("stream: Eicar-Signature FOUND",
     ScanResult(ScanVerdict.INFECTED, "Eicar-Signature", "clamd: stream: Eicar-Signature FOUND")),
    ("stream: Win.Test.EICAR_HDB-1 FOUND\n",
     ScanResult(ScanVerdict.INFECTED, "Win.Test.EICAR_HDB-1",
                "clamd: stream: Win.Test.EICAR_HDB-1 FOUND")),
    ("INSTREAM size limit exceeded. ERROR",
     ScanResult(ScanVerdict.TOO_LARGE, None, "clamd: INSTREAM size limit exceeded. ERROR")),
    ("stream: Can't allocate memory ERROR",
     ScanResult(ScanVerdict.ERROR, None, "clamd: stream: Can't allocate memory ERROR")),
    ("COMMAND READ TIMED OUT", ScanResult(ScanVerdict.ERROR, None,
                                          "clamd: unexpected reply 'COMMAND READ TIMED OUT'")),
    ("stream:  FOUND", ScanResult(ScanVerdict.ERROR, None,
                                  "clamd: unexpected reply 'stream:  FOUND'")),
    ("", ScanResult(ScanVerdict.ERROR, None, "clamd: unexpected reply ''")),
])
def test_parse_reply(reply: str, expected: ScanResult) -> None:
    assert parse_reply(reply) == expected


@pytest.mark.parametrize(("text", "endpoint"), [
    ("unix:/run/clamav/clamd.ctl", Endpoint(path="/run/clamav/clamd.ctl")),
    ("/run/clamav/clamd.ctl", Endpoint(path="/run/clamav/clamd.ctl")),
    ("127.0.0.1:3310", Endpoint(host="127.0.0.1", port=3310)),
    (" clamav.internal:3310 ", Endpoint(host="clamav.internal", port=3310)),
    ("[::1]:3310", Endpoint(host="::1", port=3310)),
])
def test_parse_endpoint(text: str, endpoint: Endpoint) -> None:
    assert parse_endpoint(text) == endpoint
    assert parse_endpoint(str(endpoint)) == endpoint


@pytest.mark.parametrize("text", ["unix:clamd.ctl", "clamd", "127.0.0.1", "host:", ":3310",
                                  "host:0", "host:70000", "::1:3310", "host:33x"])
def test_parse_endpoint_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="clamd endpoint"):
        parse_endpoint(text)


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"max_stream": 0}, {"chunk": 0},
                                    {"chunk": 64 * 1024 * 1024}])
def test_client_refuses_bad_settings(kwargs: dict[str, Any]) -> None:
    options: dict[str, Any] = {"timeout": 1.0, "max_stream": 100, **kwargs}
    with pytest.raises(ValueError):
        ClamdClient("127.0.0.1:3310", **options)


# -- the wire -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 65537, 200_000])
async def test_frames_are_exact(scripted: Any, size: int) -> None:
    server = await scripted()
    data = bytes(i % 251 for i in range(size))
    result = await client(server).scan(data)
    assert result.verdict is ScanVerdict.CLEAN
    [conn] = server.connections
    assert conn.command == b"zINSTREAM\0"
    full, rest = divmod(size, 65536)
    assert conn.frames == [65536] * full + ([rest] if rest else [])
    assert bytes(conn.data) == data
    assert conn.terminated and server.errors == []


async def test_chunk_size_is_honoured(scripted: Any) -> None:
    server = await scripted()
    await client(server, chunk=1000).scan(b"x" * 2500)
    assert server.connections[0].frames == [1000, 1000, 500]


async def test_each_frame_is_one_write_with_its_header(scripted: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Header and chunk coalesced; the command rides with the first frame, the end
    marker with the last (dependencies.md: separate writes made small scans 2-3x slower)."""
    server = await scripted()
    loop = asyncio.get_running_loop()
    writes: list[bytes] = []
    original = loop.sock_sendall

    async def spy(sock: Any, data: bytes) -> None:
        writes.append(bytes(data))
        await original(sock, data)

    monkeypatch.setattr(loop, "sock_sendall", spy)
    data = b"a" * 65536 + b"b" * 65536 + b"c" * 10
    assert (await client(server).scan(data)).clean
    assert writes == [b"zINSTREAM\0" + struct.pack(">I", 65536) + b"a" * 65536,
                      struct.pack(">I", 65536) + b"b" * 65536,
                      struct.pack(">I", 10) + b"c" * 10 + b"\0\0\0\0"]
    writes.clear()
    assert (await client(server).scan(b"small")).clean
    assert writes == [b"zINSTREAM\0\0\0\0\x05small\0\0\0\0"]


async def test_unix_socket(tmp_path: Path) -> None:
    server = await ScriptedClamd(b"stream: Test.Sig FOUND\0").start_unix(tmp_path / "c.sock")
    try:
        scanner = ClamdClient(f"unix:{tmp_path / 'c.sock'}", timeout=2, max_stream=1000)
        assert await scanner.scan(b"hello") == ScanResult(
            ScanVerdict.INFECTED, "Test.Sig", "clamd: stream: Test.Sig FOUND")
        assert await scanner.ping()
        assert bytes(server.connections[0].data) == b"hello"
    finally:
        await server.stop()


# -- replies --------------------------------------------------------------------------------


async def test_clean(scripted: Any) -> None:
    result = await client(await scripted(b"stream: OK\0")).scan(b"hello")
    assert result.clean and not result.infected and result.signature is None


async def test_found(scripted: Any) -> None:
    result = await client(await scripted(b"stream: Eicar-Test-Signature FOUND\0")).scan(b"x")
    assert result.infected and result.signature == "Eicar-Test-Signature"


async def test_other_error_is_temporary(scripted: Any) -> None:
    result = await client(await scripted(b"stream: Can't allocate memory ERROR\0")).scan(b"x")
    assert result.verdict is ScanVerdict.ERROR
    assert "allocate memory" in result.detail


async def test_size_limit_reply_is_too_large(scripted: Any) -> None:
    server = await scripted(SIZE_LIMIT)
    assert (await client(server).scan(b"x")).verdict is ScanVerdict.TOO_LARGE


async def test_size_limit_mid_stream_is_too_large(scripted: Any) -> None:
    """clamd replies and closes as soon as the stream passes StreamMaxLength; our later
    writes then fail (EPIPE/ECONNRESET) and the reply must still be read."""
    server = await scripted(limit=64 * 1024)
    scanner = client(server, max_stream=64 * 1024 * 1024)
    for _ in range(5):
        result = await scanner.scan(b"z" * (16 * 1024 * 1024))
        assert result.verdict is ScanVerdict.TOO_LARGE, result


async def test_over_max_stream_is_not_sent(scripted: Any) -> None:
    server = await scripted()
    scanner = client(server, max_stream=1000)
    result = await scanner.scan(b"x" * 1001)
    assert result.verdict is ScanVerdict.TOO_LARGE
    assert "1001 bytes" in result.detail
    assert server.connections == []
    assert (await scanner.scan(b"x" * 1000)).clean  # the limit itself is scanned


async def test_closed_without_reply_is_error(scripted: Any) -> None:
    result = await client(await scripted(close_early=True)).scan(b"x" * 100_000)
    assert result.verdict is ScanVerdict.ERROR


async def test_reply_without_nul_is_error(scripted: Any) -> None:
    result = await client(await scripted(b"stream: OK")).scan(b"x")
    assert result.verdict is ScanVerdict.ERROR
    assert "connection closed after" in result.detail


async def test_endless_reply_is_error(scripted: Any) -> None:
    result = await client(await scripted(b"A" * 10_000)).scan(b"x")
    assert result.verdict is ScanVerdict.ERROR


async def test_slow_server_times_out(scripted: Any) -> None:
    server = await scripted(delay=5.0)
    started = asyncio.get_running_loop().time()
    result = await client(server, timeout=0.2).scan(b"x")
    assert result.verdict is ScanVerdict.ERROR
    assert "no answer in 0.2s" in result.detail
    assert asyncio.get_running_loop().time() - started < 1.0


async def test_hung_server_times_out(scripted: Any) -> None:
    result = await client(await scripted(None), timeout=0.2).scan(b"x" * 300_000)
    assert result.verdict is ScanVerdict.ERROR


async def test_refused_is_error() -> None:
    scanner = ClamdClient(f"127.0.0.1:{free_port()}", timeout=1, max_stream=1000)
    result = await scanner.scan(b"x")
    assert result.verdict is ScanVerdict.ERROR
    assert "ConnectionRefusedError" in result.detail
    assert not await scanner.ping()


async def test_missing_socket_is_error(tmp_path: Path) -> None:
    scanner = ClamdClient(f"unix:{tmp_path / 'none.sock'}", timeout=1, max_stream=1000)
    result = await scanner.scan(b"x")
    assert result.verdict is ScanVerdict.ERROR
    assert "FileNotFoundError" in result.detail
    assert not await scanner.ping()


async def test_unresolvable_host_is_error() -> None:
    scanner = ClamdClient("clamd.invalid:3310", timeout=2, max_stream=1000)
    assert (await scanner.scan(b"x")).verdict is ScanVerdict.ERROR


async def test_ping(scripted: Any) -> None:
    server = await scripted()
    assert await client(server).ping()
    assert server.connections[0].command == b"zPING\0"


async def test_concurrent_scans(scripted: Any) -> None:
    server = await scripted()
    scanner = client(server)
    payloads = [bytes([i]) * (i * 1000) for i in range(1, 41)]
    results = await asyncio.gather(*(scanner.scan(p) for p in payloads))
    assert all(r.clean for r in results)
    assert sorted(bytes(c.data) for c in server.connections) == sorted(payloads)


# -- the filter, per tenant -----------------------------------------------------------------


@dataclass(frozen=True)
class FakeSession:
    session_id: str = "S1"
    client_ip: str = "192.0.2.1"
    client_port: int = 40000
    helo: str | None = "client.example.org"
    tls: bool = False


@dataclass(frozen=True)
class FakeEnvelope:
    sender: str = "a@example.org"
    recipients: tuple[Any, ...] = ()
    current_recipient: Any = None
    size: int = 0


@dataclass(frozen=True)
class FakeTenant:
    id: str
    policy: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FakeMessage:
    data: bytes = b"Subject: hi\r\n\r\nHello.\r\n"

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def header_bytes(self) -> bytes:
        return self.data[: self.data.index(b"\r\n\r\n") + 4]

    def content(self) -> bytes:
        return self.data


class FakeScanner:
    """Stands in for a ClamdClient: a scripted result, and a count of scans."""

    def __init__(self, result: ScanResult, delay: float = 0.0) -> None:
        self.result = result
        self.delay = delay
        self.scanned: list[bytes] = []

    async def scan(self, data: bytes) -> ScanResult:
        self.scanned.append(data)
        await asyncio.sleep(self.delay)
        return self.result


@dataclass
class Services:
    clamav: Any = None


def context(scanner: Any, policy: dict[str, Any] | None = None, *, tenant: str = "acme",
            results: Results | None = None, message: FakeMessage | None = None,
            services: Any = None) -> FilterContext:
    return FilterContext(Stage.MESSAGE, FakeSession(), FakeEnvelope(),
                         FakeTenant(tenant, policy or {}), message or FakeMessage(),
                         services if services is not None else Services(scanner),
                         results if results is not None else Results())


INFECTED = ScanResult(ScanVerdict.INFECTED, "Test.Virus", "clamd: stream: Test.Virus FOUND")
CLEAN = ScanResult(ScanVerdict.CLEAN, detail="clamd: stream: OK")
DOWN = ScanResult(ScanVerdict.ERROR, detail="clamd at unix:/x: ConnectionRefusedError")
TOO_LARGE = ScanResult(ScanVerdict.TOO_LARGE, detail="30000000 bytes over the scan limit")


async def decide(result: ScanResult, policy: dict[str, Any] | None = None) -> tuple[Any, Any]:
    results = Results()
    ctx = context(FakeScanner(result), policy, results=results)
    ctx.current_filter = AntivirusCheck.name
    verdict = await AntivirusCheck().check(ctx)
    entries = results.entries
    assert len(entries) == 1 and entries[0].filter == "antivirus"
    return verdict, entries[0]


def test_filter_contract() -> None:
    assert AntivirusCheck.name == "antivirus"
    assert AntivirusCheck.stages == frozenset({Stage.MESSAGE})
    assert AntivirusCheck.on_error is Action.TEMPFAIL
    assert AntivirusCheck.timeout >= 30


async def test_clean_passes() -> None:
    verdict, note = await decide(CLEAN)
    assert verdict.action is Action.CONTINUE and not verdict.add_headers
    assert note.outcome is Outcome.PASS


@pytest.mark.parametrize("policy", [{}, {"virus_action": "reject"},
                                    {"virus_action": "something-new"}])
async def test_virus_rejected(policy: dict[str, Any]) -> None:
    verdict, note = await decide(INFECTED, policy)
    assert verdict.action is Action.REJECT
    assert verdict.reply == VIRUS_REJECT
    assert str(verdict.reply) == "554 5.7.1 Message contains a virus"
    assert "Test.Virus" in verdict.reason
    assert note.outcome is Outcome.FAIL and "Test.Virus" in note.detail


async def test_virus_quarantined() -> None:
    verdict, note = await decide(INFECTED, {"virus_action": "quarantine"})
    assert verdict.action is Action.QUARANTINE and "Test.Virus" in verdict.reason
    assert note.outcome is Outcome.FAIL


@pytest.mark.parametrize("policy", [{}, {"antivirus_fail_open": False},
                                    {"antivirus_fail_open": "yes"}])
async def test_scanner_down_defers(policy: dict[str, Any]) -> None:
    verdict, note = await decide(DOWN, policy)
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply == SCANNER_UNAVAILABLE
    assert (verdict.reply.code, verdict.reply.status) == (451, "4.3.2")
    assert "ConnectionRefused" not in verdict.reply.text  # peers see bland text
    assert note.outcome is Outcome.ERROR


async def test_scanner_down_fail_open_marks_unscanned() -> None:
    verdict, note = await decide(DOWN, {"antivirus_fail_open": True})
    assert verdict.action is Action.CONTINUE
    assert verdict.add_headers == ((SCAN_HEADER, "unscanned (scanner unavailable)"),)
    assert note.outcome is Outcome.ERROR


@pytest.mark.parametrize("policy", [{}, {"antivirus_fail_open": True},
                                    {"virus_action": "quarantine"}])
async def test_too_large_goes_on_unscanned(policy: dict[str, Any]) -> None:
    verdict, note = await decide(TOO_LARGE, policy)
    assert verdict.action is Action.CONTINUE
    assert verdict.add_headers == ((SCAN_HEADER, "unscanned (too large to scan)"),)
    assert note.outcome is Outcome.SKIP


@pytest.mark.parametrize("services", [Services(None), object()])
async def test_no_scanner_configured_skips(services: Any) -> None:
    results = Results()
    ctx = context(None, services=services, results=results)
    verdict = await AntivirusCheck().check(ctx)
    assert verdict.action is Action.CONTINUE
    assert [e.outcome for e in results.entries] == [Outcome.SKIP]


async def test_scan_once_decide_per_tenant() -> None:
    """Three tenants of one transaction: one scan, three policies."""
    scanner = FakeScanner(INFECTED, delay=0.05)
    results = Results()
    message = FakeMessage(b"Subject: x\r\n\r\nbody\r\n")
    policies = {"acme": {}, "globex": {"virus_action": "quarantine"},
                "initech": {"virus_action": "reject"}}
    contexts = [context(scanner, policy, tenant=tenant, results=results, message=message)
                for tenant, policy in policies.items()]
    verdicts = await asyncio.gather(*(AntivirusCheck().check(ctx) for ctx in contexts))
    assert [v.action for v in verdicts] == [Action.REJECT, Action.QUARANTINE, Action.REJECT]
    assert scanner.scanned == [message.data]
    assert results.facts[FACT].result() == INFECTED
