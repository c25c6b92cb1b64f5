"""Connection-level checks end to end: DNSBL/DNSWL, access lists, sender domain and
FCrDNS through a real node, with a real authoritative DNS server (NSD,
tests/peers/dns.py) serving the lists, the sender domains and the reverse zone.

The client connects from 127.0.0.1, so a DNSBL lists it with ``1.0.0.127.<zone>``; its
reverse name is ``1.0.0.127.in-addr.arpa`` (zone ``127.in-addr.arpa``). Names that are
not in a served zone get REFUSED from NSD (a temporary error), so every name a test
expects to be NXDOMAIN lies inside a zone it serves.

Node configuration these tests rely on: ``[dnsbl] zones = [{name, weight, codes, kind}]
threshold``, ``[access] allow_ips deny_ips allow_senders deny_senders``, the filters
``dnsbl``, ``rdns``, ``sender_domain`` and ``access_lists`` in ``[pipeline]``, and tenant
policy keys ``require_fcrdns``, ``reject_unknown_sender_domain`` and the four lists.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.peers.dns import AuthoritativeDNS
from tests.support.node import NodeHarness
from tests.support.smtp import RawSMTP, Reply, dot_stuff, message

pytestmark = pytest.mark.integration

NodeFactory = Callable[..., Awaitable[NodeHarness]]

TENANTS = """
[tenant.acme]
domains = ["example.test"]
mailboxes = ["alice@example.test", "postmaster@example.test", "abuse@example.test"]

[tenant.strict]
domains = ["strict.test"]
mailboxes = ["bob@strict.test", "postmaster@strict.test"]
[tenant.strict.policy]
require_fcrdns = true

[tenant.friendly]
domains = ["friendly.test"]
mailboxes = ["carol@friendly.test"]
[tenant.friendly.policy]
allow_ips = ["127.0.0.1"]

