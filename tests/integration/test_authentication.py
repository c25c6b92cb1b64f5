"""SPF, DKIM, DMARC and ARC end to end: real SMTP in, a real authoritative DNS server
(NSD, tests/peers/dns.py) serving zones generated here, decisions per tenant policy.

Tenants: acme enforces DMARC and refuses SPF fail without DMARC pass, and trusts the
ARC sealer forwarder.example; globex only monitors. The client connects from
127.0.0.1, so SPF records that list 127.0.0.1 pass and the others do not.
"""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from filters.authentication import SPF_HELO, spf_helo_of
from filters.base import Results, Stage
from filters.dns import AsyncResolver
from gateway.dkim_signer import DkimSigner, arc_seal
from gateway.pipeline import FilterContext
from tests.peers.dns import AuthoritativeDNS
from tests.support.node import NodeHarness
from tests.support.smtp import RawSMTP, dot_stuff

pytestmark = pytest.mark.integration

TENANTS = """
[tenant.acme]
domains = ["example.test"]
mailboxes = ["alice@example.test"]
[tenant.acme.policy]
dmarc_enforcement = "enforce"
spf_fail_reject = true
arc_trusted_sealers = ["forwarder.example"]

[tenant.globex]
domains = ["example.org"]
mailboxes = ["carol@example.org"]
[tenant.globex.policy]
dmarc_enforcement = "monitor"
"""

AUTH_PIPELINE = {"mail": ["spf"], "message": ["size_limit", "dkim", "arc", "dmarc", "spf"]}


def rsa_pem(bits: int = 2048) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ed_pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


RSA_KEY = rsa_pem()


def publish(dns: AuthoritativeDNS, signer: DkimSigner) -> None:
    dns.zone(signer.domain).txt(f"{signer.selector}._domainkey", signer.dns_record())


def mail(sender_domain: str, subject: str, *, to: str = "alice@example.test",
         body: str = "Hello from a signed world.\r\n") -> bytes:
    return (f"From: Someone <someone@{sender_domain}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@{sender_domain}>\r\n\r\n{body}").encode()


@pytest.fixture
def zones(dns_server: AuthoritativeDNS) -> AuthoritativeDNS:
    """Zones every test has: the client's HELO name and the recipients' domains."""
    dns_server.zone("client.example").add("@", "A", "127.0.0.1").txt(
        "@", "v=spf1 ip4:127.0.0.1 -all")
    for domain in ("example.test", "example.org"):
        dns_server.zone(domain).add("@", "MX", "10 mx.example.test.")
    return dns_server


async def start_node(node_factory: Callable[..., object], dns: AuthoritativeDNS,  # type: ignore[no-untyped-def]
                     **pipeline: list[str]) -> NodeHarness:
    dns.reload()
    servers = [f"{host}:{port}" for host, port in dns.nameservers]
    harness: NodeHarness = await node_factory(tenants=TENANTS, overrides={  # type: ignore[operator]
        "dns": {"nameservers": servers, "timeout": 1.0},
        "pipeline": pipeline or AUTH_PIPELINE})
    return harness


