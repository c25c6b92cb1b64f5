"""filters.arc: chains sealed with our sealer, validated through a fake resolver."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filters.arc import ArcResult, verify_arc
from filters.dns import DnsResult, DnsTemporaryError
from gateway.dkim_signer import DkimSigner, arc_seal

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: list@lists.example\r\n"
    b"Subject: meeting notes\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <n1@example.com>\r\n"
    b"\r\n"
    b"Notes from today.\r\n"
)


class FakeResolver:
    """The DNS Protocol over a dict: name -> TXT string, or an exception to raise."""

    def __init__(self, records: dict[str, str | BaseException]) -> None:
        self.records = records
        self.queries: list[str] = []

    async def query(self, name: str, rdtype: str) -> DnsResult:
        self.queries.append(name)
        found = self.records.get(name)
        if isinstance(found, BaseException):
            raise found
        if found is None:
            return DnsResult(name, rdtype, nxdomain=True)
        return DnsResult(name, rdtype, (found,))


@pytest.fixture(scope="module")
def key() -> bytes:
    return rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


@pytest.fixture(scope="module")
def record(key: bytes) -> str:
    return DkimSigner(key, "arc", "relay.example").dns_record()


@pytest.fixture
def resolver(record: str) -> FakeResolver:
    return FakeResolver({"arc._domainkey.forwarder.example": record,
                         "arc._domainkey.lists.example": record})


def seal(message: bytes, key: bytes, domain: str, results: str) -> bytes:
    return b"".join(arc_seal(message, key, "arc", domain, f"mx.{domain}", results)) + message


@pytest.fixture(scope="module")
def chain(key: bytes) -> tuple[bytes, bytes]:
    """(sealed once by forwarder.example, then again by lists.example)."""
    one = seal(MESSAGE, key, "forwarder.example",
               "spf=pass smtp.mailfrom=example.com; dkim=none")
    two = seal(one, key, "lists.example", "spf=fail smtp.mailfrom=forwarder.example; arc=pass")
    return one, two


async def test_no_arc_is_none(resolver: FakeResolver) -> None:
    assert await verify_arc(MESSAGE, resolver) == ArcResult("none", reason="no ARC fields")
    assert resolver.queries == []


async def test_one_instance_passes(chain: tuple[bytes, bytes], resolver: FakeResolver) -> None:
    result = await verify_arc(chain[0], resolver)
    assert (result.result, result.instances, result.sealers, result.oldest_pass) == (
        "pass", 1, ("forwarder.example",), 0)
    assert result.sets[0].cv == "none" and result.sets[0].seal_valid


async def test_two_instances_pass(chain: tuple[bytes, bytes], resolver: FakeResolver) -> None:
    result = await verify_arc(chain[1], resolver)
    assert (result.result, result.instances) == ("pass", 2)
    assert result.sealers == ("forwarder.example", "lists.example")
    assert result.newest_sealer == "lists.example"
    assert [s.instance for s in result.sets] == [2, 1]
    assert [s.cv for s in result.sets] == ["pass", "none"]
    assert result.oldest_pass == 0
    assert sorted(set(resolver.queries)) == ["arc._domainkey.forwarder.example",
                                             "arc._domainkey.lists.example"]


@pytest.mark.parametrize("tamper", [
    pytest.param(lambda m: m.replace(b"Notes from", b"Nodes from"), id="body"),
    pytest.param(lambda m: m.replace(b"meeting notes", b"meeting nudes"), id="subject"),
    pytest.param(lambda m: m.replace(b"cv=none", b"cv=pass"), id="seal-cv"),
    pytest.param(lambda m: m.replace(b"ARC-Authentication-Results: i=1", b"X-Gone: i=1"),
                 id="missing-aar"),
    pytest.param(lambda m: m.replace(b"ARC-Seal: i=2", b"ARC-Seal: i=3"), id="gap"),
])
async def test_tampering_fails(chain: tuple[bytes, bytes], resolver: FakeResolver,
                               tamper: object) -> None:
    assert callable(tamper)
    tampered = tamper(chain[1])
    assert tampered != chain[1]
    result = await verify_arc(tampered, resolver)
    assert result.result == "fail", result
    assert result.oldest_pass is None
    assert not result.temporary


async def test_reseal_after_modification_reports_oldest_pass(
        chain: tuple[bytes, bytes], key: bytes, resolver: FakeResolver) -> None:
    # A list rewrites the body (breaking AMS i=1), validates the chain before it did
    # so, and seals: the chain passes, and oldest-pass says what still validates.
    modified = chain[0].replace(b"Notes from today.", b"[list] Notes from today.")
    resealed = seal(modified, key, "lists.example", "arc=pass")
    result = await verify_arc(resealed, resolver)
    assert (result.result, result.oldest_pass) == ("pass", 2)
    assert [s.ams_valid for s in result.sets] == [True, False]


async def test_chain_marked_failed_by_a_sealer_fails(chain: tuple[bytes, bytes], key: bytes,
                                                     resolver: FakeResolver) -> None:
    failed = seal(chain[0], key, "lists.example", "arc=fail")
    result = await verify_arc(failed, resolver)
    assert result.result == "fail"
    assert result.sealers == ("forwarder.example", "lists.example")


async def test_missing_key_fails(chain: tuple[bytes, bytes], record: str) -> None:
    resolver = FakeResolver({"arc._domainkey.lists.example": record})
    result = await verify_arc(chain[1], resolver)
    assert (result.result, result.temporary) == ("fail", False)


async def test_dns_trouble_is_a_temporary_fail(chain: tuple[bytes, bytes], record: str) -> None:
    resolver = FakeResolver({"arc._domainkey.lists.example": record,
                             "arc._domainkey.forwarder.example": DnsTemporaryError("timeout")})
    result = await verify_arc(chain[1], resolver)
    assert (result.result, result.temporary) == ("fail", True)
    assert "forwarder.example" in result.reason


async def test_revoked_keys_fail(chain: tuple[bytes, bytes]) -> None:
    resolver = FakeResolver({"arc._domainkey.forwarder.example": "v=DKIM1; k=rsa; p=",
                             "arc._domainkey.lists.example": "v=DKIM1; k=rsa; p="})
    assert (await verify_arc(chain[1], resolver)).result == "fail"


async def test_too_many_instances_fail(resolver: FakeResolver) -> None:
    message = b"ARC-Seal: i=51; a=rsa-sha256; cv=pass; d=x.example; s=a; b=AAAA\r\n" + MESSAGE
    result = await verify_arc(message, resolver)
    assert (result.result, result.instances) == ("fail", 51)
    assert resolver.queries == []


async def test_arc_fields_without_instance_fail(resolver: FakeResolver) -> None:
    message = b"ARC-Seal: a=rsa-sha256; cv=none; d=x.example; s=a; b=AAAA\r\n" + MESSAGE
    assert (await verify_arc(message, resolver)).result == "fail"


async def test_unparsable_header_with_arc_fails(resolver: FakeResolver) -> None:
    message = b" stray continuation\r\nARC-Seal: i=1\r\n\r\nbody\r\n"
    assert (await verify_arc(message, resolver)).result == "fail"
    assert (await verify_arc(b" stray\r\n\r\nbody", resolver)).result == "none"


@given(cut=st.integers(0, 100_000), junk=st.binary(min_size=1, max_size=6))
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_chains_never_raise(cut: int, junk: bytes, chain: tuple[bytes, bytes],
                                    record: str) -> None:
    message = chain[1]
    at = cut % len(message)
    mutated = message[:at] + junk + message[at:]
    resolver = FakeResolver({"arc._domainkey.forwarder.example": record,
                             "arc._domainkey.lists.example": record})
    result = asyncio.run(verify_arc(mutated, resolver))
    assert result.result in ("none", "pass", "fail")


@given(st.binary(max_size=400))
@settings(max_examples=100, deadline=None)
def test_arbitrary_bytes_never_raise(message: bytes) -> None:
    result = asyncio.run(verify_arc(b"ARC-Seal: i=1; " + message, FakeResolver({})))
    assert result.result in ("none", "fail")
