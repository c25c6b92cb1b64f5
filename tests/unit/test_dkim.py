"""filters.dkim and filters.dkim_crypto: verification results, the OpenSSL shim, fast paths.

No network: key records come from a dict behind a fake `Resolver`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filters import dkim_crypto
from filters.dkim import DkimResult, verify_dkim
from filters.dns import DnsNameError, DnsResult, DnsTemporaryError
from gateway.dkim_signer import DkimSigner

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: quarterly report\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <r1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello Bob,\r\n\r\nthe numbers  are\tin.\r\n\r\n-- \r\nAlice\r\n"
)


class FakeResolver:
    """The DNS Protocol over a dict: name -> TXT string, or an exception to raise."""

    def __init__(self, records: dict[str, str | BaseException] | None = None) -> None:
        self.records: dict[str, str | BaseException] = dict(records or {})
        self.queries: list[tuple[str, str]] = []

    async def query(self, name: str, rdtype: str) -> DnsResult:
        self.queries.append((name, rdtype))
        found = self.records.get(name)
        if isinstance(found, BaseException):
            raise found
        if found is None:
            return DnsResult(name, rdtype, nxdomain=True)
        return DnsResult(name, rdtype, (found,) if found else (), ttl=300)


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def rsa_record(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def small_rsa_key(bits: int = 512) -> rsa.RSAPrivateKey:
    """An RSA key cryptography will not generate (< 1024 bits), from our own primes."""

    def probable_prime(n: int) -> bool:
        if any(n % p == 0 for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)):
            return False
        d, s = n - 1, 0
        while d % 2 == 0:
            d, s = d // 2, s + 1
        for _ in range(32):
            x = pow(secrets.randbelow(n - 3) + 2, d, n)
            if x in (1, n - 1):
                continue
            for _ in range(s - 1):
                x = pow(x, 2, n)
                if x == n - 1:
                    break
            else:
                return False
        return True

    def prime(size: int) -> int:
        while True:
            candidate = secrets.randbits(size) | (3 << (size - 2)) | 1
            if candidate % 65537 != 1 and probable_prime(candidate):
                return candidate

    p, q = prime(bits // 2), prime(bits // 2)
    d = pow(65537, -1, (p - 1) * (q - 1))
    return rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                 rsa.RSAPublicNumbers(65537, p * q)).private_key()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def rsa_signer(rsa_key: rsa.RSAPrivateKey) -> DkimSigner:
    return DkimSigner(pem(rsa_key), "sel", "example.com")


@pytest.fixture(scope="module")
def ed_signer() -> DkimSigner:
    return DkimSigner(pem(ed25519.Ed25519PrivateKey.generate()), "ed", "example.com")


@pytest.fixture
def resolver(rsa_signer: DkimSigner, ed_signer: DkimSigner) -> FakeResolver:
    return FakeResolver({rsa_signer.record_name: rsa_signer.dns_record(),
                         ed_signer.record_name: ed_signer.dns_record()})


@pytest.fixture
def fixed_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(dkim.time, "time", lambda: 1_795_000_000.0)
    yield


# --- The OpenSSL shim ----------------------------------------------------------------


def test_install_is_idempotent() -> None:
    dkim_crypto.install()
    dkim_crypto.install()
    assert dkim_crypto.is_installed()
    assert dkim.RSASSA_PKCS1_v1_5_sign is dkim_crypto.rsassa_pkcs1_v1_5_sign
    assert dkim.crypto.RSASSA_PKCS1_v1_5_verify is dkim_crypto.rsassa_pkcs1_v1_5_verify


@pytest.mark.parametrize("algorithm", [b"rsa-sha256", b"rsa-sha1"])
def test_shim_signatures_are_identical_to_dkimpy(
        rsa_key: rsa.RSAPrivateKey, fixed_time: None, monkeypatch: pytest.MonkeyPatch,
        algorithm: bytes) -> None:
    def sign() -> bytes:
        signature: bytes = dkim.sign(MESSAGE, b"sel", b"example.com", pem(rsa_key),
                                     signature_algorithm=algorithm,
                                     canonicalize=(b"relaxed", b"relaxed"))
        return signature

    ours = sign()
    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", dkim_crypto.PURE_PYTHON_SIGN)
    assert sign() == ours


def test_shim_accepts_pkcs1_pem_and_plain_dict_keys(rsa_key: rsa.RSAPrivateKey) -> None:
    pkcs1 = rsa_key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption())
    parsed = dkim_crypto.parse_pem_private_key(pkcs1)
    assert isinstance(parsed, dkim_crypto.RsaPrivateKey)
    assert parsed["modulus"] == rsa_key.public_key().public_numbers().n
    digest = hashlib.sha256(b"data")
    plain = dict(parsed)  # a key dict someone else built: keyed by its numbers
    assert (dkim_crypto.rsassa_pkcs1_v1_5_sign(digest, plain)
            == bytes(dkim_crypto.PURE_PYTHON_SIGN(digest, plain)))
    with pytest.raises(dkim.crypto.UnparsableKeyError):
        dkim_crypto.parse_pem_private_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END")


@pytest.mark.parametrize("bits", [512, 2048])
def test_shim_verification_agrees_with_dkimpy(rsa_key: rsa.RSAPrivateKey, bits: int) -> None:
    key = small_rsa_key() if bits == 512 else rsa_key
    private = dkim_crypto.parse_pem_private_key(pem(key))
    public = {"modulus": private["modulus"], "publicExponent": private["publicExponent"]}
    digest = hashlib.sha256(b"the signed headers")
    signature = dkim_crypto.rsassa_pkcs1_v1_5_sign(digest, private)
    other = hashlib.sha256(b"other headers")
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    for candidate, message_digest, expected in [
        (signature, digest, True),
        (b"\0" + signature, digest, True),  # leading zeros: dkimpy reads an integer
        (signature, other, False),
        (flipped, digest, False),
        (b"\x01" * 7, digest, False),
    ]:
        pure = dkim_crypto.PURE_PYTHON_VERIFY(message_digest, candidate, public)
        shim = dkim_crypto.rsassa_pkcs1_v1_5_verify(message_digest, candidate, public)
        assert pure == shim == expected


def test_shim_refuses_non_canonical_signature(rsa_key: rsa.RSAPrivateKey) -> None:
    # The documented difference: s + n is "valid" for dkimpy's arithmetic, not for RFC 8017.
    private = dkim_crypto.parse_pem_private_key(pem(rsa_key))
    public = {"modulus": private["modulus"], "publicExponent": private["publicExponent"]}
    digest = hashlib.sha256(b"x")
    signature = dkim_crypto.rsassa_pkcs1_v1_5_sign(digest, private)
    size = len(signature)
    forged = (int.from_bytes(signature, "big") + private["modulus"]).to_bytes(size + 1, "big")
    assert dkim_crypto.PURE_PYTHON_VERIFY(digest, forged, public)
    assert not dkim_crypto.rsassa_pkcs1_v1_5_verify(digest, forged, public)


_TEXT = st.binary(max_size=300).map(
    lambda b: bytes(b" \t\r\n a:\n"[x % 8] if x < 200 else x for x in b))


@given(_TEXT)
@settings(max_examples=300)
def test_fast_relaxed_body_is_dkimpys(body: bytes) -> None:
    assert dkim_crypto.relaxed_canonicalize_body(body) == dkim_crypto.PURE_RELAXED_BODY(body)


@given(_TEXT)
@settings(max_examples=300)
def test_fast_rfc822_parse_is_dkimpys(message: bytes) -> None:
    try:
        expected = dkim_crypto.PURE_RFC822_PARSE(message)
    except Exception as exc:
        with pytest.raises(type(exc)):
            dkim_crypto.rfc822_parse(message)
    else:
        assert dkim_crypto.rfc822_parse(message) == expected


# --- verify_dkim ---------------------------------------------------------------------


async def test_rsa_signature_passes(rsa_signer: DkimSigner, resolver: FakeResolver) -> None:
    signature = rsa_signer.sign(MESSAGE)
    [result] = await verify_dkim(signature + MESSAGE, resolver)
    b_value = dkim.util.parse_tag_value(signature.split(b":", 1)[1])[b"b"]
    assert result == DkimResult("pass", "example.com", "sel", "@example.com", "rsa-sha256",
                                2048, b"".join(b_value.split())[:8].decode(), "")
    assert resolver.queries == [("sel._domainkey.example.com", "TXT")]


async def test_ed25519_signature_passes(ed_signer: DkimSigner, resolver: FakeResolver) -> None:
    [result] = await verify_dkim(ed_signer.sign(MESSAGE) + MESSAGE, resolver)
    assert (result.result, result.algorithm, result.key_bits) == ("pass", "ed25519-sha256", 256)


async def test_unsigned_message_has_no_results(resolver: FakeResolver) -> None:
    assert await verify_dkim(MESSAGE, resolver) == []
    assert resolver.queries == []


@pytest.mark.parametrize("tamper", [
    pytest.param(lambda m: m.replace(b"numbers", b"Numbers"), id="body"),
    pytest.param(lambda m: m + b"P.S. wire the money\r\n", id="body-appended"),
    pytest.param(lambda m: m.replace(b"quarterly", b"annual"), id="subject"),
    pytest.param(lambda m: m.replace(b"To:", b"From: ceo@example.com\r\nTo:"), id="added-from"),
])
async def test_tampering_fails(rsa_signer: DkimSigner, ed_signer: DkimSigner,
                               resolver: FakeResolver, tamper: object) -> None:
    assert callable(tamper)
    signed = ed_signer.sign(MESSAGE) + rsa_signer.sign(MESSAGE) + MESSAGE
    results = await verify_dkim(tamper(signed), resolver)
    assert [r.result for r in results] == ["fail", "fail"]
    assert all("did not verify" in r.reason for r in results)


async def test_whitespace_changes_survive_relaxed(rsa_signer: DkimSigner,
                                                  resolver: FakeResolver) -> None:
    signed = rsa_signer.sign(MESSAGE) + MESSAGE
    rewrapped = signed.replace(b"Subject: quarterly", b"Subject:   quarterly").replace(
        b"are\tin.", b"are in.   ")
    [result] = await verify_dkim(rewrapped, resolver)
    assert result.result == "pass"


@pytest.mark.parametrize(("answer", "expected", "reason"), [
    (None, "permerror", "NXDOMAIN"),
    ("", "permerror", "no TXT record"),
    ("v=DKIM1; k=rsa; p=", "permerror", "revoked"),
    ("v=DKIM1; k=rsa; p=bm90IGEga2V5", "permerror", "bad key record"),
    ("v=DKIM1; p=abc; p=def", "permerror", "malformed key record"),
    (DnsTemporaryError("SERVFAIL"), "temperror", "SERVFAIL"),
    (DnsNameError("label too long"), "permerror", "not queryable"),
    (RuntimeError("resolver bug"), "temperror", "RuntimeError"),
])
async def test_key_record_problems(rsa_signer: DkimSigner, answer: str | BaseException | None,
                                   expected: str, reason: str) -> None:
    records: dict[str, str | BaseException] = {}
    if answer is not None:
        records[rsa_signer.record_name] = answer
    [result] = await verify_dkim(rsa_signer.sign(MESSAGE) + MESSAGE, FakeResolver(records))
    assert result.result == expected
    assert reason in result.reason
    assert (result.domain, result.selector) == ("example.com", "sel")


async def test_key_of_the_wrong_type_is_permerror(rsa_signer: DkimSigner,
                                                  ed_signer: DkimSigner) -> None:
    resolver = FakeResolver({rsa_signer.record_name: ed_signer.dns_record()})
    [result] = await verify_dkim(rsa_signer.sign(MESSAGE) + MESSAGE, resolver)
    assert result.result == "permerror"
    assert "does not fit" in result.reason


async def test_key_restrictions(rsa_signer: DkimSigner) -> None:
    record = rsa_signer.dns_record()
    signed = rsa_signer.sign(MESSAGE) + MESSAGE
    for extra, expected in [("; h=sha1", "permerror"), ("; s=tlsrpt", "permerror"),
                            ("; s=other", "permerror"), ("; h=sha1:sha256", "pass"),
                            ("; t=y", "pass")]:
        resolver = FakeResolver({rsa_signer.record_name: record + extra})
        [result] = await verify_dkim(signed, resolver)
        assert result.result == expected, (extra, result)
    assert "testing" in result.reason


async def test_rsa_sha1_never_passes(rsa_key: rsa.RSAPrivateKey, rsa_signer: DkimSigner,
                                     resolver: FakeResolver) -> None:
    signature = dkim.sign(MESSAGE, b"sel", b"example.com", pem(rsa_key),
                          signature_algorithm=b"rsa-sha1",
                          canonicalize=(b"relaxed", b"relaxed"))
    [result] = await verify_dkim(signature + MESSAGE, resolver)
    assert (result.result, result.algorithm) == ("policy", "rsa-sha1")
    assert "RFC 8301" in result.reason
    [tampered] = await verify_dkim(signature + MESSAGE.replace(b"Bob", b"Eve"), resolver)
    assert tampered.result == "fail"


async def test_short_rsa_key_never_passes() -> None:
    key = small_rsa_key(512)
    signature = dkim.sign(MESSAGE, b"weak", b"example.com", pem(key),
                          canonicalize=(b"relaxed", b"relaxed"))
    resolver = FakeResolver({"weak._domainkey.example.com": rsa_record(key)})
    [result] = await verify_dkim(signature + MESSAGE, resolver)
    assert (result.result, result.key_bits) == ("policy", 512)
    assert "1024" in result.reason


async def test_signature_problems_are_neutral(rsa_signer: DkimSigner,
                                              resolver: FakeResolver) -> None:
    good = rsa_signer.sign(MESSAGE)
    cases = {
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=sel\r\n": "missing",
        b"DKIM-Signature: this is not a tag list\r\n": "malformed tag list",
        good.replace(b"a=rsa-sha256", b"a=rsa-md5"): "unknown signature algorithm",
        good.replace(b"c=relaxed/relaxed", b"c=fancy/relaxed"): "c=",
        good.replace(b"i=@example.com", b"i=@evil.example"): "i= domain",
        good.replace(b"h=from : from", b"h=to : to"): "From not signed",
    }
    for field, reason in cases.items():
        [result] = await verify_dkim(field + MESSAGE, resolver)
        assert (result.result, reason in result.reason) == ("neutral", True), (field, result)


async def test_body_length_tag_is_accepted_and_noted(rsa_key: rsa.RSAPrivateKey,
                                                     resolver: FakeResolver) -> None:
    signature = dkim.sign(MESSAGE, b"sel", b"example.com", pem(rsa_key), length=True,
                          canonicalize=(b"relaxed", b"relaxed"))
    [result] = await verify_dkim(signature + MESSAGE + b"appended footer\r\n", resolver)
    assert result.result == "pass"
    assert "l=" in result.reason


async def test_signature_cap_prefers_the_from_domain(rsa_key: rsa.RSAPrivateKey,
                                                     rsa_signer: DkimSigner) -> None:
    key = pem(rsa_key)
    record = rsa_signer.dns_record()
    records: dict[str, str | BaseException] = {}
    fields = b""
    for n in range(6):  # six third-party signatures on top ...
        fields += dkim.sign(MESSAGE, f"s{n}".encode(), b"esp.example", key,
                            canonicalize=(b"relaxed", b"relaxed"))
        records[f"s{n}._domainkey.esp.example"] = record
    fields += rsa_signer.sign(MESSAGE)  # ... and the author domain's at the bottom
    records[rsa_signer.record_name] = record
    resolver = FakeResolver(records)
    results = await verify_dkim(fields + MESSAGE, resolver, max_signatures=3)
    assert [r.result for r in results] == ["pass", "pass", "policy", "policy", "policy",
                                           "policy", "pass"]
    assert results[-1].domain == "example.com"
    assert all("not evaluated" in r.reason for r in results[2:6])
    assert len(resolver.queries) == 3


async def test_same_key_is_looked_up_once(rsa_signer: DkimSigner,
                                          resolver: FakeResolver) -> None:
    signed = rsa_signer.sign(MESSAGE) + rsa_signer.sign(MESSAGE) + MESSAGE
    assert [r.result for r in await verify_dkim(signed, resolver)] == ["pass", "pass"]
    assert len(resolver.queries) == 1


async def test_big_messages_verify_in_a_thread(rsa_signer: DkimSigner, resolver: FakeResolver,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real = asyncio.to_thread

    async def spy(func: object, /, *args: object) -> object:
        calls.append(func)
        return await real(func, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "to_thread", spy)
    big = MESSAGE.replace(b"Alice\r\n", b"Alice\r\n" + b"filler line of text\r\n" * 15000)
    [result] = await verify_dkim(rsa_signer.sign(big) + big, resolver)
    assert result.result == "pass"
    assert len(calls) == 1
    [small] = await verify_dkim(rsa_signer.sign(MESSAGE) + MESSAGE, resolver)
    assert small.result == "pass"
    assert len(calls) == 1


async def test_lf_only_messages_verify(rsa_signer: DkimSigner, resolver: FakeResolver) -> None:
    lf = MESSAGE.replace(b"\r\n", b"\n")
    [result] = await verify_dkim(rsa_signer.sign(lf) + lf, resolver)
    assert result.result == "pass"


async def test_unparsable_header_is_permerror(resolver: FakeResolver) -> None:
    message = b" leading continuation\r\nDKIM-Signature: v=1\r\n\r\nbody\r\n"
    assert [r.result for r in await verify_dkim(message, resolver)] == ["permerror"]


@pytest.mark.skipif(shutil.which("opendkim-testmsg") is None, reason="no opendkim-testmsg")
def test_opendkim_signature_is_rsa_sha1_policy(rsa_key: rsa.RSAPrivateKey,
                                               tmp_path: Path) -> None:
    # A third-party signer: opendkim-testmsg signs rsa-sha1, relaxed/simple.
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem(rsa_key))
    signed = subprocess.run(["opendkim-testmsg", "-C", "-d", "example.com", "-s", "od",
                             "-k", str(key_file)], input=MESSAGE, capture_output=True,
                            check=True, timeout=10).stdout
    resolver = FakeResolver({"od._domainkey.example.com": rsa_record(rsa_key)})
    [result] = asyncio.run(verify_dkim(signed, resolver))
    assert result.algorithm == "rsa-sha1"
    assert result.result == "policy", result


# --- Never raises --------------------------------------------------------------------

_HEADERISH = st.lists(st.sampled_from([
    b"DKIM-Signature: ", b"v=1; ", b"a=rsa-sha256; ", b"a=ed25519-sha256; ", b"d=example.com; ",
    b"s=sel; ", b"h=from; ", b"bh=", b"b=", b"l=99999999999999999999; ", b"i=@a; ", b"c=x/y; ",
    b"=", b";", b":", b"\r\n", b"\n", b" ", b"\t", b"From: a@example.com\r\n", b"\r\n\r\n",
    b"\xff\xfe", b"\x00", b"AAAA", b"x=1; ", b"t=99999999999; ", b"q=dns/txt; ",
]), max_size=40).map(b"".join)


@given(header=_HEADERISH, body=st.binary(max_size=200), cap=st.integers(-1, 3))
@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_verification_never_raises(header: bytes, body: bytes, cap: int,
                                   rsa_signer: DkimSigner) -> None:
    resolver = FakeResolver({"sel._domainkey.example.com": rsa_signer.dns_record(),
                             "sel._domainkey.a": "p=!!; k=ed25519"})
    results = asyncio.run(verify_dkim(header + body, resolver, max_signatures=cap))
    assert all(isinstance(r, DkimResult) for r in results)
    assert all(r.result != "pass" for r in results)


@given(cut=st.integers(0, 10_000), junk=st.binary(min_size=1, max_size=8))
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_signatures_never_raise(cut: int, junk: bytes, rsa_signer: DkimSigner) -> None:
    signed = rsa_signer.sign(MESSAGE) + MESSAGE
    at = cut % len(signed)
    mutated = signed[:at] + junk + signed[at:]
    resolver = FakeResolver({rsa_signer.record_name: rsa_signer.dns_record()})
    results = asyncio.run(verify_dkim(mutated, resolver))
    assert all(isinstance(r, DkimResult) for r in results)
