"""The DNS-based connection checks over a scripted resolver: DNSBL/DNSWL scoring
(filters/dnsbl.py), forward-confirmed reverse DNS (filters/rdns.py) and the sender
domain check (filters/sender_domain.py)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from filters import dnsbl, rdns, sender_domain
from filters.base import Action, Outcome, Reply, Results, Stage, Verdict
from filters.dns import DnsNameError, DnsResult, DnsTemporaryError, Resolver
from filters.dnsbl import (
    DnsblCheck,
    DnsblSettings,
    DnsblSettingsError,
    DnsblZone,
    Listing,
    build_dnsbl_settings,
    client_address,
    lookup,
    reversed_ip,
)
from filters.rdns import RdnsCheck, RdnsResult, forward_confirmed
from filters.sender_domain import (
    SenderDomainCheck,
    SenderDomainResult,
    SenderDomainStatus,
    check_sender_domain,
)
from gateway.pipeline import FilterContext

# -- fakes ------------------------------------------------------------------------------------

NX = "NXDOMAIN"
TEMP = DnsTemporaryError("SERVFAIL")
HANG = "HANG"
Answer = Sequence[str] | str | Exception


class FakeResolver:
    """Answers from a dict keyed by (name, type): records (empty: NODATA), NX, HANG
    (never answers) or an exception. Anything else is NXDOMAIN."""

    def __init__(self, answers: Mapping[tuple[str, str], Answer] | None = None) -> None:
        self.answers = {(n.lower(), t): a for (n, t), a in (answers or {}).items()}
        self.queries: list[tuple[str, str]] = []

    async def query(self, name: str, rdtype: str) -> DnsResult:
        self.queries.append((name, rdtype))
        answer = self.answers.get((name.lower(), rdtype), NX)
        if isinstance(answer, Exception):
            raise answer
        if answer == HANG:
            await asyncio.sleep(3600)
        if answer == NX:
            return DnsResult(name, rdtype, (), ttl=60, nxdomain=True)
        return DnsResult(name, rdtype, tuple(answer), ttl=60)


def test_fake_resolver_fits_the_protocol() -> None:
    resolver: Resolver = FakeResolver()
    assert resolver is not None


@dataclass(frozen=True)
class FakeSession:
    client_ip: str = "192.0.2.1"
    session_id: str = "S1"
    client_port: int = 40000
    helo: str | None = "client.example"
    tls: bool = False


@dataclass(frozen=True)
class FakeRecipient:
    address: str
    lookup_key: str
    tenant: str = "acme"


@dataclass(frozen=True)
class FakeEnvelope:
    sender: str = ""
    recipients: Sequence[FakeRecipient] = ()
    current_recipient: FakeRecipient | None = None
    size: int = 0


@dataclass(frozen=True)
class FakeTenant:
    id: str = "acme"
    policy: dict[str, Any] = field(default_factory=dict)


def context(stage: Stage, resolver: FakeResolver, *, ip: str = "192.0.2.1",
            sender: str = "", policy: dict[str, Any] | None = None,
            recipient: str = "alice@example.test", dnsbl_settings: DnsblSettings | None = None,
            results: Results | None = None) -> tuple[FilterContext, Results]:
    results = results if results is not None else Results()
    current = FakeRecipient(recipient, recipient.lower()) if stage is Stage.RCPT else None
    tenant = FakeTenant(policy=policy or {}) if stage is Stage.RCPT else None
    services = SimpleNamespace(dns=resolver, hostname="mx.test.example",
                               settings=SimpleNamespace(dnsbl=dnsbl_settings, access=None))
    ctx = FilterContext(stage, FakeSession(client_ip=ip),
                        FakeEnvelope(sender=sender, current_recipient=current), tenant, None,
                        services, results)
    ctx.current_filter = "test"
    return ctx, results


def outcomes(results: Results) -> list[Outcome]:
    return [entry.outcome for entry in results.entries]


# -- DNSBL: query names -----------------------------------------------------------------------

@pytest.mark.parametrize(("ip", "prefix"), [
    ("192.0.2.1", "1.2.0.192"),
    ("127.0.0.2", "2.0.0.127"),
    ("10.20.30.40", "40.30.20.10"),
    # RFC 5782 §2.4's example.
    ("2001:db8:1:2:3:4:567:89ab",
     "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"),
    ("2001:DB8::1", "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"),
    ("::ffff:192.0.2.1", "1.2.0.192"),  # IPv4-mapped: the IPv4 address it is
])
def test_reversed_ip(ip: str, prefix: str) -> None:
    address = client_address(ip)
    assert address is not None
    assert reversed_ip(address) == prefix


@pytest.mark.parametrize("ip", ["", "unix:/run/x", "192.0.2.256", "mx.example"])
def test_client_address_rejects_non_addresses(ip: str) -> None:
    assert client_address(ip) is None


async def test_ipv6_client_is_looked_up_by_nibbles() -> None:
    resolver = FakeResolver()
    settings = DnsblSettings((DnsblZone("zen.example"),))
    await lookup(resolver, "2001:db8::1", settings)
    assert resolver.queries == [(
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.zen.example", "A")]


# -- DNSBL: return codes ----------------------------------------------------------------------

CODES_CASES: list[tuple[str, frozenset[str] | None, Answer, tuple[str, ...], bool]] = [
    # (case, zone codes, answer, matched codes, error recorded)
    ("any code", None, ["127.0.0.2"], ("127.0.0.2",), False),
    ("any code, several", None, ["127.0.0.2", "127.0.0.4"], ("127.0.0.2", "127.0.0.4"), False),
    ("listed code", frozenset({"127.0.0.2", "127.0.0.3"}), ["127.0.0.3"], ("127.0.0.3",),
     False),
    ("other code", frozenset({"127.0.0.2"}), ["127.0.0.4"], (), False),
    ("one of two", frozenset({"127.0.0.2"}), ["127.0.0.4", "127.0.0.2"], ("127.0.0.2",),
     False),
    ("network", frozenset({"127.0.0.8/30"}), ["127.0.0.10"], ("127.0.0.10",), False),
    ("outside network", frozenset({"127.0.0.8/30"}), ["127.0.0.12"], (), False),
    ("error code: over limit", None, ["127.255.255.255"], (), True),
    ("error code: public resolver", None, ["127.255.255.254"], (), True),
    ("error code beside a listing", None, ["127.255.255.254", "127.0.0.2"], ("127.0.0.2",),
     False),
    ("outside 127/8", None, ["192.0.2.99"], (), True),
    ("garbage", None, ["not-an-address"], (), True),
    ("NXDOMAIN", None, NX, (), False),
    ("NODATA", None, [], (), False),
    ("temperror", None, TEMP, (), True),
    ("malformed name", None, DnsNameError("label too long"), (), True),
]


@pytest.mark.parametrize(("case", "codes", "answer", "matched", "error"), CODES_CASES,
                         ids=[c[0] for c in CODES_CASES])
async def test_return_codes(case: str, codes: frozenset[str] | None, answer: Answer,
                            matched: tuple[str, ...], error: bool) -> None:
    resolver = FakeResolver({("1.2.0.192.bl.example", "A"): answer})
    settings = DnsblSettings((DnsblZone("bl.example", 1.0, codes),), threshold=1)
    result = await lookup(resolver, "192.0.2.1", settings)
    assert [listing.codes for listing in result.listings] == ([matched] if matched else [])
    assert bool(result.errors) is error
    assert result.blocked is bool(matched)


async def test_error_codes_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dnsbl, "_last_logged", {})
    resolver = FakeResolver({("1.2.0.192.bl.example", "A"): ["127.255.255.254"],
                             ("2.2.0.192.bl.example", "A"): ["127.255.255.254"]})
    settings = DnsblSettings((DnsblZone("bl.example"),))
    await lookup(resolver, "192.0.2.1", settings)
    await lookup(resolver, "192.0.2.2", settings)
    warnings = [r for r in caplog.records if r.name == "filters.dnsbl"]
    assert len(warnings) == 1 and "127.255.255.254" in warnings[0].getMessage()


# -- DNSBL: weights and threshold -------------------------------------------------------------

ZEN = "zen.example"
WL = "wl.example"
BL2 = "bl2.example"

WEIGHT_CASES: list[tuple[str, tuple[DnsblZone, ...], float, dict[str, list[str]], float,
                         bool, bool, str | None]] = [
    # (case, zones, threshold, answers by zone, score, blocked, allowlisted, blocked_by)
    ("one listing blocks", (DnsblZone(ZEN, 5),), 5, {ZEN: ["127.0.0.2"]}, 5, True, False,
     ZEN),
    ("below threshold", (DnsblZone(ZEN, 2), DnsblZone(BL2, 2)), 5,
     {ZEN: ["127.0.0.2"], BL2: ["127.0.0.2"]}, 4, False, False, ZEN),
    ("weights add up", (DnsblZone(ZEN, 3), DnsblZone(BL2, 2)), 5,
     {ZEN: ["127.0.0.2"], BL2: ["127.0.0.2"]}, 5, True, False, ZEN),
    ("highest weight is named", (DnsblZone(ZEN, 2), DnsblZone(BL2, 4)), 5,
     {ZEN: ["127.0.0.2"], BL2: ["127.0.0.2"]}, 6, True, False, BL2),
    ("DNSWL offsets", (DnsblZone(ZEN, 5), DnsblZone(WL, 3, kind="allow")), 5,
     {ZEN: ["127.0.0.2"], WL: ["127.0.15.0"]}, 2, False, True, ZEN),
    ("DNSWL alone", (DnsblZone(ZEN, 5), DnsblZone(WL, 3, kind="allow")), 5,
     {WL: ["127.0.15.0"]}, -3, False, True, None),
    ("same zone, per-code weights",
     (DnsblZone(ZEN, 5, frozenset({"127.0.0.2", "127.0.0.3"})),
      DnsblZone(ZEN, 1, frozenset({"127.0.0.10", "127.0.0.11"}))), 5,
     {ZEN: ["127.0.0.10"]}, 1, False, False, ZEN),
    ("same zone, both entries", (DnsblZone(ZEN, 5, frozenset({"127.0.0.2"})),
                                 DnsblZone(ZEN, 1, frozenset({"127.0.0.10"}))), 5,
     {ZEN: ["127.0.0.2", "127.0.0.10"]}, 6, True, False, ZEN),
    ("weight zero only records", (DnsblZone(ZEN, 0),), 1, {ZEN: ["127.0.0.2"]}, 0, False,
     False, ZEN),
]


@pytest.mark.parametrize(
    ("case", "zones", "threshold", "answers", "score", "blocked", "allow", "by"),
    WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
async def test_weights_and_threshold(case: str, zones: tuple[DnsblZone, ...], threshold: float,
                                     answers: dict[str, list[str]], score: float,
                                     blocked: bool, allow: bool, by: str | None) -> None:
    resolver = FakeResolver({(f"1.2.0.192.{zone}", "A"): codes
                             for zone, codes in answers.items()})
    result = await lookup(resolver, "192.0.2.1", DnsblSettings(zones, threshold))
    assert (result.score, result.blocked, result.allowlisted, result.blocked_by) == (
        score, blocked, allow, by)
    # One query per distinct zone name, however many entries name it.
    assert len(resolver.queries) == len({zone.name for zone in zones})


async def test_zones_are_asked_concurrently() -> None:
    in_flight: set[str] = set()
    all_started = asyncio.Event()

    class Barrier(FakeResolver):
        async def query(self, name: str, rdtype: str) -> DnsResult:
            in_flight.add(name)
            if len(in_flight) == 3:
                all_started.set()
            await all_started.wait()  # a sequential caller would never get here
            return await super().query(name, rdtype)

    settings = DnsblSettings(tuple(DnsblZone(f"z{i}.example") for i in range(3)))
    async with asyncio.timeout(1):
        result = await lookup(Barrier(), "192.0.2.1", settings)
    assert result.asked == 3 and not result.listings


async def test_a_slow_zone_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dnsbl, "ZONE_TIMEOUT", 0.05)
    resolver = FakeResolver({("1.2.0.192.slow.example", "A"): HANG,
                             ("1.2.0.192.zen.example", "A"): ["127.0.0.2"]})
    settings = DnsblSettings((DnsblZone("slow.example", 5), DnsblZone("zen.example", 5)), 5)
    result = await lookup(resolver, "192.0.2.1", settings)
    assert result.blocked and result.blocked_by == "zen.example"
    assert result.errors == ("slow.example: no answer within 0.05s",)


# -- DNSBL: the filter ------------------------------------------------------------------------

async def test_filter_rejects_with_the_zone_and_records_the_fact() -> None:
    resolver = FakeResolver({("1.2.0.192.zen.example", "A"): ["127.0.0.2"]})
    settings = DnsblSettings((DnsblZone("zen.example", 5),), 5)
    ctx, results = context(Stage.CONNECT, resolver, dnsbl_settings=settings)
    verdict = await DnsblCheck().check(ctx)
    assert verdict.action is Action.REJECT
    assert verdict.reply == Reply(554, "5.7.1", "Client host [192.0.2.1] blocked using "
                                  "zen.example")
    assert outcomes(results) == [Outcome.FAIL]
    fact = ctx.fact("dnsbl")
    assert fact.listings == (Listing("zen.example", "block", 5.0, ("127.0.0.2",)),)
    assert fact.score == 5.0 and not fact.allowlisted


async def test_filter_reply_shows_the_ipv4_of_a_mapped_client() -> None:
    resolver = FakeResolver({("1.2.0.192.zen.example", "A"): ["127.0.0.2"]})
    ctx, _ = context(Stage.CONNECT, resolver, ip="::ffff:192.0.2.1",
                     dnsbl_settings=DnsblSettings((DnsblZone("zen.example"),)))
    verdict = await DnsblCheck().check(ctx)
    assert verdict.reply is not None and "[192.0.2.1]" in verdict.reply.text


@pytest.mark.parametrize(("answers", "outcome"), [
    ({}, Outcome.PASS),  # not listed
    ({("1.2.0.192.a.example", "A"): TEMP}, Outcome.PASS),  # one zone failed, one answered
    ({("1.2.0.192.a.example", "A"): TEMP, ("1.2.0.192.b.example", "A"): TEMP},
     Outcome.ERROR),  # nothing known: fail open, recorded as an error
])
async def test_filter_fails_open(answers: dict[tuple[str, str], Answer],
                                 outcome: Outcome) -> None:
    settings = DnsblSettings((DnsblZone("a.example"), DnsblZone("b.example")))
    ctx, results = context(Stage.CONNECT, FakeResolver(answers), dnsbl_settings=settings)
    assert (await DnsblCheck().check(ctx)).action is Action.CONTINUE
    assert outcomes(results) == [outcome]


async def test_filter_without_zones_skips() -> None:
    resolver = FakeResolver()
    for settings in (None, DnsblSettings()):
        ctx, results = context(Stage.CONNECT, resolver, dnsbl_settings=settings)
        assert (await DnsblCheck().check(ctx)).action is Action.CONTINUE
        assert outcomes(results) == [Outcome.SKIP]
    assert resolver.queries == []


def test_filter_declaration() -> None:
    assert DnsblCheck.name == "dnsbl" and DnsblCheck.stages == frozenset({Stage.CONNECT})
    assert DnsblCheck.on_error is Action.CONTINUE
    assert DnsblCheck.timeout > dnsbl.ZONE_TIMEOUT


# -- DNSBL: settings --------------------------------------------------------------------------

def test_build_settings_normalises() -> None:
    settings = build_dnsbl_settings(
        [{"name": "Zen.Example.", "weight": 5, "codes": ["127.0.0.2", " 127.0.0.8/30"]},
         {"name": "wl.example", "kind": "allow", "weight": 2.5}], threshold=5)
    zen, wl = settings.zones
    assert (zen.name, zen.weight, zen.codes, zen.kind) == (
        "zen.example", 5.0, frozenset({"127.0.0.2", "127.0.0.8/30"}), "block")
    assert (wl.name, wl.codes, wl.kind) == ("wl.example", None, "allow")
    assert settings.threshold == 5.0
    assert build_dnsbl_settings() == DnsblSettings((), 1.0)


def test_build_settings_reports_every_problem() -> None:
    with pytest.raises(DnsblSettingsError) as caught:
        build_dnsbl_settings([
            {"name": "zen.example", "codes": ["127.0.0.300", "10.0.0.2", "127.255.255.254",
                                              "127.0.0.1/24"]},
            {"name": "bad zone!", "weight": -1, "kind": "maybe", "colour": "red"},
            {"weight": 1},
            "zen.example",
            {"name": "x.example", "codes": "127.0.0.2"},
            {"name": "y.example", "codes": []},
        ], threshold=0)
    assert isinstance(caught.value, ValueError)
    assert caught.value.problems == (
        "zones[0].codes: '127.0.0.300' is not an IPv4 address or network",
        "zones[0].codes: '10.0.0.2' is outside 127.0.0.0/8 (RFC 5782 §2.1)",
        "zones[0].codes: '127.255.255.254' overlaps the lists' error codes 127.255.255.0/24",
        "zones[0].codes: '127.0.0.1/24' is not an IPv4 address or network",
        "zones[1].colour: unknown key",
        "zones[1].name: 'bad zone!' is not a DNS zone name (letters, digits, '-', '_'; "
        "at most 189 octets)",
        "zones[1].weight: must be a number >= 0, not -1",
        "zones[1].kind: must be 'block' or 'allow', not 'maybe'",
        "zones[2].name: missing",
        "zones[3]: must be a table like {name = \"zen.example\"}",
        "zones[4].codes: must be a list of return codes",
        "zones[5].codes: empty (leave it out to count any return code)",
        "threshold: must be a number > 0, not 0",
    )


@pytest.mark.parametrize("threshold", [0, -1, float("nan"), float("inf"), True, "5"])
def test_threshold_must_be_positive(threshold: Any) -> None:
    with pytest.raises(DnsblSettingsError):
        DnsblSettings((), threshold)


# -- FCrDNS -----------------------------------------------------------------------------------

PTR4 = "1.2.0.192.in-addr.arpa"

RDNS_CASES: list[tuple[str, str, dict[tuple[str, str], Answer], str | None, bool]] = [
    # (case, client, answers, confirmed name, temperror)
    ("confirmed", "192.0.2.1", {(PTR4, "PTR"): ["mail.example"],
                                ("mail.example", "A"): ["192.0.2.9", "192.0.2.1"]},
     "mail.example", False),
    ("second name confirms", "192.0.2.1",
     {(PTR4, "PTR"): ["a.example", "b.example"], ("a.example", "A"): ["192.0.2.7"],
      ("b.example", "A"): ["192.0.2.1"]}, "b.example", False),
    ("first confirmed wins", "192.0.2.1",
     {(PTR4, "PTR"): ["a.example", "b.example"], ("a.example", "A"): ["192.0.2.1"],
      ("b.example", "A"): ["192.0.2.1"]}, "a.example", False),
    ("no PTR", "192.0.2.1", {}, None, False),
    ("PTR NODATA", "192.0.2.1", {(PTR4, "PTR"): []}, None, False),
    ("PTR temperror", "192.0.2.1", {(PTR4, "PTR"): TEMP}, None, True),
    ("forward mismatch", "192.0.2.1",
     {(PTR4, "PTR"): ["mail.example"], ("mail.example", "A"): ["192.0.2.2"]}, None, False),
    ("forward NXDOMAIN", "192.0.2.1", {(PTR4, "PTR"): ["gone.example"]}, None, False),
    ("forward temperror", "192.0.2.1",
     {(PTR4, "PTR"): ["a.example", "b.example"], ("a.example", "A"): TEMP,
      ("b.example", "A"): ["192.0.2.2"]}, None, True),
    ("temperror, but another confirms", "192.0.2.1",
     {(PTR4, "PTR"): ["a.example", "b.example"], ("a.example", "A"): TEMP,
      ("b.example", "A"): ["192.0.2.1"]}, "b.example", False),
    ("unqueryable name", "192.0.2.1",
     {(PTR4, "PTR"): ["bad..name"], ("bad..name", "A"): DnsNameError("empty label")},
     None, False),
    ("IPv6 uses AAAA", "2001:db8::25",
     {(ipaddress.ip_address("2001:db8::25").reverse_pointer, "PTR"): ["mx6.example"],
      ("mx6.example", "AAAA"): ["2001:db8::25"], ("mx6.example", "A"): ["192.0.2.1"]},
     "mx6.example", False),
    ("IPv6 not in A", "2001:db8::25",
     {(ipaddress.ip_address("2001:db8::25").reverse_pointer, "PTR"): ["mx6.example"],
      ("mx6.example", "A"): ["192.0.2.1"]}, None, False),
    ("IPv4-mapped client", "::ffff:192.0.2.1",
     {(PTR4, "PTR"): ["mail.example"], ("mail.example", "A"): ["192.0.2.1"]},
     "mail.example", False),
]


@pytest.mark.parametrize(("case", "ip", "answers", "name", "temperror"), RDNS_CASES,
                         ids=[c[0] for c in RDNS_CASES])
async def test_forward_confirmed(case: str, ip: str, answers: dict[tuple[str, str], Answer],
                                 name: str | None, temperror: bool) -> None:
    result = await forward_confirmed(FakeResolver(answers), ip)
    assert (result.name, result.confirmed, result.temperror) == (
        name, name is not None, temperror)


async def test_forward_confirmed_checks_at_most_ten_names() -> None:
    names = [f"n{i}.example" for i in range(15)]
    resolver = FakeResolver({(PTR4, "PTR"): names, ("n12.example", "A"): ["192.0.2.1"]})
    result = await forward_confirmed(resolver, "192.0.2.1")
    assert not result.confirmed and result.ptr == tuple(names[:10])
    assert {n for n, t in resolver.queries if t == "A"} == set(names[:10])


async def test_rdns_records_at_connect_and_never_refuses() -> None:
    ctx, results = context(Stage.CONNECT, FakeResolver({(PTR4, "PTR"): TEMP}))
    assert (await RdnsCheck().check(ctx)).action is Action.CONTINUE
    fact: RdnsResult = ctx.fact("rdns")
    assert fact.temperror and fact.name is None
    assert outcomes(results) == [Outcome.ERROR]


Answers = dict[tuple[str, str], Answer]
CONFIRMED: Answers = {(PTR4, "PTR"): ["mail.example"], ("mail.example", "A"): ["192.0.2.1"]}
UNCONFIRMED: Answers = {(PTR4, "PTR"): ["mail.example"], ("mail.example", "A"): ["192.0.2.2"]}

REQUIRE_CASES: list[tuple[str, dict[str, Any], str, dict[tuple[str, str], Answer],
                          Verdict | Action]] = [
    ("not required", {}, "alice@example.test", UNCONFIRMED, Action.CONTINUE),
    ("required, confirmed", {"require_fcrdns": True}, "alice@example.test", CONFIRMED,
     Action.CONTINUE),
    ("required, unconfirmed", {"require_fcrdns": True}, "alice@example.test", UNCONFIRMED,
     Verdict(Action.TEMPFAIL, Reply(450, "4.7.25", "Client host rejected: reverse DNS not "
                                    "confirmed for [192.0.2.1]"))),
    ("required, DNS trouble", {"require_fcrdns": True}, "alice@example.test",
     {(PTR4, "PTR"): TEMP}, Verdict(Action.TEMPFAIL, rdns.RDNS_DNS_ERROR)),
    ("postmaster stays reachable", {"require_fcrdns": True}, "Postmaster@example.test",
     UNCONFIRMED, Action.CONTINUE),
]


@pytest.mark.parametrize(("case", "policy", "recipient", "answers", "expected"),
                         REQUIRE_CASES, ids=[c[0] for c in REQUIRE_CASES])
async def test_require_fcrdns_at_rcpt(case: str, policy: dict[str, Any], recipient: str,
                                      answers: dict[tuple[str, str], Answer],
                                      expected: Verdict | Action) -> None:
    resolver = FakeResolver(answers)
    ctx, _ = context(Stage.RCPT, resolver, policy=policy, recipient=recipient)
    verdict = await RdnsCheck().check(ctx)
    if isinstance(expected, Action):
        assert verdict.action is expected
    else:
        assert (verdict.action, verdict.reply) == (expected.action, expected.reply)
    if not policy:
        assert resolver.queries == []  # nothing to decide: nothing asked


# -- sender domain ----------------------------------------------------------------------------

D = "sender.example"
S = SenderDomainStatus

SENDER_CASES: list[tuple[str, dict[tuple[str, str], Answer], SenderDomainStatus]] = [
    ("MX", {(D, "MX"): ["10 mx.sender.example"]}, S.OK),
    ("NXDOMAIN", {}, S.NXDOMAIN),
    ("null MX", {(D, "MX"): ["0 ."]}, S.NULL_MX),
    ("null MX beside a real one", {(D, "MX"): ["0 .", "10 mx.sender.example"]}, S.OK),
    ("A only", {(D, "MX"): [], (D, "A"): ["192.0.2.1"], (D, "AAAA"): []}, S.OK),
    ("AAAA only", {(D, "MX"): [], (D, "A"): [], (D, "AAAA"): ["2001:db8::1"]}, S.OK),
    ("no MX, A or AAAA", {(D, "MX"): [], (D, "A"): [], (D, "AAAA"): []}, S.NO_MAIL_HOST),
    ("MX temperror", {(D, "MX"): TEMP}, S.TEMPERROR),
    ("A temperror, AAAA answers", {(D, "MX"): [], (D, "A"): TEMP,
                                   (D, "AAAA"): ["2001:db8::1"]}, S.OK),
    ("A temperror, no AAAA", {(D, "MX"): [], (D, "A"): TEMP, (D, "AAAA"): []}, S.TEMPERROR),
    ("unqueryable", {(D, "MX"): DnsNameError("label too long")}, S.INVALID),
]


@pytest.mark.parametrize(("case", "answers", "status"), SENDER_CASES,
                         ids=[c[0] for c in SENDER_CASES])
async def test_check_sender_domain(case: str, answers: dict[tuple[str, str], Answer],
                                   status: SenderDomainStatus) -> None:
    result = await check_sender_domain(FakeResolver(answers), D)
    assert result.status is status


async def test_check_sender_domain_timeout_is_a_temperror(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sender_domain, "LOOKUP_TIMEOUT", 0.05)
    result = await check_sender_domain(FakeResolver({(D, "MX"): HANG}), D)
    assert result.status is S.TEMPERROR


@pytest.mark.parametrize(("sender", "domain"), [
    ("", None),
    ("user@[192.0.2.1]", None),
    ("user@[IPv6:2001:db8::1]", None),
    ("postmaster", None),
    ("A.User@Sender.EXAMPLE", "sender.example"),
    ('"odd@local"@sender.example.', "sender.example"),
])
def test_sender_domain_of_an_address(sender: str, domain: str | None) -> None:
    assert sender_domain.sender_domain(sender) == domain


VERDICT_CASES: list[tuple[str, dict[tuple[str, str], Answer], Action, Reply | None]] = [
    ("exists", {(D, "MX"): ["10 mx.sender.example"]}, Action.CONTINUE, None),
    ("NXDOMAIN", {}, Action.REJECT,
     Reply(550, "5.1.8", "Sender address rejected: domain not found")),
    ("null MX", {(D, "MX"): ["0 ."]}, Action.REJECT,
     Reply(550, "5.7.27", "Sender domain does not accept mail")),
    ("no mail host", {(D, "MX"): [], (D, "A"): [], (D, "AAAA"): []}, Action.REJECT,
     Reply(550, "5.1.8", "Sender address rejected: domain has no mail server")),
    ("temperror", {(D, "MX"): TEMP}, Action.TEMPFAIL,
     Reply(451, "4.4.3", "Sender domain lookup failed, try again later")),
    ("invalid", {(D, "MX"): DnsNameError("bad")}, Action.REJECT,
     Reply(550, "5.1.7", "Sender address rejected: invalid domain")),
]


@pytest.mark.parametrize(("case", "answers", "action", "reply"), VERDICT_CASES,
                         ids=[c[0] for c in VERDICT_CASES])
async def test_sender_domain_filter_at_mail(case: str, answers: dict[tuple[str, str], Answer],
                                            action: Action, reply: Reply | None) -> None:
    ctx, results = context(Stage.MAIL, FakeResolver(answers), sender=f"bounce@{D}")
    verdict = await SenderDomainCheck().check(ctx)
    assert (verdict.action, verdict.reply) == (action, reply)
    assert isinstance(ctx.fact("sender_domain"), SenderDomainResult)
    assert len(results.entries) == 1


async def test_null_sender_is_not_checked() -> None:
    resolver = FakeResolver()
    ctx, results = context(Stage.MAIL, resolver, sender="")
    assert (await SenderDomainCheck().check(ctx)).action is Action.CONTINUE
    assert outcomes(results) == [Outcome.SKIP] and resolver.queries == []


@pytest.mark.parametrize(("policy", "recipient", "action"), [
    ({}, "alice@example.test", Action.REJECT),  # default: enforced
    ({"reject_unknown_sender_domain": True}, "alice@example.test", Action.REJECT),
    ({"reject_unknown_sender_domain": False}, "alice@example.test", Action.CONTINUE),
    ({}, "abuse@example.test", Action.CONTINUE),
    ({}, "postmaster+x@example.test", Action.CONTINUE),
])
async def test_sender_domain_filter_at_rcpt_follows_the_tenant(
        policy: dict[str, Any], recipient: str, action: Action) -> None:
    ctx, _ = context(Stage.RCPT, FakeResolver(), sender=f"x@{D}", policy=policy,
                     recipient=recipient)
    assert (await SenderDomainCheck().check(ctx)).action is action


async def test_sender_domain_is_looked_up_once_per_transaction() -> None:
    resolver = FakeResolver()
    results = Results()
    for stage in (Stage.MAIL, Stage.RCPT, Stage.RCPT):
        ctx, _ = context(stage, resolver, sender=f"x@{D}", results=results)
        assert (await SenderDomainCheck().check(ctx)).action is Action.REJECT
    assert resolver.queries == [(D, "MX")]