async def send(harness: NodeHarness, sender: str, message: bytes,
               recipients: tuple[str, ...] = ("alice@example.test",)) -> tuple[int, str]:
    client, _ = await RawSMTP.connect(harness.port)
    await client.cmd("EHLO client.example")
    assert (await client.cmd(f"MAIL FROM:<{sender}>")).code == 250
    for rcpt in recipients:
        assert (await client.cmd(f"RCPT TO:<{rcpt}>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    await client.send(dot_stuff(message))
    reply = await client.read_reply()
    await client.close()
    return reply.code, reply.status


async def delivered(harness: NodeHarness, mailbox: str) -> bytes:
    await harness.wait_empty()
    [stored] = harness.maildir_messages(mailbox)
    return stored


def auth_results(stored: bytes) -> str:
    header = stored.split(b"\r\n\r\n", 1)[0].decode()
    match = re.search(r"^Authentication-Results: mx\.test\.example;(.*?)(?=^\S)", header + "\r\nX",
                      re.M | re.S)
    assert match, header
    return " ".join(match.group(1).split())


async def test_aligned_spf_and_dkim_pass(node_factory, zones: AuthoritativeDNS) -> None:  # type: ignore[no-untyped-def]
    rsa_signer = DkimSigner(RSA_KEY, "rsa2026", "sender.example")
    ed_signer = DkimSigner(ed_pem(), "ed2026", "sender.example")
    zone = zones.zone("sender.example")
    zone.txt("@", "v=spf1 include:_spf.sender.example ~all")
    zone.txt("_spf", "v=spf1 ip4:192.0.2.0/24 ip4:127.0.0.1 -all")
    zone.txt("_dmarc", "v=DMARC1; p=reject; adkim=s")
    publish(zones, rsa_signer)
    publish(zones, ed_signer)
    harness = await start_node(node_factory, zones)
    message = mail("sender.example", "all pass")
    signed = ed_signer.sign(rsa_signer.sign(message) + message) + rsa_signer.sign(message) \
        + message
    assert await send(harness, "bounce@sender.example", signed) == (250, "2.0.0")
    results = auth_results(await delivered(harness, "alice@example.test"))
    assert "spf=pass" in results and "smtp.mailfrom=bounce@sender.example" in results
    assert results.count("dkim=pass") == 2
    assert "header.a=ed25519-sha256" in results and "header.a=rsa-sha256" in results
    assert "dmarc=pass header.from=sender.example policy.dmarc=reject" in results
    assert "arc=none" in results


async def test_spf_fail_without_dmarc_is_refused_550_5_7_23(node_factory,  # type: ignore[no-untyped-def]
                                                           zones: AuthoritativeDNS) -> None:
    zones.zone("spoofed.example").txt("@", "v=spf1 ip4:192.0.2.1 -all")
    harness = await start_node(node_factory, zones)
    assert await send(harness, "ceo@spoofed.example", mail("spoofed.example", "spf fail")) \
        == (550, "5.7.23")


async def test_dkim_pass_saves_spf_fail(node_factory, zones: AuthoritativeDNS) -> None:  # type: ignore[no-untyped-def]
    signer = DkimSigner(RSA_KEY, "s1", "list.example")
    zone = zones.zone("list.example")
    zone.txt("@", "v=spf1 ip4:192.0.2.1 -all")
    zone.txt("_dmarc", "v=DMARC1; p=reject")
    publish(zones, signer)
    harness = await start_node(node_factory, zones)
    message = mail("list.example", "dkim saves")
    assert await send(harness, "owner@list.example", signer.sign(message) + message) \
        == (250, "2.0.0")
    results = auth_results(await delivered(harness, "alice@example.test"))
    assert "spf=fail" in results and "dkim=pass" in results and "dmarc=pass" in results


async def test_dmarc_reject_enforced_for_one_tenant_monitored_for_another(  # type: ignore[no-untyped-def]
        node_factory, zones: AuthoritativeDNS) -> None:
    zone = zones.zone("bank.example")
    zone.txt("@", "v=spf1 ip4:192.0.2.1 ~all")  # softfail: SPF policy alone refuses nothing
    zone.txt("_dmarc", "v=DMARC1; p=reject; rua=mailto:d@bank.example")
    harness = await start_node(node_factory, zones)
    # acme alone enforces: 550 5.7.1.
    assert await send(harness, "x@bank.example", mail("bank.example", "phish")) == (550, "5.7.1")
    # Both tenants: acme refuses, globex monitors: 250, acme's copy quarantined.
    code, _ = await send(harness, "x@bank.example", mail("bank.example", "phish 2"),
                         ("alice@example.test", "carol@example.org"))
    assert code == 250
    results = auth_results(await delivered(harness, "carol@example.org"))
    assert "spf=softfail" in results and "dmarc=fail" in results
    assert "policy.dmarc=reject" in results
    assert harness.maildir_messages("alice@example.test") == []
    assert harness.node is not None and len(harness.node.quarantine.ids("acme")) == 1


async def test_dmarc_quarantine_and_subdomain_policy(node_factory, zones: AuthoritativeDNS) -> None:  # type: ignore[no-untyped-def]
    zone = zones.zone("shop.example")
    zone.txt("_dmarc", "v=DMARC1; p=none; sp=quarantine")
    zone.txt("news", "v=spf1 -all")
    harness = await start_node(node_factory, zones)
    # From news.shop.example: no record there, the org domain's sp=quarantine applies.
    code, _ = await send(harness, "promo@news.shop.example", mail("news.shop.example", "sale"))
    assert code == 250
    await harness.wait_empty()
    assert harness.maildir_messages("alice@example.test") == []
    assert harness.node is not None and len(harness.node.quarantine.ids("acme")) == 1


async def test_spf_results_recorded(node_factory, zones: AuthoritativeDNS) -> None:  # type: ignore[no-untyped-def]
    zones.zone("soft.example").txt("@", "v=spf1 ?all")
    zones.zone("broken.example").txt("@", "v=spf1 -all").txt("@", "v=spf1 +all")
    zones.zone("nothing.example").add("@", "A", "192.0.2.9")
    zones.zone("macro.example").txt("@", "v=spf1 exists:%{i}._ip.macro.example -all").add(
        "127.0.0.1._ip", "A", "127.0.0.2")
    zones.zone("redir.example").txt("@", "v=spf1 redirect=_spf.redir.example").txt(
        "_spf", "v=spf1 a:host.redir.example -all").add("host", "A", "127.0.0.1")
    zones.zone("void.example").txt(
        "@", "v=spf1 a:n1.void.example a:n2.void.example a:n3.void.example -all")
    harness = await start_node(node_factory, zones)
    expected = {"soft.example": "neutral", "broken.example": "permerror",
                "nothing.example": "none", "macro.example": "pass", "redir.example": "pass",
                "void.example": "permerror"}
    for domain in expected:
        code, _ = await send(harness, f"a@{domain}", mail(domain, f"spf {domain}"))
        assert code == 250, domain
    await harness.wait_empty()
    stored = harness.maildir_messages("alice@example.test")
    found = {}
    for message in stored:
        results = auth_results(message)
        domain = re.search(r"smtp\.mailfrom=a@([\w.]+)", results)
        assert domain, results
        found[domain.group(1)] = re.search(r"spf=(\w+)", results).group(1)  # type: ignore[union-attr]
    assert found == expected


async def test_dns_down_defers_never_refuses(node_factory, zones: AuthoritativeDNS) -> None:  # type: ignore[no-untyped-def]
    zone = zones.zone("victim.example")
    zone.txt("@", "v=spf1 ip4:192.0.2.1 -all")
    zone.txt("_dmarc", "v=DMARC1; p=reject")
    harness = await start_node(node_factory, zones)
    zones.stop()
    code, status = await send(harness, "x@victim.example", mail("victim.example", "dns down"))
    assert code == 451 and status.startswith("4.7."), (code, status)
    zones.start()  # back: the same message is now refused by policy, as it should be
    await asyncio.sleep(2.5)  # the resolver remembers temporary errors for 2 s
    assert await send(harness, "x@victim.example", mail("victim.example", "dns up")) \
        == (550, "5.7.1")


async def test_weak_signatures_never_pass(node_factory, zones: AuthoritativeDNS) -> None:  # type: ignore[no-untyped-def]
    """RFC 8301: rsa-sha1 and RSA keys under 1024 bits never pass, even when valid."""
    zone = zones.zone("weak.example")
    zone.txt("@", "v=spf1 -all")
    strong = DkimSigner(RSA_KEY, "sha1", "weak.example")
    publish(zones, strong)
    # cryptography refuses to generate keys this small; OpenSSL still can.
    tiny_pem = (await asyncio.to_thread(
        subprocess.run, ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                         "rsa_keygen_bits:512"], capture_output=True, check=True,
        timeout=60)).stdout
    tiny = serialization.load_pem_private_key(tiny_pem, password=None)
    assert isinstance(tiny, rsa.RSAPrivateKey)
    tiny_public = base64.b64encode(tiny.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    zone.txt("tiny._domainkey", f"v=DKIM1; k=rsa; p={tiny_public}")
    message = mail("weak.example", "weak signatures")
    sha1 = dkim.sign(message, b"sha1", b"weak.example", RSA_KEY,
                     include_headers=[b"from", b"subject"], signature_algorithm=b"rsa-sha1")
    small = dkim.sign(message, b"tiny", b"weak.example", tiny_pem,
                      include_headers=[b"from", b"subject"])
    harness = await start_node(node_factory, zones, mail=[], message=["dkim"])
    assert await send(harness, "x@weak.example", sha1 + small + message) == (250, "2.0.0")
    results = auth_results(await delivered(harness, "alice@example.test"))
    assert "dkim=pass" not in results
    assert "header.s=sha1" in results and "header.s=tiny" in results


async def test_third_party_signature(node_factory, zones: AuthoritativeDNS,  # type: ignore[no-untyped-def]
                                     tmp_path: Path) -> None:
    """A key made by opendkim-genkey and a signature made by Perl's Mail::DKIM."""
    genkey = shutil.which("opendkim-genkey", path="/usr/sbin:/usr/bin:/sbin:/bin")
    signer = shutil.which("dkimproxy-sign", path="/usr/bin:/usr/local/bin")
    if genkey is None or signer is None:
        pytest.fail("opendkim-tools and libmail-dkim-perl are needed (make peers)")
    await asyncio.to_thread(subprocess.run, [genkey, "-b", "2048", "-d", "third.example",
                                             "-s", "odk", "-D", str(tmp_path)],
                            check=True, timeout=60)
    record = "".join(re.findall(r'"([^"]*)"', (tmp_path / "odk.txt").read_text()))
    zone = zones.zone("third.example")
    zone.txt("odk._domainkey", record)
    zone.txt("@", "v=spf1 -all")
    zone.txt("_dmarc", "v=DMARC1; p=reject")
    message = mail("third.example", "signed by Mail::DKIM")
    signature = (await asyncio.to_thread(
        subprocess.run, [signer, "--key", str(tmp_path / "odk.private"), "--selector", "odk",
                         "--domain", "third.example", "--method", "relaxed"],
        input=message, capture_output=True, check=True, timeout=60)).stdout
    signature = signature.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert signature.startswith(b"DKIM-Signature:")
    harness = await start_node(node_factory, zones)
    assert await send(harness, "x@third.example", signature + message) == (250, "2.0.0")
    results = auth_results(await delivered(harness, "alice@example.test"))
    assert "dkim=pass" in results and "header.d=third.example" in results
    assert "dmarc=pass" in results


def forwarded(sealer_domain: str, selector: str) -> bytes:
    """A message from origin.example as a list at sealer_domain forwards it: the list
    changed the subject (breaking origin's DKIM) and sealed what it had verified."""
    original = mail("origin.example", "ARC test")
    changed = original.replace(b"Subject: ARC test", b"Subject: [list] ARC test")
    seal = arc_seal(changed, RSA_KEY, selector, sealer_domain, "lists." + sealer_domain,
                    "spf=pass smtp.mailfrom=origin.example; dkim=pass header.d=origin.example;"
                    " dmarc=pass header.from=origin.example")
    return b"".join(seal) + changed


@pytest.mark.parametrize(("sealer", "expected"), [("forwarder.example", (250, "2.0.0")),
                                                  ("untrusted.example", (550, "5.7.1"))])
async def test_arc_from_a_trusted_sealer_overrides_dmarc(  # type: ignore[no-untyped-def]
        node_factory, zones: AuthoritativeDNS, sealer: str, expected: tuple[int, str]) -> None:
    origin = zones.zone("origin.example")
    origin.txt("@", "v=spf1 ip4:192.0.2.1 -all")
    origin.txt("_dmarc", "v=DMARC1; p=reject")
    sealer_zone = zones.zone(sealer)
    sealer_zone.txt("@", "v=spf1 ip4:127.0.0.1 -all")
    public = DkimSigner(RSA_KEY, "arc", sealer).dns_record()
    sealer_zone.txt("arc._domainkey", public)
    harness = await start_node(node_factory, zones)
    assert await send(harness, f"list-bounces@{sealer}", forwarded(sealer, "arc")) == expected
    if expected[0] == 250:
        results = auth_results(await delivered(harness, "alice@example.test"))
        assert "arc=pass" in results and "dmarc=fail" in results



async def test_helo_spf_is_shared_by_a_connection_but_a_temperror_is_not(
        zones: AuthoritativeDNS) -> None:
    """The HELO identity's SPF is evaluated once per connection (it depends only on the
    client and the HELO name); a temperror is evaluated again by the next transaction.

    Filter level against NSD: the A-R field shows the HELO result only for a null-sender
    transaction, so the node level would not tell a shared result from a fresh one.
    """
    zones.zone("other.example").add("@", "A", "127.0.0.1")  # no SPF record: "none"
    zones.reload()
    resolver = AsyncResolver(zones.nameservers, timeout=0.5, error_ttl=0)
    services = SimpleNamespace(dns=resolver, hostname="mx.test.example")
    session = SimpleNamespace(session_id="S1", client_ip="127.0.0.1", client_port=40000,
                              helo="client.example", tls=False)
    session_results = Results()

    def transaction() -> FilterContext:
        envelope = SimpleNamespace(sender="a@client.example", recipients=(),
                                   current_recipient=None, size=0)
        return FilterContext(Stage.MAIL, session, envelope, None, None, services,
                             Results(), session_results)

    zones.stop()
    first = await spf_helo_of(transaction())
    zones.start()
    second = transaction()
    again = await spf_helo_of(second)
    shared = await spf_helo_of(transaction())
    assert (first.result, again.result, shared.result) == ("temperror", "pass", "pass")
    assert shared is again  # the same evaluation, not a second one
    assert second.fact(SPF_HELO) is again  # and each transaction has it for its A-R
    session.helo = "other.example"  # a new EHLO name is a new evaluation
    assert (await spf_helo_of(transaction())).result == "none"