[tenant.lenient]
domains = ["lenient.test"]
mailboxes = ["dave@lenient.test"]
[tenant.lenient.policy]
reject_unknown_sender_domain = false
"""

BLOCK = {"name": "dnsbl.test", "weight": 5, "codes": ["127.0.0.2"], "kind": "block"}
NO_ACCESS_LISTS: dict[str, list[str]] = {
    "allow_ips": [], "deny_ips": [], "allow_senders": [], "deny_senders": []}


@pytest.fixture
def zones(dns_server: AuthoritativeDNS) -> AuthoritativeDNS:
    """The DNSBL listing 127.0.0.1 and the sender domains every test may use."""
    dns_server.zone("dnsbl.test").add("1.0.0.127", "A", "127.0.0.2")
    senders = dns_server.zone("senders.test")
    senders.add("good", "MX", "10 mx.senders.test.").add("mx", "A", "192.0.2.1")
    senders.add("aonly", "A", "192.0.2.2")
    senders.add("nullmx", "MX", "0 .")
    senders.add("client", "A", "127.0.0.1")  # the forward name of the client's PTR
    senders.add("elsewhere", "A", "192.0.2.99")
    dns_server.servfail_zone("broken.test")
    return dns_server


async def start(node_factory: NodeFactory, dns: AuthoritativeDNS, *,
                pipeline: dict[str, list[str]], zones: list[dict[str, Any]] | None = None,
                threshold: float = 5, access: dict[str, list[str]] | None = None
                ) -> NodeHarness:
    dns.reload()
    return await node_factory(tenants=TENANTS, overrides={
        "dns": {"nameservers": [f"{host}:{port}" for host, port in dns.nameservers],
                "timeout": 1.0},
        "pipeline": {"message": ["size_limit"], **pipeline},
        "dnsbl": {"zones": zones if zones is not None else [BLOCK], "threshold": threshold},
        "access": {**NO_ACCESS_LISTS, **(access or {})},
    })


async def session(harness: NodeHarness, sender: str = "someone@good.senders.test"
                  ) -> RawSMTP:
    client, greeting = await RawSMTP.connect(harness.port)
    assert greeting.code == 220  # never refused at connect: the tenant's context decides
    assert (await client.cmd("EHLO client.example")).code == 250
    reply = await client.cmd(f"MAIL FROM:<{sender}>")
    assert reply.code == 250, reply  # denials found at MAIL are held until RCPT
    return client


async def rcpt(client: RawSMTP, address: str) -> Reply:
    return await client.cmd(f"RCPT TO:<{address}>")


async def deliver(client: RawSMTP, subject: str) -> None:
    assert (await client.cmd("DATA")).code == 354
    await client.send(dot_stuff(message(subject)))
    assert (await client.read_reply()).code == 250
    await client.close()


# -- DNSBL ------------------------------------------------------------------------------------

async def test_listed_client_is_refused_at_rcpt_and_postmaster_stays_reachable(
        node_factory: NodeFactory, zones: AuthoritativeDNS) -> None:
    harness = await start(node_factory, zones, pipeline={"connect": ["dnsbl"]})
    client = await session(harness)
    reply = await rcpt(client, "alice@example.test")
    assert (reply.code, reply.status) == (554, "5.7.1")
    assert "Client host [127.0.0.1] blocked using dnsbl.test" in reply.text
    assert (await rcpt(client, "postmaster@example.test")).code == 250
    assert (await rcpt(client, "Abuse@example.test")).code == 250
    await deliver(client, "why am I listed?")
    await harness.wait_empty()
    assert len(harness.maildir_messages("postmaster@example.test")) == 1
    assert harness.maildir_messages("alice@example.test") == []


async def test_other_codes_error_codes_and_broken_lists_do_not_block(
        node_factory: NodeFactory, zones: AuthoritativeDNS) -> None:
    zones.zone("codes.test").add("1.0.0.127", "A", "127.0.0.4")  # not a configured code
    zones.zone("limited.test").add("1.0.0.127", "A", "127.255.255.254")  # error code
    zones.zone("empty.test").add("unrelated", "A", "127.0.0.2")  # 127.0.0.1: NXDOMAIN
    harness = await start(node_factory, zones, pipeline={"connect": ["dnsbl"]}, threshold=1,
                          zones=[
                              {"name": "codes.test", "weight": 5, "codes": ["127.0.0.2"]},
                              {"name": "limited.test", "weight": 5},
                              {"name": "empty.test", "weight": 5},
                              {"name": "broken.test", "weight": 5},  # SERVFAIL: fail open
                          ])
    client = await session(harness)
    assert (await rcpt(client, "alice@example.test")).code == 250
    await deliver(client, "not listed")
    await harness.wait_empty()
    assert len(harness.maildir_messages("alice@example.test")) == 1


async def test_weights_add_up_to_the_threshold(node_factory: NodeFactory,
                                               zones: AuthoritativeDNS) -> None:
    zones.zone("second.test").add("1.0.0.127", "A", "127.0.0.3")
    harness = await start(node_factory, zones, pipeline={"connect": ["dnsbl"]}, threshold=5,
                          zones=[{**BLOCK, "weight": 3},
                                 {"name": "second.test", "weight": 2}])
    client = await session(harness)
    reply = await rcpt(client, "alice@example.test")
    assert (reply.code, reply.status) == (554, "5.7.1")
    assert "blocked using dnsbl.test" in reply.text  # the heavier of the two
    await client.close()


async def test_dnswl_listing_offsets_the_blocklist(node_factory: NodeFactory,
                                                   zones: AuthoritativeDNS) -> None:
    zones.zone("dnswl.test").add("1.0.0.127", "A", "127.0.10.1")
    harness = await start(node_factory, zones, pipeline={"connect": ["dnsbl"]}, zones=[
        BLOCK, {"name": "dnswl.test", "weight": 5, "kind": "allow"}])
    client = await session(harness)
    assert (await rcpt(client, "alice@example.test")).code == 250
    await client.close()


# -- access lists -----------------------------------------------------------------------------

async def test_allowlisted_client_skips_the_dnsbl(node_factory: NodeFactory,
                                                  zones: AuthoritativeDNS) -> None:
    harness = await start(node_factory, zones,
                          pipeline={"connect": ["access_lists", "dnsbl"]},
                          access={"allow_ips": ["127.0.0.0/8"]})
    client = await session(harness)
    assert (await rcpt(client, "alice@example.test")).code == 250
    await client.close()


async def test_allowlisted_client_is_spared_a_held_denial(node_factory: NodeFactory,
                                                          zones: AuthoritativeDNS) -> None:
    # The DNSBL runs first and its denial is held; the gateway asks `allowlisted` at RCPT.
    zones.zone("senders.test").add("partner", "MX", "10 mx.senders.test.")
    harness = await start(node_factory, zones,
                          pipeline={"connect": ["dnsbl", "access_lists"]},
                          access={"allow_senders": ["@partner.senders.test"]})
    client = await session(harness, "billing@partner.senders.test")
    assert (await rcpt(client, "alice@example.test")).code == 250
    await client.close()
    client = await session(harness, "someone@good.senders.test")
    assert (await rcpt(client, "alice@example.test")).code == 554
    await client.close()


async def test_tenant_allow_list_spares_only_that_tenant(node_factory: NodeFactory,
                                                         zones: AuthoritativeDNS) -> None:
    harness = await start(node_factory, zones, pipeline={"connect": ["dnsbl"],
                                                         "rcpt": ["access_lists"]})
    client = await session(harness)
    assert (await rcpt(client, "carol@friendly.test")).code == 250
    reply = await rcpt(client, "alice@example.test")
    assert (reply.code, reply.status) == (554, "5.7.1")
    await client.close()


async def test_denied_client_and_sender(node_factory: NodeFactory,
                                        zones: AuthoritativeDNS) -> None:
    harness = await start(node_factory, zones, pipeline={"connect": ["access_lists"],
                                                         "mail": ["access_lists"]},
                          access={"deny_senders": [".spam.test"]})
    client = await session(harness, "Offers@Mail.Spam.test")
    reply = await rcpt(client, "alice@example.test")
    assert (reply.code, reply.status, reply.text.endswith("Access denied")) == (
        554, "5.7.1", True)
    assert (await rcpt(client, "postmaster@example.test")).code == 250
    # The next transaction, from another sender, is not refused.
    assert (await client.cmd("RSET")).code == 250
    assert (await client.cmd("MAIL FROM:<someone@good.senders.test>")).code == 250
    assert (await rcpt(client, "alice@example.test")).code == 250
    await client.close()

    harness2 = await node_factory("node2", tenants=TENANTS, overrides={
        "dns": {"nameservers": [f"{h}:{p}" for h, p in zones.nameservers]},
        "pipeline": {"connect": ["access_lists"], "message": ["size_limit"]},
        "dnsbl": {"zones": [], "threshold": 5},
        "access": {**NO_ACCESS_LISTS, "deny_ips": ["127.0.0.0/8"]}})
    client = await session(harness2)
    reply = await rcpt(client, "alice@example.test")
    assert (reply.code, reply.status) == (554, "5.7.1")
    await client.close()


# -- sender domain ----------------------------------------------------------------------------

SENDER_CASES = [
    ("someone@good.senders.test", 250, "2.1.5"),
    ("someone@aonly.senders.test", 250, "2.1.5"),  # no MX: the implicit MX (A)
    ("someone@nullmx.senders.test", 550, "5.7.27"),  # RFC 7505
    ("someone@missing.senders.test", 550, "5.1.8"),  # NXDOMAIN
    ("someone@broken.test", 451, "4.4.3"),  # SERVFAIL: deferred, never refused
    ("", 250, "2.1.5"),  # the null sender is not checked
]


async def test_sender_domain_must_exist(node_factory: NodeFactory,
                                        zones: AuthoritativeDNS) -> None:
    harness = await start(node_factory, zones, pipeline={"mail": ["sender_domain"]})
    client, _ = await RawSMTP.connect(harness.port)
    assert (await client.cmd("EHLO client.example")).code == 250
    got = []
    for sender, _code, _status in SENDER_CASES:
        assert (await client.cmd(f"MAIL FROM:<{sender}>")).code == 250
        reply = await rcpt(client, "alice@example.test")
        got.append((sender, reply.code, reply.status))
        if reply.code >= 400:
            assert (await rcpt(client, "postmaster@example.test")).code == 250
        assert (await client.cmd("RSET")).code == 250
    await client.close()
    expected = [(sender, code, status) for sender, code, status in SENDER_CASES]
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert [g[2] for g in got if g[1] >= 400] == [e[2] for e in expected if e[1] >= 400]


async def test_sender_domain_per_tenant_at_rcpt(node_factory: NodeFactory,
                                                zones: AuthoritativeDNS) -> None:
    harness = await start(node_factory, zones, pipeline={"rcpt": ["sender_domain"]})
    client = await session(harness, "someone@missing.senders.test")
    assert (await rcpt(client, "dave@lenient.test")).code == 250
    reply = await rcpt(client, "alice@example.test")
    assert (reply.code, reply.status) == (550, "5.1.8")
    await client.close()


# -- FCrDNS -----------------------------------------------------------------------------------

async def test_fcrdns_required_by_one_tenant(node_factory: NodeFactory,
                                             zones: AuthoritativeDNS) -> None:
    # The PTR names a host whose address is not the client's: not confirmed.
    zones.zone("127.in-addr.arpa").add("1.0.0", "PTR", "elsewhere.senders.test.")
    harness = await start(node_factory, zones, pipeline={"connect": ["rdns"],
                                                         "rcpt": ["rdns"]})
    client = await session(harness)
    reply = await rcpt(client, "bob@strict.test")
    assert (reply.code, reply.status) == (450, "4.7.25")
    assert (await rcpt(client, "postmaster@strict.test")).code == 250
    assert (await rcpt(client, "alice@example.test")).code == 250  # acme does not ask
    await client.close()


async def test_fcrdns_confirmed_is_accepted_and_named_in_received(
        node_factory: NodeFactory, zones: AuthoritativeDNS) -> None:
    zones.zone("127.in-addr.arpa").add("1.0.0", "PTR", "client.senders.test.")
    harness = await start(node_factory, zones, pipeline={"connect": ["rdns"],
                                                         "rcpt": ["rdns"]})
    client = await session(harness)
    assert (await rcpt(client, "bob@strict.test")).code == 250
    await deliver(client, "confirmed")
    await harness.wait_empty()
    [stored] = harness.maildir_messages("bob@strict.test")
    header = stored.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nReceived: from client.example (client.senders.test [127.0.0.1])\r\n" \
        in header, header
