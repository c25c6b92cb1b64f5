"""Allow/deny lists (filters/access_lists.py): entry syntax, matching, precedence,
the `allowlisted` function the gateway asks before applying held denials, the filter."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from filters.access_lists import (
    ACCESS_DENIED,
    AccessLists,
    AccessMatch,
    AccessSettings,
    AccessSettingsError,
    allowlisted,
    build_access_settings,
    evaluate,
    is_allowlisted,
    recipient_always_reachable,
)
from filters.base import Action, Outcome, Results, Stage
from gateway.pipeline import FilterContext

# -- fakes ------------------------------------------------------------------------------------


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


def context(stage: Stage, settings: AccessSettings | None, *, ip: str = "192.0.2.1",
            sender: str = "", policy: dict[str, Any] | None = None,
            recipient: str = "alice@example.test", lookup_key: str | None = None
            ) -> tuple[FilterContext, Results]:
    results = Results()
    current = (FakeRecipient(recipient, lookup_key or recipient.lower())
               if stage is Stage.RCPT else None)
    tenant = FakeTenant(policy=policy or {}) if stage is Stage.RCPT else None
    services = SimpleNamespace(settings=SimpleNamespace(access=settings, dnsbl=None))
    ctx = FilterContext(stage, FakeSession(client_ip=ip),
                        FakeEnvelope(sender=sender, current_recipient=current), tenant, None,
                        services, results)
    ctx.current_filter = "access_lists"
    return ctx, results


def decision(match: AccessMatch | None) -> str | None:
    return None if match is None else f"{match.action} {match.entry}"


# -- client addresses -------------------------------------------------------------------------

IP_CASES: list[tuple[str, tuple[str, ...], tuple[str, ...], str, str | None]] = [
    # (case, allow_ips, deny_ips, client, decision)
    ("address", ("192.0.2.1",), (), "192.0.2.1", "allow 192.0.2.1"),
    ("other address", ("192.0.2.1",), (), "192.0.2.2", None),
    ("network", (), ("192.0.2.0/24",), "192.0.2.200", "deny 192.0.2.0/24"),
    ("outside the network", (), ("192.0.2.0/24",), "192.0.3.1", None),
    ("allow carved out of a denied network", ("192.0.2.5",), ("192.0.2.0/24",), "192.0.2.5",
     "allow 192.0.2.5"),
    ("the rest of the network is denied", ("192.0.2.5",), ("192.0.2.0/24",), "192.0.2.6",
     "deny 192.0.2.0/24"),
    ("deny carved out of an allowed network", ("10.0.0.0/8",), ("10.9.0.0/16",),
     "10.9.1.1", "deny 10.9.0.0/16"),
    ("everything", ("0.0.0.0/0",), (), "203.0.113.9", "allow 0.0.0.0/0"),
    ("IPv6 network", ("2001:db8::/32",), (), "2001:DB8:0:1::25", "allow 2001:db8::/32"),
    ("IPv6 longest prefix", ("2001:db8::/32",), ("2001:db8:bad::/48",), "2001:db8:bad::1",
     "deny 2001:db8:bad::/48"),
    ("families do not mix", ("::/0",), (), "192.0.2.1", None),
    ("IPv4-mapped client", (), ("192.0.2.0/24",), "::ffff:192.0.2.1", "deny 192.0.2.0/24"),
    ("not an address", ("0.0.0.0/0",), (), "unix-socket", None),
]


@pytest.mark.parametrize(("case", "allow", "deny", "ip", "expected"), IP_CASES,
                         ids=[c[0] for c in IP_CASES])
def test_ip_lists(case: str, allow: tuple[str, ...], deny: tuple[str, ...], ip: str,
                  expected: str | None) -> None:
    settings = build_access_settings(allow_ips=allow, deny_ips=deny)
    assert decision(evaluate(ip, None, None, settings)) == expected


# -- senders ----------------------------------------------------------------------------------

SENDER_CASES: list[tuple[str, tuple[str, ...], tuple[str, ...], str, str | None]] = [
    # (case, allow_senders, deny_senders, sender, decision)
    ("address", ("boss@example.com",), (), "boss@example.com", "allow boss@example.com"),
    ("address, other case", ("Boss@Example.COM",), (), "bOSS@example.com.",
     "allow Boss@Example.COM"),
    ("address matches its subaddresses", (), ("spam@example.com",),
     "spam+list@example.com", "deny spam@example.com"),
    ("a subaddress entry is exact", (), ("spam+list@example.com",), "spam@example.com", None),
    ("a subaddress entry matches itself", (), ("spam+list@example.com",),
     "Spam+list@example.com", "deny spam+list@example.com"),
    ("other address", ("boss@example.com",), (), "clerk@example.com", None),
    ("domain", (), ("spam.test",), "x@SPAM.test", "deny spam.test"),
    ("@domain", (), ("@spam.test",), "x@SPAM.test", "deny @spam.test"),
    ("@domain does not match subdomains", (), ("@spam.test",), "x@a.spam.test", None),
    ("domain does not match subdomains", (), ("spam.test",), "x@mail.spam.test", None),
    ("dot matches subdomains", (), (".spam.test",), "x@a.b.spam.test", "deny .spam.test"),
    ("dot does not match the domain", (), (".spam.test",), "x@spam.test", None),
    ("dot is label-aligned", (), (".spam.test",), "x@notspam.test", None),
    ("longer suffix wins", (".example.com",), (".bad.example.com",), "x@a.bad.example.com",
     "deny .bad.example.com"),
    ("shorter suffix elsewhere", (".example.com",), (".bad.example.com",),
     "x@ok.example.com", "allow .example.com"),
    ("address beats domain", ("friend@spam.test",), ("spam.test",), "friend@spam.test",
     "allow friend@spam.test"),
    ("domain beats subdomain pattern", ("mail.spam.test",), (".spam.test",),
     "x@mail.spam.test", "allow mail.spam.test"),
    ("IDN entry, A-label sender", ("bücher.example",), (), "x@xn--bcher-kva.example",
     "allow bücher.example"),
    ("A-label entry, IDN sender", ("xn--bcher-kva.example",), (), "x@Bücher.example",
     "allow xn--bcher-kva.example"),
    ("unicode local part, case-folded", ("STRAßE@example.com",), (), "strasse@example.com",
     "allow STRAßE@example.com"),
    ("quoted local part", ("john.doe@example.com",), (), '"john.doe"@example.com',
     "allow john.doe@example.com"),
    ("null sender matches nothing", ("example.com",), (), "", None),
    ("address literal matches no domain", ("192.0.2.1",), (), "x@[192.0.2.1]", None),
]


@pytest.mark.parametrize(("case", "allow", "deny", "sender", "expected"), SENDER_CASES,
                         ids=[c[0] for c in SENDER_CASES])
def test_sender_lists(case: str, allow: tuple[str, ...], deny: tuple[str, ...], sender: str,
                      expected: str | None) -> None:
    if case == "address literal matches no domain":
        settings = build_access_settings(allow_ips=allow)
    else:
        settings = build_access_settings(allow_senders=allow, deny_senders=deny)
    assert decision(evaluate(None, sender, None, settings)) == expected


# -- precedence across lists and scopes -------------------------------------------------------

GLOBAL = build_access_settings(allow_ips=["192.0.2.0/24"], deny_ips=["198.51.100.0/24"],
                               allow_senders=["partner.example"],
                               deny_senders=["spammer@partner.example", ".spam.test"])

ALLOWLISTED_CASES: list[tuple[str, str, str, dict[str, Any] | None, bool]] = [
    # (case, client, sender, tenant policy, allowlisted)
    ("allowed client", "192.0.2.1", "", None, True),
    ("allowed sender", "203.0.113.1", "x@partner.example", None, True),
    ("nothing listed", "203.0.113.1", "x@other.example", None, False),
    ("allowed client, denied sender", "192.0.2.1", "spammer@partner.example", None, False),
    ("allowed sender, denied client", "198.51.100.7", "x@partner.example", None, False),
    ("tenant allows the client", "203.0.113.1", "", {"allow_ips": ["203.0.113.0/24"]}, True),
    ("tenant allows the sender", "203.0.113.1", "ceo@Friend.example",
     {"allow_senders": ["@friend.example"]}, True),
    ("tenant allow does not beat a global deny", "198.51.100.7", "",
     {"allow_ips": ["198.51.100.7"]}, False),
    ("tenant deny beats a global allow", "192.0.2.1", "", {"deny_ips": ["192.0.2.1"]}, False),
    ("tenant denies the sender", "192.0.2.1", "x@mailer.example",
     {"deny_senders": [".example"]}, False),
    ("tenant lists empty", "192.0.2.1", "", {"allow_ips": [], "deny_ips": None}, True),
    ("other tenant policy keys", "192.0.2.1", "", {"greylisting": True}, True),
]


@pytest.mark.parametrize(("case", "ip", "sender", "policy", "expected"), ALLOWLISTED_CASES,
                         ids=[c[0] for c in ALLOWLISTED_CASES])
def test_allowlisted(case: str, ip: str, sender: str, policy: dict[str, Any] | None,
                     expected: bool) -> None:
    assert allowlisted(ip, sender, policy, GLOBAL) is expected


def test_allowlisted_without_settings() -> None:
    assert not allowlisted("192.0.2.1", "x@example.com", None, None)
    assert allowlisted("192.0.2.1", "", {"allow_ips": ("192.0.2.1",)}, None)


def test_tenant_tie_is_a_denial() -> None:
    policy = {"allow_ips": ["192.0.2.1"], "deny_ips": ["192.0.2.1/32"]}
    assert decision(evaluate("192.0.2.1", None, policy, None)) == "deny 192.0.2.1/32"


def test_invalid_tenant_entries_are_ignored_and_logged(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    policy = {"allow_ips": ["192.0.2.300", "192.0.2.0/24"], "deny_senders": ["@.x.example"]}
    with caplog.at_level(logging.WARNING, logger="filters.access_lists"):
        assert allowlisted("192.0.2.9", "a@b.example", policy, None)
        assert allowlisted("192.0.2.9", "a@b.example", dict(policy), None)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # once per distinct list, not per call
    assert "'192.0.2.300' is not an IP address or network" in messages[0]
    assert "write subdomains as '.example.com'" in messages[1]
    # A policy value that is not a list at all is ignored too.
    assert not allowlisted("192.0.2.9", "", {"allow_ips": "192.0.2.9"}, None)


# -- settings ---------------------------------------------------------------------------------

def test_build_access_settings_reports_every_problem() -> None:
    with pytest.raises(AccessSettingsError) as caught:
        build_access_settings(
            allow_ips=["192.0.2.1", "192.0.2.300", "10.0.0.1/8", 7, "192.0.2.1/32"],
            deny_ips=["192.0.2.1"],
            allow_senders=["@.example.com", "user@", "bad domain", ".", "ok.example",
                           "@@example.com"],
            deny_senders=["ok.example"])
    assert isinstance(caught.value, ValueError)
    assert caught.value.problems == (
        "allow_ips[1]: '192.0.2.300' is not an IP address or network",
        "allow_ips[2]: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)",
        "allow_ips[3]: 7 is not a string",
        "allow_senders[0]: '@.example.com': write subdomains as '.example.com', without '@'",
        "allow_senders[1]: 'user@': '' is not a domain",
        "allow_senders[2]: 'bad domain' is not an address, a domain or a .domain",
        "allow_senders[3]: '.' is not an address, a domain or a .domain",
        "allow_senders[5]: '@@example.com': no local part",
        "deny_ips: '192.0.2.1' is in allow_ips too",
        "deny_senders: 'ok.example' is in allow_senders too",
    )


def test_build_access_settings_type_problems() -> None:
    with pytest.raises(AccessSettingsError) as caught:
        build_access_settings(allow_ips="192.0.2.1", deny_senders={"a": 1})
    assert caught.value.problems == ("allow_ips: must be a list of strings",
                                     "deny_senders: must be a list of strings")


def test_settings_validate_on_construction_too() -> None:
    with pytest.raises(AccessSettingsError):
        AccessSettings(deny_ips=("not-an-ip",))
    settings = build_access_settings(allow_ips=[" 192.0.2.1 "], deny_senders=["x.example"])
    assert settings == AccessSettings(allow_ips=("192.0.2.1",), deny_senders=("x.example",))


# -- postmaster -------------------------------------------------------------------------------

@pytest.mark.parametrize(("address", "lookup_key", "reachable"), [
    ("postmaster@example.test", "postmaster@example.test", True),
    ("PostMaster@Example.TEST", "postmaster@example.test", True),
    ("abuse+report@example.test", "abuse@example.test", True),
    ("Postmaster", "postmaster@", True),
    ("postmaster@example.test", "admin@example.test", True),  # an alias to a person
    ("webmaster@example.test", "admin@example.test", False),
    ("alice@example.test", "alice@example.test", False),
])
def test_recipient_always_reachable(address: str, lookup_key: str, reachable: bool) -> None:
    ctx, _ = context(Stage.RCPT, None, recipient=address, lookup_key=lookup_key)
    assert recipient_always_reachable(ctx) is reachable


def test_nobody_is_a_recipient_before_rcpt() -> None:
    ctx, _ = context(Stage.MAIL, None)
    assert not recipient_always_reachable(ctx)


# -- the filter -------------------------------------------------------------------------------

SETTINGS = build_access_settings(allow_ips=["192.0.2.0/24"], deny_ips=["198.51.100.0/24"],
                                 allow_senders=["partner.example"],
                                 deny_senders=[".spam.test"])


async def test_connect_deny_is_access_denied() -> None:
    ctx, results = context(Stage.CONNECT, SETTINGS, ip="198.51.100.1")
    verdict = await AccessLists().check(ctx)
    assert (verdict.action, verdict.reply) == (Action.REJECT, ACCESS_DENIED)
    assert str(verdict.reply) == "554 5.7.1 Access denied"
    assert [e.outcome for e in results.entries] == [Outcome.FAIL]


async def test_connect_allow_accepts_and_records_the_fact() -> None:
    ctx, results = context(Stage.CONNECT, SETTINGS, ip="192.0.2.7")
    assert (await AccessLists().check(ctx)).action is Action.ACCEPT
    assert ctx.fact("allowlisted") == AccessMatch("allow", "global", "allow_ips",
                                                  "192.0.2.0/24")
    assert ctx.fact("allowlisted").allowlisted  # what greylisting tests
    assert [e.outcome for e in results.entries] == [Outcome.PASS]
    assert is_allowlisted(ctx)


async def test_connect_ignores_the_sender_lists() -> None:
    ctx, results = context(Stage.CONNECT, SETTINGS, ip="203.0.113.1", sender="x@spam.test")
    assert (await AccessLists().check(ctx)).action is Action.CONTINUE
    assert [e.outcome for e in results.entries] == [Outcome.SKIP]


@pytest.mark.parametrize(("ip", "sender", "action"), [
    ("203.0.113.1", "x@mail.spam.test", Action.REJECT),
    ("203.0.113.1", "x@partner.example", Action.ACCEPT),
    ("192.0.2.1", "x@mail.spam.test", Action.REJECT),  # an allowed client, a denied sender
    ("198.51.100.1", "x@partner.example", Action.REJECT),  # and the other way round
    ("203.0.113.1", "x@other.example", Action.CONTINUE),
    ("203.0.113.1", "", Action.CONTINUE),
])
async def test_mail_checks_client_and_sender(ip: str, sender: str, action: Action) -> None:
    ctx, _ = context(Stage.MAIL, SETTINGS, ip=ip, sender=sender)
    assert (await AccessLists().check(ctx)).action is action


async def test_rcpt_applies_the_tenants_lists() -> None:
    policy = {"allow_senders": ["friend.example"], "deny_ips": ["203.0.113.66"]}
    ctx, _ = context(Stage.RCPT, SETTINGS, ip="203.0.113.1", sender="a@friend.example",
                     policy=policy)
    assert (await AccessLists().check(ctx)).action is Action.ACCEPT
    assert ctx.fact("allowlisted@acme") == AccessMatch("allow", "acme", "allow_senders",
                                                       "friend.example")
    assert ctx.fact("allowlisted") is None
    ctx, _ = context(Stage.RCPT, SETTINGS, ip="203.0.113.66", sender="a@friend.example",
                     policy=policy)
    verdict = await AccessLists().check(ctx)
    assert verdict.action is Action.REJECT and "acme deny_ips" in verdict.reason


async def test_rcpt_denial_spares_postmaster() -> None:
    ctx, results = context(Stage.RCPT, SETTINGS, ip="198.51.100.1",
                           recipient="postmaster@example.test")
    assert (await AccessLists().check(ctx)).action is Action.CONTINUE
    assert [e.outcome for e in results.entries] == [Outcome.SKIP]


async def test_no_settings_no_opinion() -> None:
    ctx, results = context(Stage.MAIL, None, sender="x@spam.test")
    assert (await AccessLists().check(ctx)).action is Action.CONTINUE
    assert [e.outcome for e in results.entries] == [Outcome.SKIP]


def test_filter_declaration() -> None:
    assert AccessLists.name == "access_lists"
    assert AccessLists.stages == frozenset({Stage.CONNECT, Stage.MAIL, Stage.RCPT})
