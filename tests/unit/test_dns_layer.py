"""filters.dns.AsyncResolver without a real DNS server: cache, TTLs, negative caching,
single-flight, error mapping, text forms, parse_nameservers.

The upstream is a tiny scripted responder inside the test: an asyncio UDP endpoint on
127.0.0.1 that parses each query with dnspython's message API and answers what the test's
handler returns (a response message, raw bytes, or nothing at all). So the resolver runs
its real dnspython code path, with real packets, but nothing outside this process is
involved. Cache time is a fake clock moved by hand; only the timeout tests wait (< 0.5 s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from filters.dns import (
    AsyncResolver,
    DnsError,
    DnsNameError,
    DnsResult,
    DnsTemporaryError,
    Resolver,
    parse_nameservers,
)

Reply = dns.message.Message | bytes | None
Handler = Callable[[dns.message.QueryMessage], Reply]
SOA = "example.test. 300 IN SOA ns.example.test. host.example.test. 1 3600 600 86400 60"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def rrsets(lines: tuple[str, ...]) -> list[dns.rrset.RRset]:
    """'name ttl IN TYPE rdata' lines -> RRsets (lines of one name and type merged)."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for line in lines:
        name, ttl, rdclass, rdtype, rdata = line.split(None, 4)
        groups.setdefault((name, ttl, rdclass, rdtype), []).append(rdata)
    return [dns.rrset.from_text(name, int(ttl), rdclass, rdtype, *rdatas)
            for (name, ttl, rdclass, rdtype), rdatas in groups.items()]


def reply(
    query: dns.message.QueryMessage,
    *answer: str,
    rcode: dns.rcode.Rcode = dns.rcode.NOERROR,
    authority: tuple[str, ...] = (),
    aa: bool = True,
) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if aa:
        response.flags |= dns.flags.AA
    response.answer.extend(rrsets(answer))
    response.authority.extend(rrsets(authority))
    return response


class Responder(asyncio.DatagramProtocol):
    """Answers each UDP query with ``handler(query)``; with ``gate`` set, answers only
    once the gate opens."""

    def __init__(self) -> None:
        self.handler: Handler = lambda q: reply(q, rcode=dns.rcode.REFUSED)
        self.queries: list[tuple[str, str]] = []
        self.gate: asyncio.Event | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's selector datagram transport is not a subclass of DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        query = dns.message.from_wire(data)
        assert isinstance(query, dns.message.QueryMessage)
        question = query.question[0]
        self.queries.append((question.name.to_text(), dns.rdatatype.to_text(question.rdtype)))
        out = self.handler(query)
        if out is None:
            return
        wire = out if isinstance(out, bytes) else out.to_wire()
        if self.gate is None:
            self._send(wire, addr)
        else:
            task = asyncio.get_running_loop().create_task(self._later(self.gate, wire, addr))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _later(self, gate: asyncio.Event, wire: bytes, addr: Any) -> None:
        await gate.wait()
        self._send(wire, addr)

    def _send(self, wire: bytes, addr: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(wire, addr)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.transport is not None:
            self.transport.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Responder]:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(Responder, local_addr=("127.0.0.1", 0))
    yield protocol
    await protocol.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


MakeResolver = Callable[..., AsyncResolver]


@pytest.fixture
async def make_resolver(
    upstream: Responder, clock: FakeClock
) -> AsyncIterator[MakeResolver]:
    made: list[AsyncResolver] = []

    def make(**options: Any) -> AsyncResolver:
        options.setdefault("timeout", 1.0)
        options.setdefault("clock", clock)
        instance = AsyncResolver([("127.0.0.1", upstream.port)], **options)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        await instance.aclose()


# -- parse_nameservers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", ("10.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        (" 127.0.0.1:53 ", ("127.0.0.1", 53)),
        ("[::1]:53", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("[::1]", ("::1", 53)),
        ("::1", ("::1", 53)),
        ("2001:DB8::0:1", ("2001:db8::1", 53)),
        ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
    ],
)
def test_parse_nameservers_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameservers([text]) == [expected]


