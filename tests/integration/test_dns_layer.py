"""filters.dns.AsyncResolver against a real authoritative server (NSD) with generated zones.

The NSD instance is the ``dns_server`` fixture (tests/peers/dns.py); ``resolver`` asks only
it, with a 0.5 s budget per query and no caching of temporary errors. NSD is not a
recursive resolver, so what a recursive resolver would add (following a CNAME into
another zone, SERVFAIL for a dead delegation) is not exercised here: NSD follows CNAMEs
within a zone, answers REFUSED outside its zones and a referral below a delegation, and
the resolver maps the last two to temporary errors.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from filters.dns import AsyncResolver, DnsNameError, DnsResult, DnsTemporaryError
from tests.peers import fixtures_dns
from tests.peers.dns import AuthoritativeDNS, DnsServerError, split_txt
from tests.peers.fixtures_dns import RESOLVER_TIMEOUT, DnsServerFactory
from tests.peers.ports import free_port

pytestmark = pytest.mark.integration

# The fixtures, also when tests/conftest.py does not star-import tests.peers.fixtures_dns.
dns_server = fixtures_dns.dns_server
dns_server_factory = fixtures_dns.dns_server_factory
resolver = fixtures_dns.resolver

SPF = "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 include:_spf.example.org -all"
DKIM_KEY = "v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" * 9 + "IDAQAB"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_answers_in_their_text_form(
    dns_server: AuthoritativeDNS, resolver: AsyncResolver
) -> None:
    zone = dns_server.zone("example.test")
    zone.add("@", "TXT", f'"{SPF}"').add("@", "MX", "10 MX1.Example.TEST.")
    zone.add("@", "MX", "20 mx2").add("mx1", "A", "192.0.2.10").add("mx1", "A", "192.0.2.11")
    zone.add("mx1", "AAAA", "2001:0DB8:0000:0000:0000:0000:0000:0010")
    zone.add("_dmarc", "TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@example.test")
    zone.add("nullmx", "MX", "0 .").add("sub", "NS", "ns1.example.test.")
    dns_server.zone("2.0.192.in-addr.arpa").add("10", "PTR", "MX1.example.test.")
    dns_server.zone("0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa")\
        .add("@", "PTR", "mx1.example.test.")
    dns_server.reload()

    async def records(name: str, rdtype: str) -> list[str]:
        result = await resolver.query(name, rdtype)
        assert result.exists and result.rdtype == rdtype
        assert result.ttl == 60
        return sorted(result.records)

    assert await records("example.test", "TXT") == [SPF]
    assert await records("example.test", "MX") == ["10 mx1.example.test", "20 mx2.example.test"]
    assert await records("mx1.example.test", "A") == ["192.0.2.10", "192.0.2.11"]
    assert await records("mx1.example.test", "AAAA") == ["2001:db8::10"]
    assert await records("_dmarc.example.test", "TXT") == [
        "v=DMARC1; p=reject; rua=mailto:dmarc@example.test"]
    assert await records("nullmx.example.test", "MX") == ["0 ."]
    assert await records("example.test", "NS") == ["localhost"]
    assert await records("10.2.0.192.in-addr.arpa", "PTR") == ["mx1.example.test"]
    ptr6 = "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
    assert await records(ptr6, "PTR") == ["mx1.example.test"]
    assert await records("EXAMPLE.Test.", "TXT") == [SPF]  # case and final dot do not matter


async def test_long_txt_records_are_split_in_the_zone_and_joined_in_the_answer(
    dns_server: AuthoritativeDNS, resolver: AsyncResolver
) -> None:
    huge = "x" * 3000  # over the 1232-octet EDNS payload: the answer comes over TCP
    zone = dns_server.zone("example.test")
    zone.add("sel._domainkey", "TXT", DKIM_KEY)  # unquoted: one text, split at 255
    zone.add("quoted._domainkey", "TXT", '"v=DKIM1; k=rsa; " "p=' + "A" * 300 + '"')
    zone.txt("huge", huge)
    dns_server.reload()
    zone_file = (dns_server.zones_dir / "example.test.zone").read_text()
    assert zone_file.count('" "') >= len(split_txt(DKIM_KEY)) - 1  # really several strings

    assert (await resolver.query("sel._domainkey.example.test", "TXT")).records == (DKIM_KEY,)
    quoted = await resolver.query("quoted._domainkey.example.test", "TXT")
    assert quoted.records == ("v=DKIM1; k=rsa; p=" + "A" * 300,)
    assert (await resolver.query("huge.example.test", "TXT")).records == (huge,)


async def test_txt_bytes_that_are_not_utf8_become_replacement_characters(
    dns_server: AuthoritativeDNS, resolver: AsyncResolver
) -> None:
    zone = dns_server.zone("example.test")
    zone.txt("latin1", b"v=spf1 caf\xe9 -all").txt("utf8", "v=spf1 caf\u00e9 -all")
    zone.add("two", "TXT", "first").add("two", "TXT", "second")
    dns_server.reload()
    assert (await resolver.query("latin1.example.test", "TXT")).records == (
        "v=spf1 caf\ufffd -all",)
    assert (await resolver.query("utf8.example.test", "TXT")).records == (
        "v=spf1 caf\u00e9 -all",)
    two = await resolver.query("two.example.test", "TXT")
    assert sorted(two.records) == ["first", "second"]


async def test_nxdomain_nodata_and_empty_non_terminals(
    dns_server: AuthoritativeDNS, resolver: AsyncResolver
) -> None:
    zone = dns_server.zone("example.test")
    zone.add("mx", "A", "192.0.2.10").add("sel._domainkey", "TXT", "v=DKIM1; p=")
    dns_server.reload()

    missing = await resolver.query("nope.example.test", "TXT")
    assert missing == DnsResult("nope.example.test", "TXT", (), 5, nxdomain=True)
    assert not missing.exists
    nodata = await resolver.query("mx.example.test", "TXT")
    assert nodata == DnsResult("mx.example.test", "TXT", (), 5, nxdomain=False)
    # _domainkey exists only because a name below it does: NODATA, never NXDOMAIN.
    between = await resolver.query("_domainkey.example.test", "TXT")
    assert between.exists and between.records == ()
    # The negative TTL is the zone's SOA minimum (negative_ttl=).
    other = dns_server.zone("slow.test", negative_ttl=600)
    other.add("x", "A", "192.0.2.1")
    dns_server.reload()
    assert (await resolver.query("y.slow.test", "A")).ttl == 600


async def test_cnames_are_followed(dns_server: AuthoritativeDNS, resolver: AsyncResolver) -> None:
    zone = dns_server.zone("example.test")
    zone.add("www", "CNAME", "web").add("web", "CNAME", "host", ttl=30)
    zone.add("host", "A", "192.0.2.7", ttl=300).add("host", "TXT", "v=spf1 -all")
    zone.add("dangling", "CNAME", "gone")
    dns_server.reload()

    www = await resolver.query("www.example.test", "A")
    assert www == DnsResult("www.example.test", "A", ("192.0.2.7",), 30)
    assert (await resolver.query("www.example.test", "TXT")).records == ("v=spf1 -all",)
    assert (await resolver.query("www.example.test", "CNAME")).records == ("web.example.test",)
    dangling = await resolver.query("dangling.example.test", "A")
    assert dangling.nxdomain and dangling.records == ()


async def test_servfail_refused_and_referrals_are_temporary_errors(
    dns_server: AuthoritativeDNS, resolver: AsyncResolver
) -> None:
    dns_server.zone("example.test").add("sub", "NS", "ns.elsewhere.test.")
    dns_server.servfail_zone("broken.test")
    dns_server.reload()
    for name, why in [("x.broken.test", "SERVFAIL"), ("not-served.test", "REFUSED"),
                      ("x.sub.example.test", "referral")]:
        started = time.monotonic()
        with pytest.raises(DnsTemporaryError, match=why):
            await resolver.query(name, "TXT")
        assert time.monotonic() - started < RESOLVER_TIMEOUT, name  # no waiting for these


async def test_malformed_names_never_reach_the_server(resolver: AsyncResolver) -> None:
    for name in ("a..example.test", "x" * 64 + ".test", "a." * 130 + "test", ""):
        with pytest.raises(DnsNameError):
            await resolver.query(name, "A")
    assert resolver.queries == 0


async def test_a_stopped_server_is_a_temporary_error_within_the_timeout(
    dns_server: AuthoritativeDNS, resolver: AsyncResolver
) -> None:
    dns_server.zone("example.test").add("mx", "A", "192.0.2.10")
    dns_server.reload()
    dns_server.stop()
    assert dns_server.processes() == []
    started = time.monotonic()
    with pytest.raises(DnsTemporaryError):
        await resolver.query("mx.example.test", "A")
    assert time.monotonic() - started < RESOLVER_TIMEOUT + 0.1

    dns_server.start()  # same port
    assert (await resolver.query("mx.example.test", "A")).records == ("192.0.2.10",)


async def test_a_hung_server_times_out_and_recovers(
    dns_server: AuthoritativeDNS, resolver: AsyncResolver
) -> None:
    dns_server.zone("example.test").add("mx", "A", "192.0.2.10")
    dns_server.reload()
    dns_server.freeze()
    started = time.monotonic()
    with pytest.raises(DnsTemporaryError, match="no answer within"):
        await resolver.query("mx.example.test", "A")
    assert RESOLVER_TIMEOUT - 0.05 < time.monotonic() - started < RESOLVER_TIMEOUT + 0.1
    dns_server.thaw()
    assert (await resolver.query("mx.example.test", "A")).records == ("192.0.2.10",)


async def test_temporary_errors_are_remembered_for_error_ttl(
    dns_server: AuthoritativeDNS,
) -> None:
    dns_server.zone("example.test").add("mx", "A", "192.0.2.10")
    dns_server.reload()
    clock = FakeClock()
    resolver = AsyncResolver(dns_server.nameservers, timeout=0.3, error_ttl=2.0, clock=clock)
    try:
        dns_server.freeze()
        with pytest.raises(DnsTemporaryError):
            await resolver.query("mx.example.test", "A")
        dns_server.thaw()
        started = time.monotonic()
        with pytest.raises(DnsTemporaryError):  # from the cache, at once
            await resolver.query("mx.example.test", "A")
        assert time.monotonic() - started < 0.05
        clock.now += 2.0
        assert (await resolver.query("mx.example.test", "A")).records == ("192.0.2.10",)
        assert (resolver.queries, resolver.errors, resolver.hits) == (2, 1, 1)
    finally:
        await resolver.aclose()


async def test_a_changed_record_is_seen_once_its_ttl_has_passed(
    dns_server: AuthoritativeDNS, resolver: AsyncResolver
) -> None:
    zone = dns_server.zone("example.test")
    zone.add("@", "TXT", "v=spf1 -all", ttl=1)
    dns_server.reload()
    assert (await resolver.query("example.test", "TXT")).records == ("v=spf1 -all",)

    zone.set("@", "TXT", "v=spf1 ip4:192.0.2.1 -all", ttl=1)
    dns_server.reload()
    assert (await resolver.query("example.test", "TXT")).records == ("v=spf1 -all",)  # cached
    await asyncio.sleep(1.05)
    assert (await resolver.query("example.test", "TXT")).records == ("v=spf1 ip4:192.0.2.1 -all",)


async def test_a_new_record_is_seen_once_the_negative_ttl_has_passed(
    dns_server: AuthoritativeDNS,
) -> None:
    zone = dns_server.zone("example.test")
    dns_server.reload()
    clock = FakeClock()
    resolver = AsyncResolver(dns_server.nameservers, timeout=0.5, clock=clock)
    try:
        assert (await resolver.query("_dmarc.example.test", "TXT")).nxdomain
        zone.add("_dmarc", "TXT", "v=DMARC1; p=none")
        dns_server.reload()
        clock.now += 4.9
        assert (await resolver.query("_dmarc.example.test", "TXT")).nxdomain  # cached (5 s)
        clock.now += 0.1
        assert (await resolver.query("_dmarc.example.test", "TXT")).records == (
            "v=DMARC1; p=none",)
    finally:
        await resolver.aclose()


async def test_zones_can_be_added_and_removed(
    dns_server: AuthoritativeDNS, resolver: AsyncResolver
) -> None:
    dns_server.zone("one.test").add("@", "A", "192.0.2.1")
    dns_server.reload()
    assert (await resolver.query("one.test", "A")).records == ("192.0.2.1",)
    dns_server.zone("two.test").add("@", "A", "192.0.2.2")
    dns_server.remove_zone("one.test")
    dns_server.reload()
    assert (await resolver.query("two.test", "A")).records == ("192.0.2.2",)
    resolver.clear()
    with pytest.raises(DnsTemporaryError, match="REFUSED"):
        await resolver.query("one.test", "A")


async def test_many_concurrent_queries(
    dns_server: AuthoritativeDNS, resolver: AsyncResolver
) -> None:
    zone = dns_server.zone("example.test")
    for i in range(50):
        zone.add(f"h{i}", "A", f"192.0.2.{i}")
    dns_server.reload()
    names = [f"h{i % 50}.example.test" for i in range(200)]
    results = await asyncio.gather(*(resolver.query(name, "A") for name in names))
    assert [r.records for r in results] == [(f"192.0.2.{i % 50}",) for i in range(200)]
    assert resolver.queries == 50  # one fetch per name: the rest joined it or hit the cache


async def test_failover_to_the_next_nameserver(dns_server: AuthoritativeDNS) -> None:
    dns_server.zone("example.test").add("mx", "A", "192.0.2.10")
    dns_server.reload()
    nobody = free_port()  # nothing listens there
    resolver = AsyncResolver([("127.0.0.1", nobody), *dns_server.nameservers], timeout=1.0)
    try:
        started = time.monotonic()
        assert (await resolver.query("mx.example.test", "A")).records == ("192.0.2.10",)
        assert time.monotonic() - started < 0.8  # one try (0.5 s) lost to the dead one
    finally:
        await resolver.aclose()


async def test_ipv6_listener(dns_server_factory: DnsServerFactory) -> None:
    server = dns_server_factory(ipv6=True)
    server.zone("example.test").add("mx", "AAAA", "2001:db8::25")
    server.reload()
    resolver = AsyncResolver([("::1", server.port)], timeout=0.5)
    try:
        assert (await resolver.query("mx.example.test", "AAAA")).records == ("2001:db8::25",)
    finally:
        await resolver.aclose()


def test_the_peer_rejects_bad_zone_data_and_leaves_nothing_running(
    dns_server: AuthoritativeDNS,
) -> None:
    dns_server.zone("example.test").add("mx", "A", "not-an-address")
    with pytest.raises(DnsServerError, match="nsd-checkzone"):
        dns_server.reload()
    dns_server.zone("example.test").remove("mx")
    dns_server.reload()
    processes = dns_server.processes()
    assert len(processes) >= 2  # NSD's main process, its server and xfrd
    dns_server.stop()
    assert dns_server.processes() == [] and not dns_server.running
