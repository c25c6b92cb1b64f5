"""filters/spf.py: the RFC 7208 / RFC 4408 suites through check_spf, and the shim itself.

Every suite test runs against `ZoneResolver`, a fake of our `Resolver` Protocol built from
the scenario's zonedata the way a recursive resolver would answer: NXDOMAIN for names not
in the zone, NODATA for names without the asked type, CNAMEs followed (a loop or an
over-long chain is a temporary error, like SERVFAIL), "TIMEOUT" entries as
DnsTemporaryError, a TXT record given as a list of strings concatenated, and — the suites'
convention for RFC 4408's type SPF — SPF records also served as TXT when a name has no
TXT entry at all. pyspf's and dnspython's synchronous DNS entry points are replaced by
tripwires for every test here (`no_sync_dns`), so any stray blocking lookup fails the test.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

import dns.query
import dns.resolver
import pytest
import spf

import filters.spf as spf_module
from filters.dns import DnsNameError, DnsResult, DnsTemporaryError
from filters.spf import MAX_ROUNDS, SpfResult, check_helo, check_spf
from tests.unit import spf_suite

# -- a Resolver over test zone data ------------------------------------------------------

_TIMEOUT = object()


def _record(rtype: str, value: Any) -> Any:
    if value == "TIMEOUT":
        return _TIMEOUT
    if rtype in ("TXT", "SPF"):
        return "".join(str(s) for s in value) if isinstance(value, list) else str(value)
    if rtype == "MX":
        pref, exchange = value
        return f"{int(pref)} {str(exchange).lower().rstrip('.')}"
    if rtype == "AAAA":
        try:
            return str(ipaddress.IPv6Address(str(value)))  # a resolver's presentation form
        except ValueError:
            return str(value)
    if rtype in ("PTR", "CNAME"):
        return str(value).rstrip(".")
    return str(value)


def build_zone(zonedata: Mapping[str, Any]) -> dict[str, list[tuple[str, Any]]]:
    zone: dict[str, list[tuple[str, Any]]] = {}
    for name, entries in zonedata.items():
        out: list[tuple[str, Any]] = []
        has_txt = False
        spf_values: list[Any] = []
        for entry in entries or ():
            if entry == "TIMEOUT":
                out.append(("TIMEOUT", None))
                continue
            for rtype, value in entry.items():
                if rtype == "TXT":
                    has_txt = True
                if value == "NONE":
                    continue
                record = _record(rtype, value)
                out.append((rtype, record))
                if rtype == "SPF":
                    spf_values.append(record)
        if not has_txt:
            out.extend(("TXT", v) for v in spf_values)
        zone[str(name).lower().rstrip(".")] = out
    return zone


class ZoneResolver:
    """Implements filters.dns.Resolver over zone data; records calls and concurrency."""

    def __init__(self, zonedata: Mapping[str, Any], *, delay: float = 0.0,
                 delays: Mapping[str, float] | None = None) -> None:
        self.zone = build_zone(zonedata)
        self.delay = delay
        self.delays = dict(delays or {})
        self.calls: list[tuple[str, str]] = []
        self.active = 0
        self.max_active = 0
        self.cancelled = 0

    async def query(self, name: str, rdtype: str) -> DnsResult:
        self.calls.append((name, rdtype))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delays.get(name, self.delay))
            return self.answer(name, rdtype)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    def answer(self, name: str, rdtype: str) -> DnsResult:
        qname = name.rstrip(".").lower()
        if not qname or len(qname) > 253 or any(not 0 < len(lb) < 64 for lb in qname.split(".")):
            raise DnsNameError(name)
        current = qname
        for _ in range(16):
            entries = self.zone.get(current)
            if entries is None:
                return DnsResult(name, rdtype, nxdomain=True)
            records: list[str] = []
            cname: str | None = None
            for rtype, value in entries:
                if rtype == "TIMEOUT":
                    if not records:
                        raise DnsTemporaryError(f"timeout: {current}")
                    break
                if rtype == rdtype:
                    if value is _TIMEOUT:
                        raise DnsTemporaryError(f"timeout: {current}/{rdtype}")
                    records.append(value)
                elif rtype == "CNAME" and cname is None:
                    cname = value
            if records:
                return DnsResult(name, rdtype, tuple(records), ttl=300)
            if cname is None:
                return DnsResult(name, rdtype, ttl=300)
            current = cname.lower()
        raise DnsTemporaryError(f"CNAME chain too long or looping at {name}")


class DownResolver:
    """Every query fails the way an unreachable DNS does."""

    def __init__(self) -> None:
        self.calls = 0

    async def query(self, name: str, rdtype: str) -> DnsResult:
        self.calls += 1
        await asyncio.sleep(0)
        raise DnsTemporaryError("no nameserver reachable")


# -- no synchronous DNS, ever ------------------------------------------------------------


class StraySyncDns(BaseException):
    """A BaseException so that no `except Exception` (or pyspf's bare except) hides it
    from the assertion at teardown."""


@pytest.fixture(autouse=True)
def no_sync_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    stray: list[str] = []

    def tripwire(what: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            stray.append(f"{what}{args!r}")
            raise StraySyncDns(what)
        return call

    for target, attr in [
        (spf, "DNSLookup_dnspython"),
        (dns.resolver, "query"),
        (dns.resolver, "resolve"),
        (dns.resolver, "resolve_address"),
        (dns.resolver.Resolver, "resolve"),
        (dns.resolver.Resolver, "query"),
        (dns.resolver.Resolver, "resolve_address"),
        (dns.query, "udp"),
        (dns.query, "tcp"),
        (socket, "getaddrinfo"),
        (socket, "gethostbyname"),
        (socket, "gethostbyaddr"),
    ]:
        monkeypatch.setattr(target, attr, tripwire(f"{getattr(target, '__name__', target)}.{attr}"))
    assert spf.DNSLookup is spf_module._served_lookup
    yield stray
    assert stray == [], f"synchronous DNS attempted: {stray}"


# -- the suites --------------------------------------------------------------------------


def _suite_cases() -> tuple[list[spf_suite.SuiteCase], str | None]:
    try:
        files = spf_suite.suite_files()
    except spf_suite.SuiteUnavailable as exc:
        return [], str(exc)
    return [case for path in files.values() for case in spf_suite.load_cases(path)], None


CASES, UNAVAILABLE = _suite_cases()


def _unavailable() -> None:
    message = f"SPF test suite unavailable (offline?): {UNAVAILABLE}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def test_suites_are_complete() -> None:
    if UNAVAILABLE:
        _unavailable()
    counts: dict[str, int] = {}
    for case in CASES:
        counts[case.file] = counts.get(case.file, 0) + 1
    assert counts == {"rfc7208-tests.yml": 203, "rfc4408-tests.yml": 191}
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES or [None], ids=lambda c: c.id if c else "unavailable")
async def test_rfc_suite(case: spf_suite.SuiteCase | None) -> None:
    if case is None:
        _unavailable()
        return
    resolver = ZoneResolver(case.zonedata)
    got = await check_spf(resolver, ip=case.host, sender=case.mailfrom, helo=case.helo,
                          receiver="", default_explanation="DEFAULT")
    assert got.result in case.results, (
        f"{case.id} (RFC {case.spec}): {got.result} not in {case.results}; {got.problem}")
    if case.explanation is not None:
        assert got.explanation == case.explanation


# -- scenarios of our own ----------------------------------------------------------------

IP = "192.0.2.10"


def zone(**names: list[Any]) -> ZoneResolver:
    return ZoneResolver({name.replace("_", "."): entries for name, entries in names.items()})


async def mailfrom(resolver: Any, sender: str = "alice@example.org", ip: str = IP,
                   helo: str = "mx.example.net", **kwargs: Any) -> SpfResult:
    return await check_spf(resolver, ip=ip, sender=sender, helo=helo,
                           receiver="mx.mailedge.test", **kwargs)


@pytest.mark.parametrize(("qtype", "result", "expected"), [
    ("TXT", DnsResult("x.test", "TXT", ("v=spf1 -all", "other")),
     ((("x.test", "TXT"), (b"v=spf1 -all",)), (("x.test", "TXT"), (b"other",)))),
    ("TXT", DnsResult("x.test", "TXT", ("caf\u00e9",)),
     ((("x.test", "TXT"), ("caf\u00e9".encode(),)),)),
    ("A", DnsResult("x.test", "A", ("192.0.2.1", "192.0.2.2")),
     ((("x.test", "A"), "192.0.2.1"), (("x.test", "A"), "192.0.2.2"))),
    ("AAAA", DnsResult("x.test", "AAAA", ("2001:db8::1",)),
     ((("x.test", "AAAA"), "2001:db8::1"),)),
    ("MX", DnsResult("x.test", "MX", ("10 mx1.x.test", "0 .", "junk")),
     ((("x.test", "MX"), (10, "mx1.x.test")), (("x.test", "MX"), (0, "")))),
    ("PTR", DnsResult("x.test", "PTR", ("host.x.test.",)),
     ((("x.test", "PTR"), "host.x.test"),)),
    ("A", DnsResult("x.test", "A", nxdomain=True), ()),
    ("A", DnsResult("x.test", "A"), ()),
])
def test_dns_result_mapping(qtype: str, result: DnsResult, expected: tuple[Any, ...]) -> None:
    assert spf_module._to_pyspf(("x.test", qtype), result) == expected


@pytest.mark.parametrize(("record", "result"), [
    ("v=spf1 ip4:192.0.2.0/24 -all", "pass"),
    ("v=spf1 ip4:198.51.100.1 -all", "fail"),
    ("v=spf1 ip4:198.51.100.1 ~all", "softfail"),
    ("v=spf1 ip4:198.51.100.1 ?all", "neutral"),
    ("v=spf1 ip4:198.51.100.1", "neutral"),
    ("v=spf1 moo -all", "permerror"),
    ("not spf", "none"),
    # NXDOMAIN and NODATA are both void lookups: two are allowed, the third is permerror
    ("v=spf1 a:nx1.example.org a:nodata.example.org -all", "fail"),
    ("v=spf1 a:nx1.example.org a:nodata.example.org a:nx2.example.org -all", "permerror"),
    ("v=spf1 mx:mail.example.org -all", "pass"),
    ("v=spf1 a:host.example.org -all", "pass"),
    ("v=spf1 include:inc.example.org -all", "pass"),
    ("v=spf1 include:nx1.example.org -all", "permerror"),
    ("v=spf1 redirect=inc.example.org", "pass"),
    ("v=spf1 exists:host.example.org -all", "pass"),
])
async def test_results_table(record: str, result: str) -> None:
    resolver = zone(
        example_org=[{"TXT": record}],
        nodata_example_org=[{"MX": [10, "mx.example.org"]}],
        mail_example_org=[{"MX": [10, "host.example.org"]}],
        host_example_org=[{"A": IP}],
        inc_example_org=[{"TXT": "v=spf1 ip4:192.0.2.0/28 -all"}],
    )
    got = await mailfrom(resolver)
    assert got.result == result, got.problem
    assert (got.identity, got.domain, got.sender) == ("mailfrom", "example.org",
                                                      "alice@example.org")


async def test_pass_reports_mechanism_and_no_explanation() -> None:
    got = await mailfrom(zone(example_org=[{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}]))
    assert (got.result, got.mechanism, got.explanation, got.problem) == (
        "pass", "ip4:192.0.2.0/24", "", "")
    assert got.rounds == 2 and got.dns_queries == 1


async def test_fail_explanation_from_exp_is_sanitised() -> None:
    resolver = zone(example_org=[{"TXT": "v=spf1 -all exp=why.example.org"}],
                    why_example_org=[{"TXT": "%{i} is not\r\nallowed\tfor %{d}"}])
    got = await mailfrom(resolver)
    assert got.result == "fail"
    assert got.explanation == "192.0.2.10 is not  allowed for example.org"
    assert got.mechanism == "-all"


async def test_default_explanation() -> None:
    resolver = zone(example_org=[{"TXT": "v=spf1 -all"}])
    assert (await mailfrom(resolver)).explanation == "SPF fail - not authorized"
    got = await mailfrom(resolver, default_explanation="See https://help.test/spf")
    assert got.explanation == "See https://help.test/spf"


# -- DNS trouble -------------------------------------------------------------------------


async def test_dns_down_is_temperror() -> None:
    resolver = DownResolver()
    got = await mailfrom(resolver)
    assert got.result == "temperror"
    assert "no nameserver reachable" in got.problem
    assert got.mechanism is None and got.explanation == ""
    assert resolver.calls == 1


async def test_timeout_in_include_is_temperror() -> None:
    resolver = zone(example_org=[{"TXT": "v=spf1 include:slow.example.org -all"}],
                    slow_example_org=["TIMEOUT"])
    got = await mailfrom(resolver)
    assert got.result == "temperror"


async def test_timeout_on_exp_keeps_the_fail() -> None:
    # RFC 7208 §6.2: a DNS error fetching the explanation just drops it
    resolver = zone(example_org=[{"TXT": "v=spf1 -all exp=why.example.org"}],
                    why_example_org=["TIMEOUT"])
    got = await mailfrom(resolver)
    assert (got.result, got.explanation) == ("fail", "SPF fail - not authorized")


class NameErrorResolver(ZoneResolver):
    async def query(self, name: str, rdtype: str) -> DnsResult:
        if name.startswith("bad"):
            self.calls.append((name, rdtype))
            raise DnsNameError(name)
        return await super().query(name, rdtype)


@pytest.mark.parametrize(("record", "result"), [
    (None, "none"),  # the checked domain itself cannot be queried: RFC 7208 §4.3
    ("v=spf1 include:bad.example.org -all", "permerror"),
    ("v=spf1 redirect=bad.example.org", "permerror"),
    ("v=spf1 a:bad.example.org ip4:192.0.2.10 -all", "pass"),
])
async def test_unqueryable_names(record: str | None, result: str) -> None:
    resolver = NameErrorResolver({"example.org": [{"TXT": record}]} if record else {})
    got = await mailfrom(resolver, sender="alice@bad.example.org" if record is None
                         else "alice@example.org")
    assert got.result == result


async def test_ptr_dns_errors_skip_names() -> None:
    # RFC 7208 §5.5: an error on a name's address lookup skips that name
    resolver = zone(
        example_org=[{"TXT": "v=spf1 ptr -all"}],
        **{"10.2.0.192.in-addr.arpa": [{"PTR": "slow.example.org"}, {"PTR": "ok.example.org"}]},
        slow_example_org=["TIMEOUT"],
        ok_example_org=[{"A": IP}],
    )
    assert (await mailfrom(resolver)).result == "pass"
    # ... and one on the PTR lookup itself means the mechanism does not match
    resolver = zone(example_org=[{"TXT": "v=spf1 ptr -all"}],
                    **{"10.2.0.192.in-addr.arpa": ["TIMEOUT"]})
    assert (await mailfrom(resolver)).result == "fail"


async def test_a_pyspf_crash_is_a_logged_temperror(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    def crash(self: Any, spf: Any = None) -> Any:
        raise ValueError("odd input")

    monkeypatch.setattr(spf_module._Query, "check", crash)
    got = await mailfrom(zone(example_org=[{"TXT": "v=spf1 -all"}]))
    assert got.result == "temperror" and "odd input" in got.problem
    assert "pyspf failed" in caplog.text


class BrokenResolver(ZoneResolver):
    async def query(self, name: str, rdtype: str) -> DnsResult:
        if name == "broken.example.org":
            raise OSError("not our contract")
        return await super().query(name, rdtype)


async def test_a_resolver_outside_its_contract_propagates() -> None:
    resolver = BrokenResolver({"example.org": [{"TXT": "v=spf1 include:broken.example.org"}]})
    with pytest.raises(OSError, match="not our contract"):
        await mailfrom(resolver, prefetch=False)
    resolver = BrokenResolver({"example.org": [{"TXT": "v=spf1 include:broken.example.org "
                                                       "a:slow.example.org -all"}]},
                              delays={"slow.example.org": 10.0})
    with pytest.raises(OSError, match="not our contract"):
        await mailfrom(resolver)  # a prefetch broke it; the slow one is cancelled
    assert resolver.active == 0


# -- restarts ----------------------------------------------------------------------------


def include_chain(depth: int) -> ZoneResolver:
    data: dict[str, Any] = {"example.org": [{"TXT": "v=spf1 include:l1.example.org -all"}]}
    for level in range(1, depth):
        data[f"l{level}.example.org"] = [{"TXT": f"v=spf1 include:l{level + 1}.example.org"}]
    data[f"l{depth}.example.org"] = [{"TXT": f"v=spf1 ip4:{IP}"}]
    return ZoneResolver(data)


async def test_restarts_are_bounded() -> None:
    got = await mailfrom(include_chain(6), max_rounds=4)
    assert got.result == "temperror"
    assert "more than 4 DNS rounds" in got.problem
    assert got.rounds == 4


async def test_restart_bound_fits_the_worst_legitimate_record() -> None:
    # 10 DNS-querying terms (the RFC limit), each an mx with 10 exchanges (the RFC limit),
    # plus exp=; the only matching exchange is the last one looked up.
    data: dict[str, Any] = {"example.org": [{"TXT": " ".join(
        ["v=spf1"] + [f"mx:m{i}.example.org" for i in range(10)]
        + ["-all", "exp=why.example.org"])}], "why.example.org": [{"TXT": "no"}]}
    for i in range(10):
        data[f"m{i}.example.org"] = [{"MX": [j, f"x{j}.m{i}.example.org"]} for j in range(10)]
        for j in range(10):
            data[f"x{j}.m{i}.example.org"] = [{"A": f"198.51.{i}.{j}"}]
    data["x9.m9.example.org"] = [{"A": IP}]
    for prefetch in (False, True):
        resolver = ZoneResolver(data)
        got = await mailfrom(resolver, prefetch=prefetch)
        assert got.result == "pass", got.problem
        assert got.rounds <= 22 < MAX_ROUNDS  # 22 without prefetch: 1 + 10 x (MX, exchanges) + 1
        assert got.dns_queries == len(resolver.calls) == 112
        assert resolver.max_active <= spf_module.MAX_IN_FLIGHT
        assert len(set(resolver.calls)) == len(resolver.calls)  # nothing asked twice


async def test_misses_swallowed_by_pyspf_are_fetched() -> None:
    # pyspf fetches exp= inside a bare `except:`; the miss must still cause a restart
    resolver = zone(example_org=[{"TXT": "v=spf1 exp=why.example.org -all"}],
                    why_example_org=[{"TXT": "go away"}])
    got = await mailfrom(resolver, prefetch=False)
    assert (got.result, got.explanation) == ("fail", "go away")


async def test_one_round_fetches_its_misses_concurrently() -> None:
    # the MX answer starts all exchanges' lookups at once; pyspf then misses them one by
    # one, but the driver waits for the whole group: 3 runs in all
    resolver = zone(example_org=[{"TXT": "v=spf1 mx -all"}, {"MX": [10, "a.example.org"]},
                                 {"MX": [20, "b.example.org"]}, {"MX": [30, "c.example.org"]}],
                    a_example_org=[{"A": "198.51.100.1"}], b_example_org=[{"A": "198.51.100.2"}],
                    c_example_org=[{"A": IP}])
    resolver.delay = 0.01
    got = await mailfrom(resolver, prefetch=False)
    assert got.result == "pass"
    assert got.rounds == 4  # TXT, MX, the exchanges, done
    assert resolver.max_active == 3


async def test_prefetch_resolves_includes_in_parallel() -> None:
    record = "v=spf1 " + " ".join(f"include:i{i}.example.org" for i in range(4)) + " -all"
    data: dict[str, Any] = {"example.org": [{"TXT": record}]}
    for i in range(4):
        data[f"i{i}.example.org"] = [{"TXT": f"v=spf1 ip4:198.51.100.{i}"}]
    data["i3.example.org"] = [{"TXT": f"v=spf1 ip4:{IP}"}]
    timings = {}
    for prefetch in (False, True):
        resolver = ZoneResolver(data, delay=0.02)
        started = time.perf_counter()
        got = await mailfrom(resolver, prefetch=prefetch)
        timings[prefetch] = time.perf_counter() - started
        assert got.result == "pass"
        assert resolver.max_active == (4 if prefetch else 1)
    assert timings[True] < timings[False]


async def test_prefetch_is_limited_and_leftovers_are_cancelled() -> None:
    # a:fast matches; meanwhile the record's other targets were prefetched (up to the
    # limit, fast included) and are still running when the result is known
    record = "v=spf1 a:fast.example.org " + " ".join(
        f"a:h{i}.example.org" for i in range(12)) + " -all"
    resolver = ZoneResolver({"example.org": [{"TXT": record}],
                             "fast.example.org": [{"A": IP}]},
                            delays={f"h{i}.example.org": 10.0 for i in range(12)})
    got = await mailfrom(resolver)
    assert got.result == "pass"
    assert got.dns_queries == len(resolver.calls) == 1 + spf_module.PREFETCH_LIMIT
    assert resolver.cancelled == spf_module.PREFETCH_LIMIT - 1 and resolver.active == 0


async def test_cancelling_the_check_cancels_its_lookups() -> None:
    resolver = ZoneResolver({"example.org": [{"TXT": "v=spf1 -all"}]}, delay=10.0)
    task = asyncio.create_task(mailfrom(resolver))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert resolver.cancelled == 1 and resolver.active == 0


# -- concurrency -------------------------------------------------------------------------


async def test_parallel_evaluations_keep_their_own_answers() -> None:
    # same names, different answers, interleaved lookups: no store may leak into another
    def make(ip_allowed: str, delay: float) -> ZoneResolver:
        return ZoneResolver({
            "example.org": [{"TXT": "v=spf1 include:inc.example.org a:h.example.org -all"}],
            "inc.example.org": [{"TXT": f"v=spf1 ip4:{ip_allowed}"}],
            "h.example.org": [{"A": "198.51.100.99"}],
        }, delay=delay)

    results = await asyncio.gather(*(
        mailfrom(make(IP if n % 2 else "198.51.100.7", 0.001 * (n % 3)), prefetch=bool(n % 4))
        for n in range(20)))
    assert [r.result for r in results] == ["fail", "pass"] * 10


async def test_evaluations_do_not_block_the_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    tick_task = asyncio.create_task(ticker())
    try:
        resolver = include_chain(5)
        resolver.delay = 0.01
        got = await mailfrom(resolver, prefetch=False)
    finally:
        tick_task.cancel()
    assert got.result == "pass"
    assert ticks >= 20  # the loop kept turning during six sequential 10 ms lookups


def test_pyspf_outside_the_driver_never_does_dns() -> None:
    assert spf.check2(i=IP, s="alice@example.org", h="mx.example.net")[0] == "temperror"


async def test_a_replaced_hook_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spf, "DNSLookup", spf.DNSLookup_dnspython)
    with pytest.raises(RuntimeError, match="blocking DNS"):
        await mailfrom(zone(example_org=[{"TXT": "v=spf1 -all"}]))


# -- identities --------------------------------------------------------------------------

HELO_ZONE = {"mx.example.net": [{"TXT": f"v=spf1 ip4:{IP} -all"}],
             "example.org": [{"TXT": "v=spf1 -all"}]}


async def test_helo_identity() -> None:
    got = await check_helo(ZoneResolver(HELO_ZONE), ip=IP, helo="MX.Example.NET.",
                           receiver="mx.mailedge.test")
    assert (got.result, got.identity, got.domain, got.sender) == (
        "pass", "helo", "mx.example.net", "postmaster@mx.example.net")
    assert got.auth_results_kwargs() == {"method": "spf", "result": "pass",
                                         "property": "smtp.helo", "value": "MX.Example.NET."}
    got = await check_helo(ZoneResolver(HELO_ZONE), ip="198.51.100.1", helo="mx.example.net",
                           receiver="")
    assert got.result == "fail"


@pytest.mark.parametrize("helo", ["[192.0.2.10]", "192.0.2.10", "localhost", "", "a..b.test"])
async def test_helo_that_is_not_a_fqdn_is_none_without_dns(helo: str) -> None:
    resolver = ZoneResolver(HELO_ZONE)
    got = await check_helo(resolver, ip=IP, helo=helo, receiver="")
    assert (got.result, got.identity, got.rounds) == ("none", "helo", 0)
    assert resolver.calls == []


async def test_null_sender_checks_postmaster_at_helo() -> None:
    resolver = ZoneResolver(HELO_ZONE)
    got = await mailfrom(resolver, sender="", helo="mx.example.net")
    assert (got.result, got.identity, got.domain, got.sender) == (
        "pass", "mailfrom", "mx.example.net", "postmaster@mx.example.net")
    assert got.resinfo() == "spf=pass smtp.mailfrom=postmaster@mx.example.net"
    got = await mailfrom(ZoneResolver(HELO_ZONE), sender="", helo="[192.0.2.10]")
    assert (got.result, got.identity) == ("none", "mailfrom")


async def test_sender_forms() -> None:
    resolver = ZoneResolver({"example.org": [{"TXT": "v=spf1 exists:%{l}.l.example.org -all"}],
                             "postmaster.l.example.org": [{"A": "127.0.0.2"}],
                             "xn--bcher-kva.example": [{"TXT": f"v=spf1 ip4:{IP} -all"}]})
    got = await mailfrom(resolver, sender="@example.org")  # RFC 7208 §4.3: postmaster
    assert (got.result, got.sender) == ("pass", "postmaster@example.org")
    got = await mailfrom(resolver, sender='"a@b"@Example.ORG')  # split at the last "@"
    assert (got.domain, got.result) == ("example.org", "fail")
    got = await mailfrom(resolver, sender="j\u00f6rg@b\u00fccher.example")  # A-label lookups
    assert (got.result, got.domain) == ("pass", "xn--bcher-kva.example")
    got = await mailfrom(resolver, sender="x@" + "a" * 64 + ".example")
    assert (got.result, got.rounds) == ("none", 0)


def test_resinfo_quotes_what_needs_quoting() -> None:
    result = SpfResult(result="fail", domain="example.org", identity="mailfrom",
                       sender='"a b"@example.org', client_ip=IP, helo="h.example")
    assert result.resinfo() == 'spf=fail smtp.mailfrom="\\"a b\\"@example.org"'


async def test_invalid_client_ip_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        await mailfrom(ZoneResolver({}), ip="not-an-ip")


async def test_ipv4_mapped_client_is_checked_as_ipv4() -> None:
    resolver = zone(example_org=[{"TXT": "v=spf1 a:h.example.org -all"}],
                    h_example_org=[{"A": IP}, {"AAAA": "2001:db8::1"}])
    got = await mailfrom(resolver, ip=f"::ffff:{IP}")
    assert got.result == "pass"
    assert ("h.example.org", "AAAA") not in resolver.calls


# -- CPU ---------------------------------------------------------------------------------


async def test_cpu_per_evaluation() -> None:
    resolver = ZoneResolver({
        "example.org": [{"TXT": "v=spf1 ip4:198.51.100.0/24 include:_spf.example.org mx ~all"}],
        "_spf.example.org": [{"TXT": "v=spf1 include:_n.example.org -all"}],
        "_n.example.org": [{"TXT": f"v=spf1 ip4:203.0.113.0/24 ip4:{IP}/32"}],
    })
    await mailfrom(resolver)  # warm up
    started = time.process_time()
    for _ in range(200):
        got = await mailfrom(resolver)
    per_check = (time.process_time() - started) / 200
    assert got.result == "pass"
    assert per_check < 0.005, f"{per_check * 1000:.2f} ms CPU per evaluation"