@pytest.mark.parametrize(
    "text",
    [
        "", "ns.example.com", "ns.example.com:53", "127.0.0.1:", "127.0.0.1:0",
        "127.0.0.1:65536", "127.0.0.1:x", "[::1", "[::1]53", "[127.0.0.1]:53",
        "::1:53:", "[::1]:", "999.0.0.1", "127.0.0.1:\uff15\uff13",
    ],
)
def test_parse_nameservers_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="nameserver"):
        parse_nameservers([text])


def test_parse_nameservers_keeps_order_and_refuses_a_bare_string() -> None:
    assert parse_nameservers(["10.0.0.2", "10.0.0.1:54"]) == [("10.0.0.2", 53),
                                                             ("10.0.0.1", 54)]
    assert parse_nameservers([]) == []
    with pytest.raises(TypeError):
        parse_nameservers("10.0.0.1")


# -- construction -----------------------------------------------------------------------


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="empty"):
        AsyncResolver([])
    with pytest.raises(ValueError, match="IP address"):
        AsyncResolver([("ns.example.com", 53)])
    with pytest.raises(ValueError, match="port"):
        AsyncResolver([("127.0.0.1", 0)])
    for bad in ({"timeout": 0}, {"timeout": float("nan")}, {"attempts": 0},
                {"cache_size": -1}, {"max_ttl": -1}, {"error_ttl": -1}):
        with pytest.raises(ValueError):
            AsyncResolver([("127.0.0.1", 53)], **bad)


def test_nameservers_and_protocol() -> None:
    resolver = AsyncResolver([("127.0.0.1", 5353), ("::1", 53)], timeout=1.5)
    assert resolver.nameservers == (("127.0.0.1", 5353), ("::1", 53))
    assert resolver.timeout == 1.5
    checked: Resolver = resolver  # AsyncResolver implements the Protocol
    assert checked is resolver
    assert issubclass(DnsTemporaryError, DnsError) and issubclass(DnsNameError, DnsError)


# -- text forms ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rdtype", "lines", "expected"),
    [
        ("A", ["q.test. 60 IN A 192.0.2.1", "q.test. 60 IN A 192.0.2.2"],
         ("192.0.2.1", "192.0.2.2")),
        ("AAAA", ["q.test. 60 IN AAAA 2001:DB8:0:0:0:0:0:1"], ("2001:db8::1",)),
        ("MX", ["q.test. 60 IN MX 10 MX1.Example.TEST.", "q.test. 60 IN MX 20 mx2.example.test."],
         ("10 mx1.example.test", "20 mx2.example.test")),
        ("MX", ["q.test. 60 IN MX 0 ."], ("0 .",)),
        ("PTR", ["q.test. 60 IN PTR Host.Example.Test."], ("host.example.test",)),
        ("NS", ["q.test. 60 IN NS ns1.example.test."], ("ns1.example.test",)),
        ("CNAME", ["q.test. 60 IN CNAME target.example.test."], ("target.example.test",)),
        ("TXT", ['q.test. 60 IN TXT "v=spf1 " "ip4:192.0.2.0/24" " -all"'],
         ("v=spf1 ip4:192.0.2.0/24 -all",)),
        ("TXT", ['q.test. 60 IN TXT "one"', 'q.test. 60 IN TXT "two" "three"'],
         ("one", "twothree")),
        ("TXT", ['q.test. 60 IN TXT "caf\\195\\169 \\255"'], ("caf\u00e9 \ufffd",)),
        ("TXT", ['q.test. 60 IN TXT ""'], ("",)),
        ("SRV", ["q.test. 60 IN SRV 0 5 25 mx.example.test."], ("0 5 25 mx.example.test.",)),
    ],
)
async def test_text_forms(
    upstream: Responder, make_resolver: MakeResolver, rdtype: str, lines: list[str],
    expected: tuple[str, ...],
) -> None:
    upstream.handler = lambda q: reply(q, *lines)
    result = await make_resolver().query("q.test", rdtype)
    ordered = DnsResult(result.name, result.rdtype, tuple(sorted(result.records)), result.ttl,
                        result.nxdomain)  # the order of records in an RRset carries nothing
    assert ordered == DnsResult("q.test", rdtype, tuple(sorted(expected)), 60, nxdomain=False)
    assert result.exists


