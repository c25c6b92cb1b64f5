"""gateway.dkim_signer: what the signer signs, and that dkimpy and our verifier accept it."""

from __future__ import annotations

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from filters.dkim import verify_dkim
from filters.dns import DnsResult
from gateway.dkim_signer import DkimSigner, SigningError, arc_seal

MESSAGE = (
    b"Received: from client by submission\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: hello\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"Received: from laptop by client\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hi Bob.\r\n"
)


class FakeResolver:
    def __init__(self, records: dict[str, str]) -> None:
        self.records = records

    async def query(self, name: str, rdtype: str) -> DnsResult:
        found = self.records.get(name)
        return DnsResult(name, rdtype, (found,) if found else (), nxdomain=found is None)


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
        form: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


@pytest.fixture(scope="module")
def rsa_pem() -> bytes:
    return pem(rsa.generate_private_key(65537, 2048))


@pytest.fixture(scope="module")
def signers(rsa_pem: bytes) -> dict[str, DkimSigner]:
    return {"rsa": DkimSigner(rsa_pem, "s1", "example.com"),
            "ed25519": DkimSigner(pem(ed25519.Ed25519PrivateKey.generate()).decode(),
                                  "s2", "Example.COM")}


def tags(field: bytes) -> dict[bytes, bytes]:
    parsed: dict[bytes, bytes] = dkim.util.parse_tag_value(field.split(b":", 1)[1])
    return parsed


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
async def test_signatures_verify_with_dkimpy_and_ours(signers: dict[str, DkimSigner],
                                                      kind: str) -> None:
    signer = signers[kind]
    field = signer.sign(MESSAGE)
    assert field.startswith(b"DKIM-Signature: ") and field.endswith(b"\r\n")
    assert b"\n" not in field.replace(b"\r\n", b"")
    record = signer.dns_record()
    assert dkim.verify(field + MESSAGE, dnsfunc=lambda name, timeout=5: record.encode())
    resolver = FakeResolver({signer.record_name: record})
    [result] = await verify_dkim(field + MESSAGE, resolver)
    assert (result.result, result.algorithm, result.key_bits) == (
        "pass", signer.algorithm, signer.key_bits)


def test_signature_tags(signers: dict[str, DkimSigner]) -> None:
    found = tags(signers["ed25519"].sign(MESSAGE))
    assert found[b"a"] == b"ed25519-sha256"
    assert found[b"c"] == b"relaxed/relaxed"
    assert (found[b"d"], found[b"s"], found[b"i"]) == (b"example.com", b"s2", b"@example.com")
    assert b"l" not in found and b"x" not in found
    signed = [h.strip() for h in found[b"h"].split(b":")]
    # present fields once per occurrence, From once more; absent and trace fields never
    assert sorted(signed) == sorted([b"from", b"from", b"to", b"subject", b"date",
                                     b"message-id"])


def test_record_and_name(signers: dict[str, DkimSigner]) -> None:
    assert signers["rsa"].record_name == "s1._domainkey.example.com"
    assert signers["rsa"].dns_record().startswith("v=DKIM1; k=rsa; p=MIIBIjAN")
    assert signers["ed25519"].record_name == "s2._domainkey.example.com"
    assert signers["ed25519"].dns_record().startswith("v=DKIM1; k=ed25519; p=")


async def test_oversigned_from_cannot_be_added_but_cc_can(
        signers: dict[str, DkimSigner]) -> None:
    signer = signers["rsa"]
    signed = signer.sign(MESSAGE) + MESSAGE
    resolver = FakeResolver({signer.record_name: signer.dns_record()})
    with_cc = signed.replace(b"X-Mailer:", b"Cc: carol@example.org\r\nX-Mailer:")
    with_from = signed.replace(b"X-Mailer:", b"From: mallory@example.com\r\nX-Mailer:")
    assert [r.result for r in await verify_dkim(with_cc, resolver)] == ["pass"]
    assert [r.result for r in await verify_dkim(with_from, resolver)] == ["fail"]


