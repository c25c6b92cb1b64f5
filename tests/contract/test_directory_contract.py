"""One contract, two directories: the tenants file, and the HTTP client + reference server.

Every test here runs twice: against `FileDirectory` reading a tenants file, and against
`CachedTenantDirectory` talking over real HTTP to `mailedge tenant-api`'s server serving
the same file. Whatever the gateway sees must not depend on which one it has.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tenant_api_client import FileDirectory, Recipient, TenantDirectory, Unknown
from tenant_api_client.cached import CachedTenantDirectory
from tenant_api_client.client import TenantApiClient
from tenant_api_client.models import Event, Limits
from tenant_api_client.passwords import hash_password
from tenant_api_client.server import ReferenceServer

TOKEN = "contract-token"


def tenants_file(root: Path) -> Path:
    key = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    (root / "ed.pem").write_bytes(key)
    text = f"""
[tenant.acme]
name = "Acme"
domains = ["example.test", "catch.example"]
mailboxes = ["alice@example.test", "bob@example.test", "any@catch.example"]

[tenant.acme.mailbox."carol@example.test"]
disabled = true
[tenant.acme.mailbox."dan@example.test"]
over_quota = true
storage = "127.0.0.1:2424"
[tenant.acme.mailbox."eve@example.test"]
autoreply = {{ subject = "Away", body = "Back Monday.", interval_days = 3 }}

[tenant.acme.alias."team@example.test"]
targets = ["alice@example.test", "Bob@Example.test"]
[tenant.acme.forward."old@example.test"]
targets = ["new@elsewhere.example"]
keep_copy = true

[tenant.acme.policy]
spam_reject_score = 12.5
greylisting = true
[tenant.acme.limits]
messages_per_hour = 5000

[tenant.acme.domain."catch.example"]
catch_all = "any@catch.example"
policy = {{ greylisting = false, srs_domain = "srs.catch.example" }}
[tenant.acme.domain."example.test".dkim.ed2026]
algorithm = "ed25519-sha256"
private_key_file = "ed.pem"

[tenant.acme.account."alice@example.test"]
password = "{hash_password('correct horse')}"
allowed_senders = ["alice@example.test", "@catch.example"]
limits = {{ messages_per_hour = 100 }}

[tenant.globex]
domains = ["example.org"]
mailboxes = ["zed@example.org"]
"""
    path = root / "tenants.toml"
    path.write_text(text)
    return path


@pytest.fixture(params=["file", "api"])
async def directory(request: pytest.FixtureRequest, tmp_path: Path
                    ) -> AsyncIterator[TenantDirectory]:
    data = tenants_file(tmp_path)
    if request.param == "file":
        yield FileDirectory(data)
        return
    server = ReferenceServer(data, TOKEN)
    port = await server.start("127.0.0.1", 0)
    cached = CachedTenantDirectory(TenantApiClient(f"http://127.0.0.1:{port}", TOKEN))
    try:
        yield cached
    finally:
        await cached.aclose()
        await server.stop()


async def test_mailbox(directory: TenantDirectory) -> None:
    alice = await directory.lookup_recipient("alice", "example.test")
    assert alice == Recipient(address="alice@example.test", tenant="acme")


async def test_unknown_in_hosted_and_foreign_domains(directory: TenantDirectory) -> None:
    assert await directory.lookup_recipient("nobody", "example.test") == Unknown(tenant="acme")
    assert await directory.lookup_recipient("alice", "elsewhere.example") == Unknown(tenant=None)


async def test_flags_storage_and_autoreply(directory: TenantDirectory) -> None:
    carol = await directory.lookup_recipient("carol", "example.test")
    dan = await directory.lookup_recipient("dan", "example.test")
    eve = await directory.lookup_recipient("eve", "example.test")
    assert isinstance(carol, Recipient) and carol.disabled
    assert isinstance(dan, Recipient) and dan.over_quota and dan.storage == "127.0.0.1:2424"
    assert isinstance(eve, Recipient) and eve.autoreply is not None
    assert (eve.autoreply.subject, eve.autoreply.interval_days) == ("Away", 3)


async def test_alias_forward_and_catch_all(directory: TenantDirectory) -> None:
    team = await directory.lookup_recipient("team", "example.test")
    assert isinstance(team, Recipient) and team.kind == "alias"
    assert team.targets == ("alice@example.test", "bob@example.test")
    old = await directory.lookup_recipient("old", "example.test")
    assert isinstance(old, Recipient) and old.kind == "forward" and old.keep_copy
    assert old.targets == ("new@elsewhere.example",)
    caught = await directory.lookup_recipient("whatever", "catch.example")
    assert isinstance(caught, Recipient) and caught.kind == "catch_all"
    assert caught.address == "any@catch.example"


async def test_tenant_and_domain_policy(directory: TenantDirectory) -> None:
    acme = await directory.tenant("acme")
    assert acme is not None and acme.domains == ("example.test", "catch.example")
    assert acme.policy.spam_reject_score == 12.5 and acme.policy.greylisting
    assert await directory.tenant("nope") is None
    plain = await directory.domain("example.test")
    assert plain is not None and plain.tenant == "acme" and plain.policy.greylisting
    catch = await directory.domain("catch.example")
    assert catch is not None and not catch.policy.greylisting
    assert catch.policy.srs_domain == "srs.catch.example"
    assert catch.policy.spam_reject_score == 12.5  # the rest is the tenant's
    assert await directory.domain("elsewhere.example") is None


async def test_dkim_keys(directory: TenantDirectory) -> None:
    keys = await directory.dkim_keys("example.test")
    [key] = keys.keys
    assert (key.selector, key.algorithm, key.active) == ("ed2026", "ed25519-sha256", True)
    assert key.private_key.startswith("-----BEGIN PRIVATE KEY-----")
    assert (await directory.dkim_keys("catch.example")).keys == ()


async def test_authentication_and_senders(directory: TenantDirectory) -> None:
    account = await directory.authenticate("alice@example.test", "correct horse",
                                           mechanism="PLAIN", client_ip="192.0.2.1")
    assert account is not None and account.tenant == "acme"
    assert account.limits.messages_per_hour == 100
    for user, password in (("alice@example.test", "wrong"), ("ghost@example.test", "x")):
        assert await directory.authenticate(user, password, mechanism="LOGIN",
                                            client_ip="192.0.2.1") is None
    assert await directory.sender_allowed("alice@example.test", "alice@example.test")
    assert await directory.sender_allowed("alice@example.test", "sales@catch.example")
    assert not await directory.sender_allowed("alice@example.test", "bob@example.test")
    assert not await directory.sender_allowed("ghost@example.test", "ghost@example.test")


async def test_limits(directory: TenantDirectory) -> None:
    assert await directory.tenant_limits("acme") == Limits(messages_per_hour=5000)
    assert await directory.tenant_limits("globex") == Limits()
    assert await directory.account_limits("alice@example.test") == Limits(
        messages_per_hour=100)


async def test_events_are_accepted(directory: TenantDirectory) -> None:
    await directory.report(Event(type="account_contained", tenant="acme",
                                 account="alice@example.test", reason="spam burst", at=1.0))
    assert directory.ready()