async def test_cname_chain_gives_the_targets_records_and_the_smallest_ttl(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: reply(
        q,
        "www.example.test. 300 IN CNAME web.example.test.",
        "web.example.test. 30 IN CNAME host.example.test.",
        "host.example.test. 600 IN A 192.0.2.7",
    )
    result = await make_resolver().query("www.example.test", "A")
    assert result == DnsResult("www.example.test", "A", ("192.0.2.7",), 30)


async def test_names_are_normalised_and_share_one_cache_entry(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: reply(q, f"{q.question[0].name} 60 IN A 192.0.2.1")
    resolver = make_resolver()
    first = await resolver.query("Example.TEST.", "a")
    second = await resolver.query("example.test", "A")
    assert first.name == second.name == "example.test" and first.rdtype == "A"
    assert upstream.queries == [("example.test.", "A")]
    idn = await resolver.query("b\u00fccher.example", "A")
    assert idn.name == "xn--bcher-kva.example"
    assert upstream.queries[-1] == ("xn--bcher-kva.example.", "A")


# -- malformed names and types ------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", ".", "a..example", ".example", "x" * 64 + ".example", ("a" * 63 + ".") * 4 + "com",
     "bad\\", "xn--\u00e4.example"],
)
async def test_malformed_names_raise_name_error_without_a_query(
    upstream: Responder, make_resolver: MakeResolver, name: str
) -> None:
    with pytest.raises(DnsNameError):
        await make_resolver().query(name, "TXT")
    assert upstream.queries == []


@pytest.mark.parametrize("rdtype", ["NOPE", "ANY", "AXFR", ""])
async def test_unknown_and_meta_types_are_programming_errors(
    make_resolver: MakeResolver, rdtype: str
) -> None:
    with pytest.raises(ValueError):
        await make_resolver().query("example.test", rdtype)


# -- error mapping --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("what", "handler"),
    [
        ("SERVFAIL", lambda q: reply(q, rcode=dns.rcode.SERVFAIL)),
        ("REFUSED", lambda q: reply(q, rcode=dns.rcode.REFUSED)),
        ("FORMERR", lambda q: reply(q, rcode=dns.rcode.FORMERR)),
        ("NOTIMP", lambda q: reply(q, rcode=dns.rcode.NOTIMP)),
        ("YXDOMAIN", lambda q: reply(q, rcode=dns.rcode.YXDOMAIN)),
        ("garbage", lambda q: b"\x00\x01garbage"),
        ("wrong question",
         lambda q: reply(dns.message.make_query("other.test", "A"), "other.test. 60 IN A 1.2.3.4")),
        ("referral", lambda q: reply(q, authority=("example.test. 60 IN NS ns.elsewhere.",),
                                     aa=False)),
        ("CNAME loop", lambda q: reply(q, "example.test. 60 IN CNAME example.test.")),
    ],
)
async def test_failures_are_temporary_errors(
    upstream: Responder, make_resolver: MakeResolver, what: str, handler: Handler
) -> None:
    upstream.handler = handler
    resolver = make_resolver(timeout=0.3)
    started = time.monotonic()
    with pytest.raises(DnsTemporaryError) as info:
        await resolver.query("example.test", "A")
    assert time.monotonic() - started < 0.5, what
    assert "example.test A" in str(info.value)
    assert resolver.errors == 1 and resolver.queries == 1