async def test_custom_headers_identity_and_lf_messages(rsa_pem: bytes) -> None:
    signer = DkimSigner(rsa_pem, "s1", "example.com", headers=["From", "Subject", "X-Mailer"],
                        oversign=["from", "subject"], identity="alice@mail.example.com")
    lf = MESSAGE.replace(b"\r\n", b"\n")
    field = signer.sign(lf)
    assert field.endswith(b"\n") and b"\r" not in field
    found = tags(field)
    assert sorted(h.strip() for h in found[b"h"].split(b":")) == [
        b"from", b"from", b"subject", b"subject", b"x-mailer"]
    assert found[b"i"] == b"alice@mail.example.com"
    resolver = FakeResolver({signer.record_name: signer.dns_record()})
    assert [r.result for r in await verify_dkim(field + lf, resolver)] == ["pass"]


def test_pkcs1_rsa_keys_are_accepted() -> None:
    key = rsa.generate_private_key(65537, 1024)
    signer = DkimSigner(pem(key, serialization.PrivateFormat.TraditionalOpenSSL), "k", "a.example")
    assert (signer.algorithm, signer.key_bits) == ("rsa-sha256", 1024)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: pem(ec.generate_private_key(ec.SECP256R1())), "unsupported key type"),
    (lambda: b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n", "unreadable"),
])
def test_unusable_keys_are_refused(make: object, message: str) -> None:
    assert callable(make)
    with pytest.raises(SigningError, match=message):
        DkimSigner(make(), "s", "example.com")


def test_bad_parameters_are_refused(rsa_pem: bytes) -> None:
    with pytest.raises(SigningError, match="selector"):
        DkimSigner(rsa_pem, "bad;selector", "example.com")
    with pytest.raises(SigningError, match="cannot include"):
        DkimSigner(rsa_pem, "s", "example.com", headers=["from", "received"])
    with pytest.raises(SigningError, match="From must be signed"):
        DkimSigner(rsa_pem, "s", "example.com", headers=["subject"], oversign=())
    with pytest.raises(SigningError, match="identity"):
        DkimSigner(rsa_pem, "s", "example.com", identity="a@example.org")


def test_message_without_from_is_refused(signers: dict[str, DkimSigner]) -> None:
    with pytest.raises(SigningError, match="no From"):
        signers["rsa"].sign(b"Subject: x\r\n\r\nbody\r\n")


def test_arc_seal_fields(rsa_pem: bytes) -> None:
    message = b"Authentication-Results: someone.else; dkim=fail\r\n" + MESSAGE
    fields = arc_seal(message, rsa_pem, "arc", "fwd.example", "mx.fwd.example",
                      "spf=pass smtp.mailfrom=example.com; dkim=pass header.d=example.com",
                      timestamp=1_795_000_000)
    assert [f.split(b":", 1)[0] for f in fields] == [
        b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results"]
    seal, ams = tags(fields[0]), tags(fields[1])
    assert (seal[b"i"], seal[b"cv"], seal[b"d"], seal[b"t"]) == (
        b"1", b"none", b"fwd.example", b"1795000000")
    assert b"h" not in seal and ams[b"c"] == b"relaxed/relaxed"
    assert fields[2].startswith(b"ARC-Authentication-Results: i=1; mx.fwd.example;")
    assert b"spf=pass" in fields[2] and b"someone.else" not in fields[2]


def test_arc_seal_refuses_what_it_cannot_do(rsa_pem: bytes) -> None:
    ed = pem(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(SigningError, match="RSA-SHA256 only"):
        arc_seal(MESSAGE, ed, "arc", "fwd.example", "mx.fwd.example", "dkim=pass")
    with pytest.raises(SigningError, match="authserv-id"):
        arc_seal(MESSAGE, rsa_pem, "arc", "fwd.example", "mx fwd", "dkim=pass")
    with pytest.raises(SigningError, match="cv should be none"):
        arc_seal(MESSAGE, rsa_pem, "arc", "fwd.example", "mx.fwd.example", "arc=pass")
