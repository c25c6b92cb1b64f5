"""DMARC evaluator (filters/dmarc.py): record syntax, discovery, alignment, disposition,
From-domain extraction. DNS is a dict-backed fake implementing the Resolver Protocol."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filters.dmarc import (
    Alignment,
    DkimIdentity,
    DmarcRecord,
    DmarcStatus,
    FromError,
    FromProblem,
    LookupStatus,
    Policy,
    PolicyLookup,
    PslOrgDomain,
    RecordError,
    ReportUri,
    SpfIdentity,
    aligned,
    check_dmarc_record,
    default_org_domain,
    discover_policy,
    evaluate,
    from_domain,
    is_dmarc_record,
    normalize_domain,
    parse_dmarc_record,
)
from filters.dns import DnsNameError, DnsResult, DnsTemporaryError, Resolver

# --------------------------------------------------------------------------- fake DNS

Zone = Mapping[str, Sequence[str] | Exception]


class FakeResolver:
    """TXT answers from a dict: a name maps to its records (empty: NODATA) or an error.

    Names not in the dict are NXDOMAIN, unless a name below them is present (an empty
    non-terminal: NODATA), as a real server answers.
    """

    def __init__(self, zone: Zone) -> None:
        self.zone = {k.lower(): v for k, v in zone.items()}
        self.queries: list[str] = []

    async def query(self, name: str, rdtype: str) -> DnsResult:
        assert rdtype == "TXT"
        self.queries.append(name)
        if len(name) > 253:
            raise DnsNameError(f"name too long: {len(name)}")
        answer = self.zone.get(name.lower())
        if isinstance(answer, Exception):
            raise answer
        if answer is not None:
            return DnsResult(name, rdtype, tuple(answer), ttl=300)
        below = any(k.endswith("." + name.lower()) for k in self.zone)
        return DnsResult(name, rdtype, (), ttl=300, nxdomain=not below)


def test_fake_resolver_fits_the_protocol() -> None:
    resolver: Resolver = FakeResolver({})
    assert resolver is not None


# --------------------------------------------------------------------------- record syntax

VALID_RECORDS: list[tuple[str, dict[str, Any]]] = [
    ("v=DMARC1; p=none", {"p": Policy.NONE, "sp": None, "pct": 100}),
    ("v=DMARC1;p=reject", {"p": Policy.REJECT}),
    ("v=DMARC1; p=quarantine;", {"p": Policy.QUARANTINE}),
    ("V = DMARC1 ; P = Reject", {"p": Policy.REJECT}),
    ("  v=DMARC1; p=none  ", {"p": Policy.NONE}),
    ("v=DMARC1;\tp=none;\tsp=reject", {"p": Policy.NONE, "sp": Policy.REJECT}),
    ("v=DMARC1; p=reject; sp=none", {"sp": Policy.NONE}),
    ("v=DMARC1; p=reject; pct=0", {"pct": 0}),
    ("v=DMARC1; p=reject; pct=100", {"pct": 100}),
    ("v=DMARC1; p=reject; pct=007", {"pct": 7}),
    ("v=DMARC1; p=none; adkim=s; aspf=S", {"adkim": Alignment.STRICT,
                                           "aspf": Alignment.STRICT}),
    ("v=DMARC1; p=none; adkim=r", {"adkim": Alignment.RELAXED, "aspf": Alignment.RELAXED}),
    ("v=DMARC1; p=none; fo=1", {"fo": ("1",)}),
    ("v=DMARC1; p=none; fo=0 : 1:D:s", {"fo": ("0", "1", "d", "s")}),
    ("v=DMARC1; p=none; rf=afrf:iodef", {"rf": ("afrf", "iodef")}),
    ("v=DMARC1; p=none; ri=3600", {"ri": 3600}),
    ("v=DMARC1; p=none; ri=4294967295", {"ri": 4294967295}),
    ("v=DMARC1; p=none; rua=mailto:d@example.com",
     {"rua": (ReportUri("mailto:d@example.com"),)}),
    ("v=DMARC1; p=none; rua=mailto:a@example.com!10m, mailto:b@example.net!500",
     {"rua": (ReportUri("mailto:a@example.com", 10 << 20),
              ReportUri("mailto:b@example.net", 500))}),
    ("v=DMARC1; p=none; ruf=mailto:f@example.com!1k,https://r.example/x%2Cy",
     {"ruf": (ReportUri("mailto:f@example.com", 1024), ReportUri("https://r.example/x%2Cy"))}),
    ("v=DMARC1; p=none; t=y; np=reject; psd=n; foo=bar",
     {"unknown_tags": ("t", "np", "psd", "foo"), "warnings": ()}),
    ("v=DMARC1; p=none;; ;", {"p": Policy.NONE, "warnings": ()}),
    # §6.6.3: no valid p, but a valid rua: act as p=none.
    ("v=DMARC1; rua=mailto:d@example.com", {"p": Policy.NONE, "p_fallback": True}),
    ("v=DMARC1; p=bogus; rua=mailto:d@example.com", {"p": Policy.NONE, "p_fallback": True}),
    ("v=DMARC1; p=reject; sp=bogus; rua=mailto:d@example.com",
     {"p": Policy.NONE, "sp": None, "p_fallback": True}),
    ("v=DMARC1; sp=reject; rua=mailto:d@example.com",
     {"p": Policy.NONE, "sp": None, "p_fallback": True}),
]


@pytest.mark.parametrize(("text", "expected"), VALID_RECORDS)
def test_valid_records(text: str, expected: dict[str, Any]) -> None:
    record = parse_dmarc_record(text)
    assert record is not None, check_dmarc_record(text)
    for name, value in expected.items():
        assert getattr(record, name) == value, name
    assert is_dmarc_record(text)


INVALID_RECORDS: list[tuple[str, str]] = [
    ("", "not a DMARC record"),
    ("p=reject; v=DMARC1", "not a DMARC record"),  # v must be first (§6.3)
    ("v=DMARC2; p=reject", "not a DMARC record"),
    ("v=dmarc1; p=reject", "not a DMARC record"),  # the value is case-sensitive
    ("v=DMARC1 p=reject", "not a DMARC record"),  # no separator after the version
    ("v=DMARC10; p=reject", "not a DMARC record"),
    ("v=spf1 -all", "not a DMARC record"),
    ("xv=DMARC1; p=reject", "not a DMARC record"),
    ("v=DMARC1", "p= is missing"),
    ("v=DMARC1;", "p= is missing"),
    ("v=DMARC1; sp=reject", "p= is missing"),
    ("v=DMARC1; p=", "invalid value"),
    ("v=DMARC1; p=rejectx", "invalid value"),
    ("v=DMARC1; p=reject; sp=everything", "sp= has an invalid value"),
    ("v=DMARC1; p=reject; p=none", "more than once"),
    ("v=DMARC1; p=reject; sp=none; sp=reject", "more than once"),
    ("v=DMARC1; p=bogus; rua=not a uri", "no valid rua"),
    ("v=DMARC1; rua=mailto", "no valid rua"),
]


@pytest.mark.parametrize(("text", "reason"), INVALID_RECORDS)
def test_invalid_records(text: str, reason: str) -> None:
    assert parse_dmarc_record(text) is None
    error = check_dmarc_record(text)
    assert isinstance(error, RecordError)
    assert reason in error.reason


DEFAULTED: list[tuple[str, str, Any]] = [
    ("v=DMARC1; p=reject; pct=101", "pct", 100),
    ("v=DMARC1; p=reject; pct=-1", "pct", 100),
    ("v=DMARC1; p=reject; pct=50.5", "pct", 100),
    ("v=DMARC1; p=reject; pct=", "pct", 100),
    ("v=DMARC1; p=reject; pct=1000", "pct", 100),
    ("v=DMARC1; p=reject; adkim=x", "adkim", Alignment.RELAXED),
    ("v=DMARC1; p=reject; aspf=strict", "aspf", Alignment.RELAXED),
    ("v=DMARC1; p=reject; fo=2", "fo", ("0",)),
    ("v=DMARC1; p=reject; fo=1:", "fo", ("0",)),
    ("v=DMARC1; p=reject; rf=a b", "rf", ("afrf",)),
    ("v=DMARC1; p=reject; ri=4294967296", "ri", 86400),
    ("v=DMARC1; p=reject; ri=1h", "ri", 86400),
    ("v=DMARC1; p=reject; rua=mailto:a@x.example!x", "rua", ()),
    ("v=DMARC1; p=reject; rua=mailto:a@x.example, bad", "rua",
     (ReportUri("mailto:a@x.example"),)),
    ("v=DMARC1; p=reject; ruf=", "ruf", ()),
    ("v=DMARC1; p=reject; pct=10; pct=20", "pct", 100),
    ("v=DMARC1; p=reject; garbage", "p", Policy.REJECT),
]


@pytest.mark.parametrize(("text", "name", "value"), DEFAULTED)
def test_invalid_optional_tags_fall_back_to_defaults(text: str, name: str, value: Any) -> None:
    """§6.3: syntax errors outside v/p are discarded in favour of defaults, and noted."""
    record = parse_dmarc_record(text)
    assert record is not None
    assert getattr(record, name) == value
    assert record.p is Policy.REJECT
    assert record.warnings


def test_p_out_of_order_is_accepted_with_a_warning() -> None:
    record = parse_dmarc_record("v=DMARC1; rua=mailto:d@example.com; p=reject")
    assert record is not None and record.p is Policy.REJECT and not record.p_fallback
    assert any("not the tag after v=" in w for w in record.warnings)


def test_subdomain_policy_defaults_to_p() -> None:
    record = parse_dmarc_record("v=DMARC1; p=quarantine")
    assert record is not None and record.subdomain_policy is Policy.QUARANTINE
    record = parse_dmarc_record("v=DMARC1; p=quarantine; sp=none")
    assert record is not None and record.subdomain_policy is Policy.NONE


@given(st.text(max_size=200))
def test_parser_never_raises(text: str) -> None:
    result = check_dmarc_record(text)
    assert isinstance(result, DmarcRecord | RecordError)
    assert isinstance(check_dmarc_record("v=DMARC1; " + text), DmarcRecord | RecordError)


# --------------------------------------------------------------------------- discovery

REJECT = "v=DMARC1; p=reject"
SUB = "v=DMARC1; p=reject; sp=none"

DISCOVERY: list[tuple[str, str, Zone, LookupStatus, str | None, bool, list[str]]] = [
    # (case, from domain, zone, status, policy domain, found at org domain, queries)
    ("at from domain", "example.com", {"_dmarc.example.com": [REJECT]},
     LookupStatus.FOUND, "example.com", False, ["_dmarc.example.com"]),
    ("at from subdomain", "mail.example.com",
     {"_dmarc.mail.example.com": ["v=DMARC1; p=none"], "_dmarc.example.com": [REJECT]},
     LookupStatus.FOUND, "mail.example.com", False, ["_dmarc.mail.example.com"]),
    ("at org domain", "a.b.example.com", {"_dmarc.example.com": [SUB]},
     LookupStatus.FOUND, "example.com", True,
     ["_dmarc.a.b.example.com", "_dmarc.example.com"]),
    ("org under co.uk", "mail.shop.co.uk", {"_dmarc.shop.co.uk": [REJECT]},
     LookupStatus.FOUND, "shop.co.uk", True, ["_dmarc.mail.shop.co.uk", "_dmarc.shop.co.uk"]),
    ("org under github.io", "a.alice.github.io", {"_dmarc.alice.github.io": [REJECT]},
     LookupStatus.FOUND, "alice.github.io", True,
     ["_dmarc.a.alice.github.io", "_dmarc.alice.github.io"]),
    ("never the suffix's record", "alice.github.io", {"_dmarc.github.io": [REJECT]},
     LookupStatus.NONE, None, False, ["_dmarc.alice.github.io"]),
    ("public suffix From: no fallback", "co.uk", {"_dmarc.uk": [REJECT]},
     LookupStatus.NONE, None, False, ["_dmarc.co.uk"]),
    ("none anywhere", "mail.example.com", {},
     LookupStatus.NONE, None, False, ["_dmarc.mail.example.com", "_dmarc.example.com"]),
    ("nodata at from, none at org", "mail.example.com", {"_dmarc.mail.example.com": []},
     LookupStatus.NONE, None, False, ["_dmarc.mail.example.com", "_dmarc.example.com"]),
    ("non-DMARC TXT discarded, fallback", "mail.example.com",
     {"_dmarc.mail.example.com": ["v=spf1 -all", "hello"], "_dmarc.example.com": [REJECT]},
     LookupStatus.FOUND, "example.com", True,
     ["_dmarc.mail.example.com", "_dmarc.example.com"]),
    ("non-DMARC TXT beside one record", "example.com",
     {"_dmarc.example.com": ["google-site-verification=x", REJECT]},
     LookupStatus.FOUND, "example.com", False, ["_dmarc.example.com"]),
    ("multiple records at from: none, no fallback", "mail.example.com",
     {"_dmarc.mail.example.com": [REJECT, "v=DMARC1; p=none"],
      "_dmarc.example.com": [REJECT]},
     LookupStatus.NONE, "mail.example.com", False, ["_dmarc.mail.example.com"]),
    ("multiple records at org: none", "mail.example.com",
     {"_dmarc.example.com": [REJECT, REJECT]},
     LookupStatus.NONE, "example.com", True,
     ["_dmarc.mail.example.com", "_dmarc.example.com"]),
    ("temperror at from: no fallback", "mail.example.com",
     {"_dmarc.mail.example.com": DnsTemporaryError("SERVFAIL"),
      "_dmarc.example.com": [REJECT]},
     LookupStatus.TEMPERROR, "mail.example.com", False, ["_dmarc.mail.example.com"]),
    ("temperror at org", "mail.example.com",
     {"_dmarc.example.com": DnsTemporaryError("timeout")},
     LookupStatus.TEMPERROR, "example.com", False,
     ["_dmarc.mail.example.com", "_dmarc.example.com"]),
    ("invalid record at from: permerror, no fallback", "mail.example.com",
     {"_dmarc.mail.example.com": ["v=DMARC1; p=always"], "_dmarc.example.com": [REJECT]},
     LookupStatus.PERMERROR, "mail.example.com", False, ["_dmarc.mail.example.com"]),
    ("invalid p with rua: p=none", "example.com",
     {"_dmarc.example.com": ["v=DMARC1; p=always; rua=mailto:d@example.com"]},
     LookupStatus.FOUND, "example.com", False, ["_dmarc.example.com"]),
    ("uppercase, trailing dot", "Mail.EXAMPLE.com.", {"_dmarc.example.com": [REJECT]},
     LookupStatus.FOUND, "example.com", True,
     ["_dmarc.mail.example.com", "_dmarc.example.com"]),
    ("U-label From domain", "bücher.example", {"_dmarc.xn--bcher-kva.example": [REJECT]},
     LookupStatus.FOUND, "xn--bcher-kva.example", False, ["_dmarc.xn--bcher-kva.example"]),
    ("invalid From domain", "exa mple.com", {}, LookupStatus.PERMERROR, None, False, []),
    ("empty From domain", "", {}, LookupStatus.PERMERROR, None, False, []),
]


@pytest.mark.parametrize(
    ("from_dom", "zone", "status", "where", "at_org", "queries"),
    [case[1:] for case in DISCOVERY],
    ids=[case[0] for case in DISCOVERY],
)
async def test_discovery(from_dom: str, zone: Zone, status: LookupStatus, where: str | None,
                         at_org: bool, queries: list[str]) -> None:
    resolver = FakeResolver(zone)
    lookup = await discover_policy(from_dom, resolver)
    assert lookup.status is status, lookup.reason
    assert lookup.policy_domain == where
    assert lookup.found_at_org_domain is at_org
    assert resolver.queries == queries
    assert (lookup.record is not None) is (status is LookupStatus.FOUND)
    assert lookup.reason


async def test_discovery_records_nxdomain_of_the_from_domain() -> None:
    lookup = await discover_policy("gone.example.com", FakeResolver({}))
    assert lookup.from_nxdomain
    lookup = await discover_policy("mail.example.com",
                                   FakeResolver({"_dmarc.mail.example.com": []}))
    assert not lookup.from_nxdomain


async def test_discovery_name_too_long_at_from_domain_falls_back() -> None:
    long_from = ".".join(["a" * 59] * 4) + ".example.com"  # 251 octets, _dmarc. too long
    assert len(long_from) <= 253
    lookup = await discover_policy(long_from, FakeResolver({"_dmarc.example.com": [REJECT]}))
    assert lookup.status is LookupStatus.FOUND and lookup.found_at_org_domain


async def test_discovery_name_error_at_org_domain_is_permerror() -> None:
    resolver = FakeResolver({"_dmarc.example.com": DnsNameError("bad")})
    lookup = await discover_policy("mail.example.com", resolver)
    assert lookup.status is LookupStatus.PERMERROR


class MapOrg:
    """A plugged-in Organizational Domain finder (what a DMARCbis tree walk would hand in)."""

    def __init__(self, orgs: Mapping[str, str | None]) -> None:
        self.orgs = orgs
        self.asked: list[str] = []

    def org_domain(self, domain: str) -> str | None:
        self.asked.append(domain)
        return self.orgs.get(domain, domain)


async def test_discovery_uses_a_plugged_in_org_domain() -> None:
    org = MapOrg({"a.b.example.com": "b.example.com"})
    resolver = FakeResolver({"_dmarc.b.example.com": [REJECT]})
    lookup = await discover_policy("a.b.example.com", resolver, org=org)
    assert lookup.status is LookupStatus.FOUND and lookup.policy_domain == "b.example.com"
    assert org.asked == ["a.b.example.com"]


# --------------------------------------------------------------------------- org domain


def test_default_org_domain_is_loaded_once() -> None:
    assert default_org_domain() is default_org_domain()


ORG_DOMAINS: list[tuple[str, str | None]] = [
    ("example.com", "example.com"),
    ("a.b.c.example.com", "example.com"),
    ("mail.example.co.uk", "example.co.uk"),
    ("co.uk", None),
    ("com", None),
    ("github.io", None),  # private section
    ("alice.github.io", "alice.github.io"),
    ("www.alice.github.io", "alice.github.io"),
    ("blogspot.com", None),
    ("x.y.blogspot.com", "y.blogspot.com"),
    ("a.b.ck", "a.b.ck"),  # *.ck
    ("www.ck", "www.ck"),  # !www.ck
    ("mail.unknown-tld-zz", "mail.unknown-tld-zz"),  # the implicit "*" rule
    ("xn--bcher-kva.de", "xn--bcher-kva.de"),
]


@pytest.mark.parametrize(("domain", "org"), ORG_DOMAINS)
def test_psl_org_domain(domain: str, org: str | None) -> None:
    assert default_org_domain().org_domain(domain) == org


def test_icann_only_view_is_available() -> None:
    assert PslOrgDomain(only_icann=True).org_domain("alice.github.io") == "github.io"


# --------------------------------------------------------------------------- alignment

R, S = Alignment.RELAXED, Alignment.STRICT
ALIGNMENT: list[tuple[str, str, Alignment, bool]] = [
    # (authenticated domain, From domain, mode, aligned)
    ("example.com", "example.com", S, True),
    ("example.com", "example.com", R, True),
    ("EXAMPLE.com.", "example.COM", S, True),
    ("mail.example.com", "example.com", R, True),
    ("mail.example.com", "example.com", S, False),
    ("example.com", "news.example.com", R, True),
    ("example.com", "news.example.com", S, False),
    ("a.example.com", "b.example.com", R, True),
    ("a.example.com", "b.example.com", S, False),
    ("example.net", "example.com", R, False),
    ("example.com.evil.net", "example.com", R, False),
    ("badexample.com", "example.com", R, False),
    ("example.co.uk", "mail.example.co.uk", R, True),
    ("other.co.uk", "example.co.uk", R, False),
    ("co.uk", "example.co.uk", R, False),  # a public suffix aligns with nothing else
    ("example.co.uk", "co.uk", R, False),
    ("github.io", "x.github.io", R, False),  # pydmarc says aligned; RFC 7489 §3.2 not
    ("github.io", "x.github.io", S, False),
    ("x.github.io", "github.io", R, False),
    ("y.github.io", "x.github.io", R, False),
    ("mail.x.github.io", "x.github.io", R, True),
    ("blogspot.com", "me.blogspot.com", R, False),
    ("you.blogspot.com", "me.blogspot.com", R, False),
    ("com", "example.com", R, False),
    ("github.io", "github.io", R, True),  # identical names always align
    ("bücher.example", "xn--bcher-kva.example", S, True),
    ("mail.bücher.example", "xn--bcher-kva.example", R, True),
    ("", "example.com", R, False),
    ("exa mple.com", "example.com", R, False),
]


@pytest.mark.parametrize(("identity", "from_dom", "mode", "expected"), ALIGNMENT)
def test_alignment(identity: str, from_dom: str, mode: Alignment, expected: bool) -> None:
    assert aligned(identity, from_dom, mode) is expected


# --------------------------------------------------------------------------- evaluation


def lookup_for(text: str, *, where: str = "example.com", at_org: bool = False,
               from_dom: str = "example.com") -> PolicyLookup:
    record = parse_dmarc_record(text)
    assert record is not None
    return PolicyLookup(LookupStatus.FOUND, from_dom, "example.com", record, where, at_org)


PASS_SPF = SpfIdentity("pass", "example.com")
NO_DKIM: list[DkimIdentity] = []

EVALUATE: list[tuple[str, str, SpfIdentity | None, list[DkimIdentity], DmarcStatus, Any]] = [
    # (case, record, spf, dkim, result, aligned-DKIM domain)
    ("spf relaxed pass", REJECT, SpfIdentity("pass", "bounce.example.com"), [],
     DmarcStatus.PASS, None),
    ("spf strict subdomain fails", REJECT + "; aspf=s",
     SpfIdentity("pass", "bounce.example.com"), [], DmarcStatus.FAIL, None),
    ("spf strict exact passes", REJECT + "; aspf=s", PASS_SPF, [], DmarcStatus.PASS, None),
    ("spf softfail never counts", REJECT, SpfIdentity("softfail", "example.com"), [],
     DmarcStatus.FAIL, None),
    ("spf neutral never counts", REJECT, SpfIdentity("neutral", "example.com"), [],
     DmarcStatus.FAIL, None),
    ("spf result case-insensitive", REJECT, SpfIdentity("PASS", "example.com"), [],
     DmarcStatus.PASS, None),
    ("spf cross-org", REJECT, SpfIdentity("pass", "esp.example.net"), [],
     DmarcStatus.FAIL, None),
    ("no spf at all", REJECT, None, [], DmarcStatus.FAIL, None),
    ("dkim relaxed subdomain", REJECT, None, [DkimIdentity("pass", "s.example.com")],
     DmarcStatus.PASS, "s.example.com"),
    ("dkim strict subdomain fails", REJECT + "; adkim=s", None,
     [DkimIdentity("pass", "s.example.com")], DmarcStatus.FAIL, None),
    ("dkim strict exact", REJECT + "; adkim=s", None, [DkimIdentity("pass", "Example.COM")],
     DmarcStatus.PASS, "example.com"),
    ("dkim fail never counts", REJECT, None, [DkimIdentity("fail", "example.com")],
     DmarcStatus.FAIL, None),
    ("dkim permerror never counts", REJECT, None, [DkimIdentity("permerror", "example.com")],
     DmarcStatus.FAIL, None),
    ("dkim cross-org pass only", REJECT, None, [DkimIdentity("pass", "esp.net")],
     DmarcStatus.FAIL, None),
    ("one of several signatures", REJECT, None,
     [DkimIdentity("pass", "esp.net"), DkimIdentity("fail", "example.com"),
      DkimIdentity("pass", "mail.example.com")], DmarcStatus.PASS, "mail.example.com"),
    ("strict spf, relaxed dkim", REJECT + "; aspf=s",
     SpfIdentity("pass", "b.example.com"), [DkimIdentity("pass", "d.example.com")],
     DmarcStatus.PASS, "d.example.com"),
    ("dkim d= is a public suffix", REJECT, None, [DkimIdentity("pass", "com")],
     DmarcStatus.FAIL, None),
]


@pytest.mark.parametrize(
    ("text", "spf", "dkim", "result", "dkim_dom"),
    [case[1:] for case in EVALUATE],
    ids=[case[0] for case in EVALUATE],
)
def test_evaluate_alignment(text: str, spf: SpfIdentity | None, dkim: list[DkimIdentity],
                            result: DmarcStatus, dkim_dom: str | None) -> None:
    outcome = evaluate("example.com", lookup_for(text), spf, dkim)
    assert outcome.result is result, outcome.reason
    assert outcome.aligned_dkim_domain == dkim_dom
    assert outcome.policy is Policy.REJECT
    expected = Policy.REJECT if result is DmarcStatus.FAIL else Policy.NONE
    assert outcome.disposition is expected


PUBLIC_SUFFIX_CASES: list[tuple[str, str, str, DmarcStatus]] = [
    # (From domain, record location, authenticated domain, result)
    ("x.github.io", "x.github.io", "github.io", DmarcStatus.FAIL),
    ("x.github.io", "x.github.io", "y.github.io", DmarcStatus.FAIL),
    ("x.github.io", "x.github.io", "www.x.github.io", DmarcStatus.PASS),
    ("me.blogspot.com", "me.blogspot.com", "blogspot.com", DmarcStatus.FAIL),
    ("me.blogspot.com", "me.blogspot.com", "you.blogspot.com", DmarcStatus.FAIL),
    ("shop.co.uk", "shop.co.uk", "co.uk", DmarcStatus.FAIL),
    ("shop.co.uk", "shop.co.uk", "other.co.uk", DmarcStatus.FAIL),
    ("shop.co.uk", "shop.co.uk", "mail.shop.co.uk", DmarcStatus.PASS),
]


@pytest.mark.parametrize(("from_dom", "where", "auth_dom", "result"), PUBLIC_SUFFIX_CASES)
@pytest.mark.parametrize("mechanism", ["spf", "dkim"])
def test_no_alignment_credit_across_public_suffixes(
    from_dom: str, where: str, auth_dom: str, result: DmarcStatus, mechanism: str
) -> None:
    record = parse_dmarc_record(REJECT)
    assert record is not None
    lookup = PolicyLookup(LookupStatus.FOUND, from_dom, where, record, where)
    spf = SpfIdentity("pass", auth_dom) if mechanism == "spf" else None
    dkim = [DkimIdentity("pass", auth_dom)] if mechanism == "dkim" else []
    assert evaluate(from_dom, lookup, spf, dkim).result is result


SP_CASES: list[tuple[str, str, Zone, Policy]] = [
    # (case, From domain, zone, the policy that applies)
    ("org domain's own mail gets p", "example.com", {"_dmarc.example.com": [SUB]},
     Policy.REJECT),
    ("subdomain via fallback gets sp", "mail.example.com", {"_dmarc.example.com": [SUB]},
     Policy.NONE),
    ("deep subdomain gets sp", "a.b.example.com",
     {"_dmarc.example.com": ["v=DMARC1; p=none; sp=quarantine"]}, Policy.QUARANTINE),
    ("sp absent: subdomain gets p", "mail.example.com",
     {"_dmarc.example.com": ["v=DMARC1; p=quarantine"]}, Policy.QUARANTINE),
    ("subdomain's own record gets p", "mail.example.com",
     {"_dmarc.mail.example.com": [SUB], "_dmarc.example.com": ["v=DMARC1; p=none"]},
     Policy.REJECT),
    ("co.uk org: p", "shop.co.uk", {"_dmarc.shop.co.uk": [SUB]}, Policy.REJECT),
    ("co.uk subdomain: sp", "www.shop.co.uk", {"_dmarc.shop.co.uk": [SUB]}, Policy.NONE),
]


@pytest.mark.parametrize(("from_dom", "zone", "policy"), [c[1:] for c in SP_CASES],
                         ids=[c[0] for c in SP_CASES])
async def test_sp_applies_only_to_subdomains(from_dom: str, zone: Zone,
                                             policy: Policy) -> None:
    lookup = await discover_policy(from_dom, FakeResolver(zone))
    outcome = evaluate(from_dom, lookup, SpfIdentity("fail", from_dom), [])
    assert outcome.result is DmarcStatus.FAIL
    assert outcome.policy is policy
    assert outcome.disposition is policy
    assert outcome.policy_dmarc == policy.value


PCT: list[tuple[str, int, float | None, Policy, bool]] = [
    # (p, pct, roll, disposition, sampled)
    ("reject", 100, 0.999, Policy.REJECT, True),
    ("reject", 100, None, Policy.REJECT, True),
    ("reject", 50, 0.49, Policy.REJECT, True),
    ("reject", 50, 0.5, Policy.QUARANTINE, False),
    ("reject", 50, 0.99, Policy.QUARANTINE, False),
    ("quarantine", 50, 0.1, Policy.QUARANTINE, True),
    ("quarantine", 50, 0.7, Policy.NONE, False),
    ("reject", 0, 0.0, Policy.QUARANTINE, False),
    ("quarantine", 0, 0.0, Policy.NONE, False),
    ("reject", 1, 0.0, Policy.REJECT, True),
    ("reject", 1, 0.01, Policy.QUARANTINE, False),
    ("none", 10, 0.9, Policy.NONE, True),
]


@pytest.mark.parametrize(("p", "pct", "roll", "disposition", "sampled"), PCT)
def test_pct_sampling_downgrades_one_level(p: str, pct: int, roll: float | None,
                                           disposition: Policy, sampled: bool) -> None:
    lookup = lookup_for(f"v=DMARC1; p={p}; pct={pct}")
    outcome = evaluate("example.com", lookup, None, [], pct_roll=roll)
    assert outcome.result is DmarcStatus.FAIL
    assert outcome.policy is Policy(p)  # the published policy stays what it is
    assert outcome.disposition is disposition
    assert outcome.sampled is sampled


def test_pct_applies_to_sp_too() -> None:
    lookup = lookup_for("v=DMARC1; p=none; sp=reject; pct=20", at_org=True,
                        from_dom="mail.example.com")
    outcome = evaluate("mail.example.com", lookup, None, [], pct_roll=0.5)
    assert outcome.policy is Policy.REJECT and outcome.disposition is Policy.QUARANTINE
    assert outcome.subdomain_policy_applied


def test_pct_uses_random_when_no_roll_is_injected() -> None:
    lookup = lookup_for("v=DMARC1; p=reject; pct=50")
    seen = {evaluate("example.com", lookup, None, []).disposition for _ in range(200)}
    assert seen == {Policy.REJECT, Policy.QUARANTINE}


def test_pass_is_never_sampled() -> None:
    outcome = evaluate("example.com", lookup_for("v=DMARC1; p=reject; pct=0"), PASS_SPF, [],
                       pct_roll=0.9)
    assert outcome.result is DmarcStatus.PASS and outcome.disposition is Policy.NONE
    assert outcome.policy is Policy.REJECT


@pytest.mark.parametrize(("status", "result"), [
    (LookupStatus.NONE, DmarcStatus.NONE),
    (LookupStatus.TEMPERROR, DmarcStatus.TEMPERROR),
    (LookupStatus.PERMERROR, DmarcStatus.PERMERROR),
])
def test_no_policy_outcomes(status: LookupStatus, result: DmarcStatus) -> None:
    lookup = PolicyLookup(status, "example.com", "example.com", reason="because")
    outcome = evaluate("example.com", lookup, PASS_SPF, [])
    assert outcome.result is result
    assert outcome.disposition is Policy.NONE and outcome.policy is None
    assert outcome.spf_aligned  # alignment is still reported (relaxed defaults)
    assert outcome.reason == "because"


def test_invalid_from_domain_is_permerror() -> None:
    outcome = evaluate("not a domain", lookup_for(REJECT), PASS_SPF, [])
    assert outcome.result is DmarcStatus.PERMERROR


async def test_temperror_end_to_end() -> None:
    resolver = FakeResolver({"_dmarc.example.com": DnsTemporaryError("SERVFAIL")})
    lookup = await discover_policy("example.com", resolver)
    outcome = evaluate("example.com", lookup, PASS_SPF, [])
    assert outcome.result is DmarcStatus.TEMPERROR
    assert outcome.authentication_results() == "dmarc=temperror header.from=example.com"


async def test_permerror_end_to_end() -> None:
    resolver = FakeResolver({"_dmarc.example.com": ["v=DMARC1; p=maybe"]})
    lookup = await discover_policy("example.com", resolver)
    outcome = evaluate("example.com", lookup, None, [])
    assert outcome.result is DmarcStatus.PERMERROR and outcome.disposition is Policy.NONE
    assert "invalid DMARC record" in outcome.reason


def test_evaluate_with_a_plugged_in_org_domain() -> None:
    org = MapOrg({"mail.corp.test": "corp.test", "corp.test": "corp.test",
                  "bounce.corp.test": "corp.test"})
    lookup = lookup_for(REJECT, where="corp.test", from_dom="mail.corp.test")
    outcome = evaluate("mail.corp.test", lookup, SpfIdentity("pass", "bounce.corp.test"), [],
                       org=org)
    assert outcome.result is DmarcStatus.PASS and outcome.org_domain == "corp.test"


AUTHRES: list[tuple[str, SpfIdentity | None, float | None, str]] = [
    (REJECT, PASS_SPF, None,
     "dmarc=pass (p=reject sp=reject dis=none) header.from=example.com policy.dmarc=reject"),
    (REJECT + "; sp=none; pct=10", None, 0.5,
     "dmarc=fail (p=reject sp=none dis=quarantine) header.from=example.com"
     " policy.dmarc=reject"),
    ("v=DMARC1; p=none", None, None,
     "dmarc=fail (p=none sp=none dis=none) header.from=example.com policy.dmarc=none"),
]


@pytest.mark.parametrize(("text", "spf", "roll", "expected"), AUTHRES)
def test_authentication_results(text: str, spf: SpfIdentity | None, roll: float | None,
                                expected: str) -> None:
    outcome = evaluate("example.com", lookup_for(text), spf, [], pct_roll=roll)
    assert outcome.authentication_results() == expected


def test_evaluation_is_fast() -> None:
    """Tens of µs without DNS (generous bound: CI machines vary)."""
    lookup = lookup_for("v=DMARC1; p=reject; pct=50", at_org=True, from_dom="mail.example.com")
    spf = SpfIdentity("pass", "bounce.esp.example.net")
    dkim = [DkimIdentity("fail", "example.com"), DkimIdentity("pass", "esp.example.net")]
    evaluate("mail.example.com", lookup, spf, dkim, pct_roll=0.1)
    runs = 2000
    start = time.perf_counter()
    for _ in range(runs):
        evaluate("mail.example.com", lookup, spf, dkim, pct_roll=0.1)
    assert (time.perf_counter() - start) / runs < 500e-6


# --------------------------------------------------------------------------- properties

label = st.one_of(
    st.sampled_from(["example", "mail", "a", "co", "uk", "com", "github", "io", "blogspot",
                     "ck", "www", "xn--bcher-kva", "bücher", "EXAMPLE", "b-c", "_x"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8),
)
domains = st.lists(label, min_size=1, max_size=5).map(".".join)
any_domain = st.one_of(domains, st.text(max_size=80))
results = st.sampled_from(["pass", "fail", "none", "softfail", "neutral", "temperror",
                           "permerror", "policy", "PASS", ""])
modes = st.sampled_from(list(Alignment))


@st.composite
def lookups(draw: st.DrawFn) -> PolicyLookup:
    status = draw(st.sampled_from(list(LookupStatus)))
    record = None
    if status is LookupStatus.FOUND:
        text = draw(st.sampled_from([
            REJECT, SUB, "v=DMARC1; p=quarantine; pct=30; adkim=s", "v=DMARC1; p=none",
            "v=DMARC1; p=reject; sp=quarantine; pct=0; aspf=s; adkim=s",
        ]))
        record = parse_dmarc_record(text)
    return PolicyLookup(status, draw(any_domain), draw(st.none() | any_domain), record,
                        draw(st.none() | any_domain), draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(
    from_dom=any_domain,
    lookup=lookups(),
    spf=st.none() | st.builds(SpfIdentity, results, any_domain),
    dkim=st.lists(st.builds(DkimIdentity, results, any_domain), max_size=3),
    roll=st.none() | st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_evaluate_never_raises(from_dom: str, lookup: PolicyLookup, spf: SpfIdentity | None,
                               dkim: list[DkimIdentity], roll: float | None) -> None:
    outcome = evaluate(from_dom, lookup, spf, dkim, pct_roll=roll)
    assert isinstance(outcome.result, DmarcStatus)
    if outcome.result is not DmarcStatus.FAIL:
        assert outcome.disposition is Policy.NONE
    outcome.authentication_results()


@settings(max_examples=300, deadline=None)
@given(a=any_domain, b=any_domain)
def test_relaxed_alignment_is_symmetric(a: str, b: str) -> None:
    assert aligned(a, b, Alignment.RELAXED) == aligned(b, a, Alignment.RELAXED)


@settings(max_examples=300, deadline=None)
@given(a=any_domain, b=any_domain)
def test_strict_alignment_implies_relaxed(a: str, b: str) -> None:
    if aligned(a, b, Alignment.STRICT):
        assert aligned(a, b, Alignment.RELAXED)
        assert aligned(b, a, Alignment.STRICT)


@settings(max_examples=200, deadline=None)
@given(d=domains, mode=modes)
def test_a_domain_aligns_with_its_subdomains_iff_it_has_an_org_domain(
    d: str, mode: Alignment
) -> None:
    norm = normalize_domain(d)
    sub = "mail." + d
    if norm is None or normalize_domain(sub) is None:
        return
    expected = mode is Alignment.RELAXED and default_org_domain().org_domain(norm) is not None
    assert aligned(sub, d, mode) is expected


# --------------------------------------------------------------------------- From header

FROM_OK: list[tuple[bytes, str]] = [
    (b"From: user@example.com\r\n", "example.com"),
    (b"From: User@Example.COM\r\n\r\nbody From: x@evil.test\r\n", "example.com"),
    (b"Subject: hi\r\nFROM: a@example.com\r\nTo: b@example.net\r\n", "example.com"),
    (b"from:a@example.com\n", "example.com"),  # bare LF, no space
    (b"From : a@example.com\r\n", "example.com"),  # obs-syntax: WSP before the colon
    (b"From: John Doe <john@example.com>\r\n", "example.com"),
    (b'From: "Doe, John" <john@example.com>\r\n', "example.com"),
    (b'From: "John \\"JD\\" Doe, Jr." <john@example.com>\r\n', "example.com"),
    (b'From: "a@evil.test, b@evil.test" <john@example.com>\r\n', "example.com"),
    (b"From: john@example.com (Doe, John)\r\n", "example.com"),
    (b"From: (comment (nested, with \\) paren)) john@example.com\r\n", "example.com"),
    (b"From: john@example(comment).com\r\n", "example.com"),
    (b"From: John\r\n Doe\r\n\t<john@example.com>\r\n", "example.com"),  # folded
    (b"From:\r\n john@example.com\r\n", "example.com"),
    (b"From: =?UTF-8?B?Sm9obiwgRG9l?= <john@example.com>\r\n", "example.com"),
    (b"From: =?utf-8?q?a=40evil.test?= <john@example.com>\r\n", "example.com"),
    (b"From: =?utf-8?q?J._Doe?= <john@example.com>\r\n", "example.com"),
    (b"From: info@shop.example <info@example.com>\r\n", "example.com"),  # sloppy name
    (b'From: "a@b"@example.com\r\n', "example.com"),  # quoted local part with "@"
    (b"From: <@relay.test:john@example.com>\r\n", "example.com"),  # obs-route
    (b"From: J\xc3\xbcrgen <j@b\xc3\xbccher.example>\r\n", "xn--bcher-kva.example"),
    (b"From: j@EXAMPLE.com , \r\n", "example.com"),  # obs-mbox-list empty element
    (b"From: Team: j@example.com;\r\n", "example.com"),  # group (RFC 6854)
    (b"From: j@sub.example.co.uk\r\n", "sub.example.co.uk"),
]


@pytest.mark.parametrize(("headers", "domain"), FROM_OK)
def test_from_domain(headers: bytes, domain: str) -> None:
    assert from_domain(headers) == domain


FROM_BAD: list[tuple[bytes, FromProblem]] = [
    (b"From: a@example.com\r\nFrom: b@example.com\r\n", FromProblem.MULTIPLE_FIELDS),
    (b"From: a@example.com\r\nfrom : a@example.com\r\n", FromProblem.MULTIPLE_FIELDS),
    (b"From: a@example.com, b@example.net\r\n", FromProblem.MULTIPLE_ADDRESSES),
    (b"From: a@example.com,\r\n b@example.com\r\n", FromProblem.MULTIPLE_ADDRESSES),
    (b"From: Doe, John <john@example.com>\r\n", FromProblem.MULTIPLE_ADDRESSES),
    (b"From: Team: a@example.com, b@example.com;\r\n", FromProblem.MULTIPLE_ADDRESSES),
    (b"From: \r\n", FromProblem.NO_ADDRESS),
    (b"From: (only a comment)\r\n", FromProblem.NO_ADDRESS),
    (b"From: undisclosed-recipients:;\r\n", FromProblem.NO_ADDRESS),
    (b"From: john\r\n", FromProblem.NO_DOMAIN),
    (b"From: John Doe <john>\r\n", FromProblem.NO_DOMAIN),
    (b"From: john@[192.0.2.1]\r\n", FromProblem.NO_DOMAIN),
    (b"From: john@\r\n", FromProblem.NO_DOMAIN),
    (b"From: john@exa_mple..com\r\n", FromProblem.NO_DOMAIN),
    (b"From: john@=?utf-8?q?example.com?=\r\n", FromProblem.NO_DOMAIN),
    (b"From: j@example.com.\r\n", FromProblem.NO_DOMAIN),
    (b"From: j@\xff\xfe.example\r\n", FromProblem.NO_DOMAIN),  # not UTF-8
    (b"From: \"unterminated <john@example.com>\r\n", FromProblem.SYNTAX),
    (b"From: (unterminated john@example.com\r\n", FromProblem.SYNTAX),
    (b"From: john@example.com>\r\n", FromProblem.SYNTAX),
    (b"From: <john@example.com\r\n", FromProblem.SYNTAX),
    (b"From: a <b@example.com> <c@example.com>\r\n", FromProblem.SYNTAX),
    (b"From: a@b@example.com\r\n", FromProblem.SYNTAX),
    (b"From: Team: a@example.com\r\n", FromProblem.SYNTAX),
    (b"From: a\\b@example.com\r\n", FromProblem.SYNTAX),
]


@pytest.mark.parametrize(("headers", "problem"), FROM_BAD)
def test_from_domain_problems(headers: bytes, problem: FromProblem) -> None:
    outcome = from_domain(headers)
    assert isinstance(outcome, FromError), outcome
    assert outcome.problem is problem, outcome
    assert outcome.reason


def test_from_domain_reports_the_domains_of_a_multi_valued_from() -> None:
    outcome = from_domain(b"From: a@example.com, b@Example.com\r\n")
    assert isinstance(outcome, FromError) and outcome.domains == ("example.com",)
    outcome = from_domain(b"From: a@example.com\r\nFrom: b@example.net\r\n")
    assert isinstance(outcome, FromError) and outcome.domains == ("example.com", "example.net")


@pytest.mark.parametrize("headers", [
    b"", b"Subject: no from\r\n", b"Subject: x\r\n\r\nFrom: a@example.com\r\n",
    b"\r\nFrom: a@example.com\r\n",
    b"X-From: a@example.com\r\nFromage: b@example.com\r\n",
    b" From: a@example.com\r\n",  # a continuation line, not a field
])
def test_no_from_field_is_none(headers: bytes) -> None:
    assert from_domain(headers) is None


@given(st.binary(max_size=300))
def test_from_domain_never_raises(data: bytes) -> None:
    outcome = from_domain(b"From: " + data)
    assert outcome is None or isinstance(outcome, str | FromError)
    if isinstance(outcome, str):
        assert normalize_domain(outcome) == outcome