async def test_servfail_message_names_the_nameserver_and_rcode(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: reply(q, rcode=dns.rcode.SERVFAIL)
    with pytest.raises(DnsTemporaryError, match=rf"127\.0\.0\.1:{upstream.port} SERVFAIL"):
        await make_resolver().query("example.test", "TXT")


async def test_nxdomain_is_an_answer_with_the_negative_ttl_from_the_soa(
    upstream: Responder, make_resolver: MakeResolver, clock: FakeClock
) -> None:
    upstream.handler = lambda q: reply(q, rcode=dns.rcode.NXDOMAIN, authority=(SOA,))
    resolver = make_resolver()
    result = await resolver.query("nope.example.test", "TXT")
    assert result == DnsResult("nope.example.test", "TXT", (), 60, nxdomain=True)
    assert not result.exists
    clock.advance(59)
    assert (await resolver.query("nope.example.test", "TXT")).nxdomain
    assert len(upstream.queries) == 1
    clock.advance(1)
    await resolver.query("nope.example.test", "TXT")
    assert len(upstream.queries) == 2


async def test_nodata_is_empty_records_cached_by_the_soa(
    upstream: Responder, make_resolver: MakeResolver, clock: FakeClock
) -> None:
    # SOA TTL 300, minimum 60 -> 60 (RFC 2308: the smaller of the two).
    upstream.handler = lambda q: reply(q, authority=(SOA,))
    resolver = make_resolver()
    result = await resolver.query("example.test", "AAAA")
    assert result == DnsResult("example.test", "AAAA", (), 60, nxdomain=False)
    assert result.exists
    clock.advance(30)
    assert (await resolver.query("example.test", "AAAA")).ttl == 30
    assert len(upstream.queries) == 1


@pytest.mark.parametrize("rcode", [dns.rcode.NOERROR, dns.rcode.NXDOMAIN])
async def test_negative_answer_without_soa_is_not_cached(
    upstream: Responder, make_resolver: MakeResolver, rcode: dns.rcode.Rcode
) -> None:
    upstream.handler = lambda q: reply(q, rcode=rcode)
    resolver = make_resolver()
    first = await resolver.query("x.example.test", "MX")
    assert first.records == () and first.ttl == 0
    assert first.nxdomain == (rcode == dns.rcode.NXDOMAIN)
    await resolver.query("x.example.test", "MX")
    assert len(upstream.queries) == 2


async def test_negative_ttl_is_capped_and_takes_cname_ttls(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    big_soa = "example.test. 86400 IN SOA ns.example.test. h.example.test. 1 3600 600 86400 86400"
    upstream.handler = lambda q: reply(q, rcode=dns.rcode.NXDOMAIN, authority=(big_soa,))
    assert (await make_resolver(max_negative_ttl=900).query("a.example.test", "A")).ttl == 900
    upstream.handler = lambda q: reply(
        q, "alias.example.test. 20 IN CNAME gone.example.test.", rcode=dns.rcode.NXDOMAIN,
        authority=(big_soa,),
    )
    result = await make_resolver().query("alias.example.test", "A")
    assert result.nxdomain and result.ttl == 20


# -- positive caching ----------------------------------------------------------------------


async def test_positive_answers_live_their_ttl_and_count_down(
    upstream: Responder, make_resolver: MakeResolver, clock: FakeClock
) -> None:
    upstream.handler = lambda q: reply(q, "example.test. 100 IN TXT \"v=spf1 -all\"")
    resolver = make_resolver()
    assert (await resolver.query("example.test", "TXT")).ttl == 100
    clock.advance(40.5)
    cached = await resolver.query("example.test", "TXT")
    assert cached.records == ("v=spf1 -all",) and cached.ttl == 60  # 59.5 rounded up
    clock.advance(59.4)
    assert (await resolver.query("example.test", "TXT")).ttl == 1
    assert len(upstream.queries) == 1
    assert (resolver.hits, resolver.misses, resolver.queries) == (2, 1, 1)
    clock.advance(0.1)  # expired now
    assert (await resolver.query("example.test", "TXT")).ttl == 100
    assert len(upstream.queries) == 2


async def test_ttl_is_capped_by_max_ttl(
    upstream: Responder, make_resolver: MakeResolver, clock: FakeClock
) -> None:
    upstream.handler = lambda q: reply(q, "example.test. 86400 IN A 192.0.2.1")
    resolver = make_resolver(max_ttl=300)
    assert (await resolver.query("example.test", "A")).ttl == 300
    clock.advance(300)
    await resolver.query("example.test", "A")
    assert len(upstream.queries) == 2


async def test_ttl_zero_is_returned_but_not_cached(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: reply(q, "example.test. 0 IN A 192.0.2.1")
    resolver = make_resolver()
    assert (await resolver.query("example.test", "A")).ttl == 0
    await resolver.query("example.test", "A")
    assert len(upstream.queries) == 2 and len(resolver) == 0


async def test_types_are_cached_separately(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: reply(q, authority=(SOA,))
    resolver = make_resolver()
    await resolver.query("example.test", "A")
    await resolver.query("example.test", "AAAA")
    await resolver.query("example.test", "A")
    assert upstream.queries == [("example.test.", "A"), ("example.test.", "AAAA")]


async def test_lru_evicts_the_least_recently_used(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: reply(q, f"{q.question[0].name} 60 IN A 192.0.2.1")
    resolver = make_resolver(cache_size=2)
    await resolver.query("a.test", "A")
    await resolver.query("b.test", "A")
    await resolver.query("a.test", "A")  # a is now the most recent
    await resolver.query("c.test", "A")  # evicts b
    assert resolver.evictions == 1 and len(resolver) == 2
    await resolver.query("a.test", "A")
    await resolver.query("b.test", "A")
    assert [name for name, _ in upstream.queries] == ["a.test.", "b.test.", "c.test.", "b.test."]


async def test_cache_size_zero_caches_nothing(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: reply(q, "a.test. 60 IN A 192.0.2.1")
    resolver = make_resolver(cache_size=0)
    await resolver.query("a.test", "A")
    await resolver.query("a.test", "A")
    assert len(upstream.queries) == 2 and resolver.evictions == 0


async def test_clear_forgets_everything(upstream: Responder, make_resolver: MakeResolver) -> None:
    upstream.handler = lambda q: reply(q, "a.test. 60 IN A 192.0.2.1")
    resolver = make_resolver()
    await resolver.query("a.test", "A")
    resolver.clear()
    await resolver.query("a.test", "A")
    assert len(upstream.queries) == 2


# -- temporary errors: brief caching --------------------------------------------------------


async def test_temporary_errors_are_cached_for_error_ttl(
    upstream: Responder, make_resolver: MakeResolver, clock: FakeClock
) -> None:
    upstream.handler = lambda q: reply(q, rcode=dns.rcode.SERVFAIL)
    resolver = make_resolver(error_ttl=2.0)
    errors = []
    for _ in range(3):
        with pytest.raises(DnsTemporaryError) as info:
            await resolver.query("example.test", "TXT")
        errors.append(info.value)
    assert len(upstream.queries) == 1
    assert len({id(e) for e in errors}) == 3  # each caller gets its own exception
    assert resolver.errors == 1 and resolver.hits == 2
    clock.advance(2.0)
    upstream.handler = lambda q: reply(q, 'example.test. 60 IN TXT "back"')
    assert (await resolver.query("example.test", "TXT")).records == ("back",)
    assert len(upstream.queries) == 2


async def test_error_ttl_zero_asks_every_time(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: reply(q, rcode=dns.rcode.REFUSED)
    resolver = make_resolver(error_ttl=0)
    for _ in range(2):
        with pytest.raises(DnsTemporaryError):
            await resolver.query("example.test", "TXT")
    assert len(upstream.queries) == 2 and len(resolver) == 0


async def test_an_error_never_serves_an_expired_answer(
    upstream: Responder, make_resolver: MakeResolver, clock: FakeClock
) -> None:
    upstream.handler = lambda q: reply(q, "a.test. 10 IN A 192.0.2.1")
    resolver = make_resolver()
    await resolver.query("a.test", "A")
    clock.advance(10)
    upstream.handler = lambda q: reply(q, rcode=dns.rcode.SERVFAIL)
    with pytest.raises(DnsTemporaryError):
        await resolver.query("a.test", "A")


# -- timeouts ----------------------------------------------------------------------------------


async def test_silence_times_out_within_the_budget_after_all_attempts(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: None
    resolver = make_resolver(timeout=0.4, attempts=2)
    started = time.monotonic()
    with pytest.raises(DnsTemporaryError, match=r"no answer within 0\.4s"):
        await resolver.query("example.test", "A")
    elapsed = time.monotonic() - started
    assert 0.35 <= elapsed < 0.55
    assert len(upstream.queries) == 2  # the second attempt went out before the budget ended


async def test_a_silent_nameserver_is_skipped_for_the_next(
    upstream: Responder, clock: FakeClock
) -> None:
    loop = asyncio.get_running_loop()
    silent_transport, silent = await loop.create_datagram_endpoint(
        Responder, local_addr=("127.0.0.1", 0)
    )
    silent.handler = lambda q: None
    upstream.handler = lambda q: reply(q, "example.test. 60 IN A 192.0.2.1")
    resolver = AsyncResolver([("127.0.0.1", silent.port), ("127.0.0.1", upstream.port)],
                             timeout=1.0, attempts=2, clock=clock)
    try:
        started = time.monotonic()
        assert (await resolver.query("example.test", "A")).records == ("192.0.2.1",)
        assert time.monotonic() - started < 0.8  # one try (0.5 s) lost to the silent one
        assert len(silent.queries) == 1
    finally:
        await resolver.aclose()
        silent_transport.close()


# -- single-flight ------------------------------------------------------------------------------


async def test_concurrent_queries_share_one_fetch(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: reply(q, "example.test. 60 IN TXT \"v=spf1 -all\"")
    upstream.gate = asyncio.Event()
    resolver = make_resolver()
    callers = [asyncio.create_task(resolver.query("example.test", "TXT")) for _ in range(20)]
    other = asyncio.create_task(resolver.query("example.test", "MX"))
    while len(upstream.queries) < 2:
        await asyncio.sleep(0.001)
    assert resolver.in_flight == 2
    upstream.gate.set()
    results = await asyncio.gather(*callers)
    await other
    assert {r.records for r in results} == {("v=spf1 -all",)}
    assert sorted(upstream.queries) == [("example.test.", "MX"), ("example.test.", "TXT")]
    assert (resolver.misses, resolver.queries, resolver.in_flight) == (21, 2, 0)


async def test_a_cancelled_caller_does_not_cancel_the_fetch(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: reply(q, "example.test. 60 IN A 192.0.2.1")
    upstream.gate = asyncio.Event()
    resolver = make_resolver()
    impatient = asyncio.create_task(resolver.query("example.test", "A"))
    patient = asyncio.create_task(resolver.query("example.test", "A"))
    while not upstream.queries:
        await asyncio.sleep(0.001)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    upstream.gate.set()
    assert (await patient).records == ("192.0.2.1",)
    assert (await resolver.query("example.test", "A")).records == ("192.0.2.1",)
    assert len(upstream.queries) == 1


async def test_a_fetch_nobody_waits_for_still_fills_the_cache(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: reply(q, rcode=dns.rcode.SERVFAIL)
    upstream.gate = asyncio.Event()
    resolver = make_resolver(error_ttl=5)
    caller = asyncio.create_task(resolver.query("example.test", "A"))
    while not upstream.queries:
        await asyncio.sleep(0.001)
    caller.cancel()
    upstream.gate.set()
    while resolver.in_flight:
        await asyncio.sleep(0.001)
    with pytest.raises(DnsTemporaryError):  # from the cache: the error was stored
        await resolver.query("example.test", "A")
    assert len(upstream.queries) == 1


async def test_clear_during_a_fetch_stores_nothing(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: reply(q, "example.test. 60 IN A 192.0.2.1")
    upstream.gate = asyncio.Event()
    resolver = make_resolver()
    caller = asyncio.create_task(resolver.query("example.test", "A"))
    while not upstream.queries:
        await asyncio.sleep(0.001)
    resolver.clear()
    upstream.gate.set()
    assert (await caller).records == ("192.0.2.1",)
    assert len(resolver) == 0


async def test_aclose_cancels_fetches_in_flight(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: None
    resolver = make_resolver(timeout=5.0)
    caller = asyncio.create_task(resolver.query("example.test", "A"))
    while not upstream.queries:
        await asyncio.sleep(0.001)
    await resolver.aclose()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert resolver.in_flight == 0


async def test_stats_are_plain_ints(upstream: Responder, make_resolver: MakeResolver) -> None:
    upstream.handler = lambda q: reply(q, "a.test. 60 IN A 192.0.2.1")
    resolver = make_resolver()
    await resolver.query("a.test", "A")
    await resolver.query("a.test", "A")
    assert resolver.stats() == {"hits": 1, "misses": 1, "queries": 1, "errors": 0,
                                "evictions": 0, "entries": 1, "in_flight": 0}
    assert all(type(v) is int for v in resolver.stats().values())


async def test_the_loop_stays_responsive_while_waiting(
    upstream: Responder, make_resolver: MakeResolver
) -> None:
    upstream.handler = lambda q: None
    resolver = make_resolver(timeout=0.3)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    with pytest.raises(DnsTemporaryError):
        await resolver.query("example.test", "A")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ticks >= 15


def test_dns_name_root_is_absolute() -> None:  # guards an assumption of _normalise_name
    assert dns.name.from_text("example.test", origin=dns.name.root).is_absolute()
