"""DKIM verification with filters.dkim_crypto's fast paths decides exactly as dkimpy does.

filters.dkim verifies through dkimpy's `DKIM.verify`, with some of dkimpy's functions
replaced by exact faster ones (`dkim_crypto.install()`): the message parser, relaxed
header and body canonicalisation, the b= removal regex and the tag-list parser. Each is
compared with dkimpy's original on arbitrary input here, and the whole verification is
compared end to end: `verify_dkim` with the replacements and with dkimpy as shipped
must return equal results (outcome, tags, reason text) for signed messages and for any
mutation of them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import dkim
import dkim.canonicalization
import dkim.util
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

import filters.dkim
from filters import dkim_crypto
from filters.dkim import DkimResult, verify_dkim
from filters.dns import DnsResult
from gateway.dkim_signer import DkimSigner


class FakeResolver:
    def __init__(self, records: dict[str, str]) -> None:
        self.records = records

    async def query(self, name: str, rdtype: str) -> DnsResult:
        found = self.records.get(name)
        return DnsResult(name, rdtype, (found,) if found else (), nxdomain=found is None)


@contextlib.contextmanager
def dkimpy_as_shipped() -> Iterator[None]:
    """dkimpy's own parser, canonicalisation, b= regex and tag parser (RSA stays in
    OpenSSL: tests/unit/test_dkim.py compares that part)."""
    relaxed = dkim.canonicalization.Relaxed
    saved = (dkim.rfc822_parse, dkim.RE_BTAG, dkim.parse_tag_value, dkim.util.parse_tag_value,
             filters.dkim.parse_tag_value, relaxed.__dict__["canonicalize_body"],
             relaxed.__dict__["canonicalize_headers"])
    dkim.rfc822_parse = dkim_crypto.PURE_RFC822_PARSE
    dkim.RE_BTAG = dkim_crypto.PURE_RE_BTAG
    dkim.parse_tag_value = dkim.util.parse_tag_value = dkim_crypto.PURE_PARSE_TAG_VALUE
    filters.dkim.parse_tag_value = dkim_crypto.PURE_PARSE_TAG_VALUE  # type: ignore[attr-defined]
    relaxed.canonicalize_body = staticmethod(dkim_crypto.PURE_RELAXED_BODY)
    relaxed.canonicalize_headers = staticmethod(dkim_crypto.PURE_RELAXED_HEADERS)
    try:
        yield
    finally:
        (dkim.rfc822_parse, dkim.RE_BTAG, dkim.parse_tag_value, dkim.util.parse_tag_value,
         filters.dkim.parse_tag_value, relaxed.canonicalize_body,  # type: ignore[attr-defined]
         relaxed.canonicalize_headers) = saved
        assert dkim_crypto.is_installed()


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


RSA_PEM = pem(rsa.generate_private_key(65537, 2048))
RSA = DkimSigner(RSA_PEM, "sel", "example.com")
ED = DkimSigner(pem(ed25519.Ed25519PrivateKey.generate()), "ed", "example.com")
RESOLVER = FakeResolver({RSA.record_name: RSA.dns_record(), ED.record_name: ED.dns_record()})

MESSAGES = [
    b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: quarterly report\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <r1@example.com>\r\n\r\n"
    b"Hello Bob,\r\n\r\nthe numbers  are\tin.\r\n\r\n-- \r\nAlice\r\n",
    b"From: a@example.com\nSubject:  folded\n\tline  \nTo: b@example.org\n\nbody \nmore\n\n",
    b"From: a@example.com\r\nCc: x\r\ncc: y\r\nSubject: s\r\n\r\n"
    + b"a line of text, as usual\r\n" * 200,
    b"From: a@example.com\r\nSubject: empty\r\n\r\n",
]


def dkimpy_signed(message: bytes, canonicalize: tuple[bytes, bytes], length: bool) -> bytes:
    """A signature as other signers make them: any c=, l= (dkimpy, RSA)."""
    signature: bytes = dkim.sign(message, b"sel", b"example.com", RSA_PEM,
                                 canonicalize=canonicalize, length=length,
                                 include_headers=[b"from", b"subject", b"to", b"cc", b"from"])
    return signature


SIGNINGS = ["rsa", "ed25519", "simple/simple", "relaxed/simple", "simple/relaxed",
            "relaxed/relaxed l="]


def signed(message: bytes, how: str) -> bytes:
    if how == "rsa":
        return RSA.sign(message) + message
    if how == "ed25519":
        return ED.sign(message) + message
    canon, _, length = how.partition(" ")
    header, body = canon.encode().split(b"/")
    return dkimpy_signed(message, (header, body), bool(length)) + message


def both_ways(message: bytes) -> tuple[list[DkimResult], list[DkimResult]]:
    fast = asyncio.run(verify_dkim(message, RESOLVER))
    with dkimpy_as_shipped():
        reference = asyncio.run(verify_dkim(message, RESOLVER))
    return fast, reference


@pytest.mark.parametrize("how", SIGNINGS)
@pytest.mark.parametrize("index", range(len(MESSAGES)))
def test_signed_messages_pass_both_ways(index: int, how: str) -> None:
    fast, reference = both_ways(signed(MESSAGES[index], how))
    assert fast == reference
    assert [r.result for r in fast] == ["pass"]


_JUNK = st.lists(st.sampled_from([
    b" ", b"\t", b"  ", b"\r\n", b"\n", b"\r", b"\r\n ", b"x", b"b=", b";", b"=", b":",
    b"\r\n\r\n", b"From: m@example.com\r\n", b"DKIM-Signature: v=1; b=\r\n", b"A", b"\xff",
]), min_size=1, max_size=4).map(b"".join)


@given(index=st.integers(0, len(MESSAGES) - 1), how=st.sampled_from(SIGNINGS),
       cut=st.integers(0, 100_000), junk=_JUNK, drop=st.integers(0, 3))
@settings(max_examples=400, deadline=None)
def test_any_mutation_gets_dkimpys_result(index: int, how: str, cut: int, junk: bytes,
                                          drop: int) -> None:
    message = signed(MESSAGES[index], how)
    at = cut % (len(message) + 1)
    fast, reference = both_ways(message[:at] + junk + message[at + drop:])
    assert fast == reference


# --- Each replacement against dkimpy's function -----------------------------------------

_BTAG_TEXT = st.lists(st.sampled_from([
    b";", b"b", b"=", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n ", b"a", b"Z", b"0", b"+",
    b"/", b":", b"\x0b", b"b=", b"; b=", b"bh=", b"\xff",
]), max_size=40).map(b"".join)


@given(_BTAG_TEXT)
@settings(max_examples=1000)
def test_b_tag_removal_is_dkimpys(text: bytes) -> None:
    assert dkim_crypto.RE_BTAG.sub(b"\\1", text) == dkim_crypto.PURE_RE_BTAG.sub(b"\\1", text)


def test_b_tag_removal_of_real_fields() -> None:
    for how in SIGNINGS:
        field = signed(MESSAGES[0], how).split(b"\r\n\r\n")[0]
        value = field.split(b":", 1)[1]
        assert dkim_crypto.RE_BTAG.sub(b"\\1", value) == dkim_crypto.PURE_RE_BTAG.sub(b"\\1",
                                                                                     value)


_TAGS = st.lists(st.sampled_from([
    b"a", b"Z", b"0", b"_", b"-", b";", b"=", b" ", b"\t", b"\r\n", b"v=1", b"; ", b"\xff",
    b"b", b"h=from:to",
]), max_size=20).map(b"".join)


@given(_TAGS)
@settings(max_examples=1000)
def test_tag_list_parser_is_dkimpys(text: bytes) -> None:
    try:
        expected = dkim_crypto.PURE_PARSE_TAG_VALUE(text)
    except Exception as exc:
        with pytest.raises(type(exc)) as raised:
            dkim_crypto.parse_tag_value(text)
        assert raised.value.args == exc.args
    else:
        assert dkim_crypto.parse_tag_value(text) == expected


_FIELD_VALUE = st.binary(max_size=60).map(
    lambda b: bytes(b" \t\r\n\x0b\x0ca:"[x % 8] if x < 180 else x for x in b))


@given(st.lists(st.tuples(st.sampled_from([b"From", b"x-Y", b"SUBJECT"]), _FIELD_VALUE),
                max_size=5))
@settings(max_examples=500)
def test_relaxed_headers_are_dkimpys(headers: list[tuple[bytes, bytes]]) -> None:
    assert (dkim_crypto.relaxed_canonicalize_headers(headers)
            == dkim_crypto.PURE_RELAXED_HEADERS(headers))
