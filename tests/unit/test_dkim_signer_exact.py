"""gateway.dkim_signer signs by itself: byte-for-byte what dkimpy signs, and dkimpy verifies it.

The reference is what `DkimSigner.sign` did before it stopped going through dkimpy:
`dkim.DKIM(message).sign(...)` with the same selector, domain, key, identity, t= and h=
list, relaxed/relaxed, line ending chosen the same way. dkimpy runs with its own message
parser and body canonicalisation (not the fast ones from filters.dkim_crypto, which the
signer now shares), so the comparison is against dkimpy's code, not against ours. RSA
PKCS#1 v1.5 and Ed25519 signatures are deterministic, so equal input gives equal bytes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import dkim
import dkim.canonicalization
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from filters import dkim_crypto
from gateway import dkim_signer
from gateway.dkim_signer import DEFAULT_HEADERS, DEFAULT_OVERSIGN, DkimSigner, SigningError

WHEN = 1_795_000_000


@dataclass(frozen=True)
class Config:
    """One signer configuration: DkimSigner's parameters."""

    selector: str = "s1"
    domain: str = "example.com"
    headers: tuple[str, ...] = DEFAULT_HEADERS
    oversign: tuple[str, ...] = DEFAULT_OVERSIGN
    identity: str | None = None
    label: str = field(default="default", compare=False)
    #: dkimpy verifies what it signs (False: see the "long" configuration)
    verifiable: bool = field(default=True, compare=False)


CONFIGS = [
    Config(),
    Config(headers=("From", "Subject", "X-Mailer", "Cc", "To"), oversign=("from", "subject", "cc"),
           identity="alice.b@mail.example.com", label="custom"),
    # Tokens longer than a line: dkimpy's fold breaks them mid-token (adding a space that
    # relaxed canonicalisation keeps in the signed copy). dkimpy's verifier then reads
    # d= (or a field name in h=) with the fold in it and fails; so did the signatures of
    # the old signer.
    Config(selector="s" * 60, domain="d" * 62 + "." + "e" * 62 + ".example",
           headers=(*DEFAULT_HEADERS, "x-" + "h" * 80),
           identity="x" * 40 + "@" + "d" * 62 + "." + "e" * 62 + ".example", label="long",
           verifiable=False),
    Config(headers=("from", "x-b", "b", "references"), oversign=("b",), label="odd names"),
]


class Keys:
    """One RSA-2048 and one Ed25519 key: PEM for DkimSigner, dkimpy's forms for dkimpy."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(65537, 2048)
        self.ed = ed25519.Ed25519PrivateKey.generate()

    def pem(self, kind: str) -> bytes:
        key = self.rsa if kind == "rsa" else self.ed
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def for_dkimpy(self, kind: str) -> bytes:
        if kind == "rsa":
            return self.pem(kind)
        seed = self.ed.private_bytes(serialization.Encoding.Raw,
                                     serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
        return base64.b64encode(seed)  # dkimpy hands it to PyNaCl


KEYS = Keys()
SIGNERS = {(kind, config): DkimSigner(KEYS.pem(kind), config.selector, config.domain,
                                      headers=config.headers, oversign=config.oversign,
                                      identity=config.identity)
           for kind in ("rsa", "ed25519") for config in CONFIGS}


@contextlib.contextmanager
def pure_dkimpy(now: float) -> Iterator[None]:
    """dkimpy as shipped (its parser and relaxed body), with time.time() fixed."""
    relaxed = dkim.canonicalization.Relaxed
    saved = dkim.rfc822_parse, relaxed.__dict__["canonicalize_body"], time.time
    dkim.rfc822_parse = dkim_crypto.PURE_RFC822_PARSE
    relaxed.canonicalize_body = staticmethod(dkim_crypto.PURE_RELAXED_BODY)
    time.time = lambda: now  # dkimpy's t= is int(time.time())
    try:
        yield
    finally:
        dkim.rfc822_parse, relaxed.canonicalize_body, time.time = saved


def old_header_list(headers: Iterable[list[bytes]], sign: Iterable[str],
                    oversign: Iterable[str]) -> list[bytes]:
    """h= as DkimSigner listed it before (copied from the old gateway/dkim_signer.py)."""
    sign = tuple(dict.fromkeys(n.strip().lower() for n in sign))
    oversign = tuple(dict.fromkeys(n.strip().lower() for n in oversign))
    present: dict[str, int] = {}
    for name, _ in headers:
        key = name.decode("ascii", "replace").strip().lower()
        present[key] = present.get(key, 0) + 1
    if not present.get("from"):
        raise SigningError("no From")
    listed: list[bytes] = []
    for name in dict.fromkeys((*sign, *oversign)):
        count = present.get(name, 0) + (1 if name in oversign else 0)
        listed.extend([name.encode("ascii")] * count)
    return listed


def dkimpy_sign(kind: str, config: Config, message: bytes) -> bytes:
    """The old DkimSigner.sign, through dkimpy; SigningError where it failed (IndexError
    included: dkimpy's parser raised it for a continuation line before any field)."""
    signer = SIGNERS[kind, config]
    newline = message.find(b"\n")
    linesep = b"\n" if newline >= 0 and message[newline - 1:newline] != b"\r" else b"\r\n"
    with pure_dkimpy(WHEN):
        try:
            dk = dkim.DKIM(message, signature_algorithm=signer.algorithm.encode(),
                           linesep=linesep)
            include = old_header_list(dk.headers, config.headers, config.oversign)
            identity = None
            if config.identity is not None:
                local, _, auid = config.identity.rpartition("@")
                identity = local.encode() + b"@" + auid.lower().encode()
            signature: bytes = dk.sign(config.selector.encode(), config.domain.lower().encode(),
                                       KEYS.for_dkimpy(kind), identity=identity,
                                       canonicalize=(b"relaxed", b"relaxed"),
                                       include_headers=include)
        except (dkim.DKIMException, IndexError) as exc:
            raise SigningError(str(exc)) from None
    return signature


def assert_same_as_dkimpy(kind: str, config: Config, message: bytes) -> bytes | None:
    """Our field equals dkimpy's (or both refuse), and dkimpy verifies ours."""
    signer = SIGNERS[kind, config]
    try:
        expected = dkimpy_sign(kind, config, message)
    except SigningError:
        with pytest.raises(SigningError):
            signer.sign(message, timestamp=WHEN)
        return None
    ours = signer.sign(message, timestamp=WHEN)
    assert ours == expected
    if config.verifiable:
        record = signer.dns_record().encode()
        assert dkim.verify(ours + message, dnsfunc=lambda name, timeout=5: record)
    return ours


# --- Table: the cases that matter, by name --------------------------------------------

HEAD = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
        b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <m1@example.com>\r\n")

MESSAGES = {
    "plain": HEAD + b"\r\nHi Bob.\r\n",
    "empty body": HEAD + b"\r\n",
    "no body at all": HEAD,
    "no final newline": HEAD.rstrip(b"\r\n"),
    "body without final CRLF": HEAD + b"\r\nHi Bob.",
    "body without final CRLF, trailing WSP": HEAD + b"\r\nHi Bob. \t ",
    "trailing empty lines": HEAD + b"\r\nHi\r\n\r\n\r\n\r\n",
    "only empty lines": HEAD + b"\r\n\r\n\r\n\r\n",
    "only WSP lines": HEAD + b"\r\n \r\n\t\r\n  \t \r\n",
    "leading empty line": HEAD + b"\r\n\r\nHi\r\n",
    "leading WSP line": HEAD + b"\r\n \r\nHi\r\n",
    "WSP runs": HEAD + b"\r\nthe  numbers\tare \t in.  \r\n\tindented\r\n  twice\r\n",
    "trailing WSP": HEAD + b"\r\nline \r\nline\t\r\nline \t \r\nend\r\n",
    "bare LF everywhere": (HEAD + b"\r\nHi\r\n\r\n-- \r\nme\r\n").replace(b"\r\n", b"\n"),
    "bare LF in the body": HEAD + b"\r\nHi\nthere \nyou\r\n\n\n",
    "bare LF header, CRLF body": HEAD.replace(b"\r\n", b"\n") + b"\nHi\r\nthere\r\n",
    "lone CR": HEAD + b"\r\nHi\rthere \r\r\nx\r\r\n\r\r\n",
    "lone CR in a header": HEAD + b"X-CR: a\rb \r\r\n\r\nHi\r\n",
    "folded headers": (b"From: Alice\r\n  <alice@example.com>\r\nTo: a@example.org,\r\n\t"
                       b"b@example.org\r\nSubject:  many\t \r\n   words   here \r\n\r\nx\r\n"),
    "repeated fields": (b"To: one\r\nFrom: a@example.com\r\nTo: two\r\nSubject: s\r\n"
                        b"To: three\r\nCC: c1\r\ncc: c2\r\nX-Mailer: m\r\nx-mailer: n\r\n"
                        b"\r\nbody\r\n"),
    "two From": b"From: a@example.com\r\nFrom: b@example.com\r\n\r\nbody\r\n",
    "only From": b"From: a@example.com\r\n\r\nbody\r\n",
    "From without value": b"From:\r\n\r\nbody\r\n",
    "mbox separator": b"From alice Mon Nov 23 10:00:00 2026\r\n" + HEAD + b"\r\nHi\r\n",
    "names in any case": b"FROM: a@example.com\r\nsUbJeCt: s\r\nMESSAGE-ID: <x>\r\n\r\nb\r\n",
    "odd names": (b"From: a@example.com\r\nB: one\r\nx-b: two\r\nX-" + b"H" * 80
                  + b": three\r\nReferences: <r>\r\n\r\nb\r\n"),
    "ends of values": b"From: \x0b a@example.com \x0c\r\nSubject:\t\r\n\r\nbody\r\n",
    "8-bit": b"From: \xc3\xa9l\xc3\xa8ve <e@example.com>\r\nSubject: \xff\r\n\r\n\xc3\xa9\xff\r\n",
    "NUL bytes": HEAD + b"\r\na\x00b\r\n\x00\r\n",
    "long header": HEAD + b"Subject: " + b"word " * 200 + b"\r\n\r\nb\r\n",
    "big body": HEAD + b"\r\n" + b"a line of text like any other, more or less\r\n" * 900,
    "big body, one double space at the end": (HEAD + b"\r\n" + b"text text\r\n" * 5000
                                              + b"end  end\r\n"),
    "big body, one trailing space at the end": (HEAD + b"\r\n" + b"text text\r\n" * 5000
                                                + b"end \r\n"),
    "big body, one bare LF at the end": HEAD + b"\r\n" + b"text text\r\n" * 5000 + b"end\n",
    # refused by both
    "no From": b"Subject: x\r\n\r\nbody\r\n",
    "empty message": b"",
    "only a blank line": b"\r\nbody\r\n",
    "not a header": b"From: a@example.com\r\nthis is not a header\r\n\r\nbody\r\n",
    "continuation first": b" folded\r\nFrom: a@example.com\r\n\r\nbody\r\n",
}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@pytest.mark.parametrize("name", list(MESSAGES))
def test_signature_is_dkimpys(kind: str, config: Config, name: str) -> None:
    assert_same_as_dkimpy(kind, config, MESSAGES[name])


def test_default_timestamp_is_now(monkeypatch: pytest.MonkeyPatch) -> None:
    signer = SIGNERS["ed25519", CONFIGS[0]]
    monkeypatch.setattr(time, "time", lambda: WHEN + 0.9)
    assert signer.sign(MESSAGES["plain"]) == dkimpy_sign("ed25519", CONFIGS[0],
                                                         MESSAGES["plain"])


def test_line_ending_follows_the_header() -> None:
    for kind in ("rsa", "ed25519"):
        signer = SIGNERS[kind, CONFIGS[0]]
        crlf = signer.sign(MESSAGES["plain"])
        lf = signer.sign(MESSAGES["bare LF everywhere"])
        assert crlf.count(b"\r\n") >= 3 and crlf.endswith(b"\r\n")
        assert b"\r" not in lf and lf.count(b"\n") >= 3


def test_refusals_are_signing_errors() -> None:
    signer = SIGNERS["rsa", CONFIGS[0]]
    with pytest.raises(SigningError, match="no From"):
        signer.sign(MESSAGES["no From"])
    with pytest.raises(SigningError, match="not signable: Unexpected characters"):
        signer.sign(MESSAGES["not a header"])
    # dkimpy's parser raised IndexError here, which came out of sign() as is
    with pytest.raises(SigningError, match="continuation line before the first"):
        signer.sign(MESSAGES["continuation first"])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"identity": "a;b@example.com"}, "identity local part"),
    ({"identity": "a=b@example.com"}, "identity local part"),
    ({"identity": "a b@example.com"}, "identity local part"),
    ({"headers": ["from", "x=y"]}, "cannot include"),
    ({"headers": ["from", "x;y"]}, "cannot include"),
    ({"headers": ["from", "x\ry"]}, "cannot include"),
    ({"oversign": ["from", "b="]}, "cannot include"),
])
def test_values_that_cannot_be_tag_values_are_refused(kwargs: dict[str, object],
                                                       match: str) -> None:
    with pytest.raises(SigningError, match=match):
        DkimSigner(KEYS.pem("rsa"), "s", "example.com", **kwargs)  # type: ignore[arg-type]


# --- Properties: arbitrary messages ----------------------------------------------------

_NAMES = st.sampled_from([b"From", b"from", b"FROM", b"To", b"Subject", b"Cc", b"cc", b"Date",
                          b"Message-ID", b"Reply-To", b"X-Mailer", b"Received", b"B", b"X-B",
                          b"MIME-Version", b"Content-Type", b"References", b"DKIM-Signature"])
_VALUE = st.lists(st.sampled_from([
    b" ", b"\t", b"  ", b"a", b"word", b"b=", b":", b";", b"\r", b"\x0b", b"\x0c", b"\xc3\xa9",
    b"x y", b"\r\n ", b"\r\n\t", b"\n ", b"\r\n  \t", b"<a@example.com>",
]), max_size=12).map(b"".join)
_EOL = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])
_FIELD = st.tuples(_NAMES, _VALUE, _EOL).map(lambda f: f[0] + b":" + f[1] + f[2])
_BODY = st.lists(st.sampled_from([
    b"a", b"b c", b"word", b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\r\n", b"\r\n", b"\n",
    b"\r", b" \r\n", b"\t\r\n", b"\r\n\r\n", b"\xff", b"\x00", b"From x", b"\x0b",
]), max_size=40).map(b"".join)
_MESSAGE = st.tuples(
    st.lists(_FIELD, max_size=8),
    st.sampled_from([b"\r\n", b"\r\n", b"\n", b""]),
    _BODY,
).map(lambda m: b"".join(m[0]) + m[1] + m[2])
_WITH_FROM = st.tuples(st.sampled_from([b"From: a@example.com\r\n", b"from:x\n", b"FROM: \t\r\n"]),
                       _MESSAGE).map(b"".join)


@given(message=_MESSAGE | _WITH_FROM, kind=st.sampled_from(["rsa", "ed25519"]),
       config=st.sampled_from(CONFIGS))
@settings(max_examples=400, deadline=None)
def test_any_message_signs_as_dkimpy_signs_it(message: bytes, kind: str,
                                             config: Config) -> None:
    assert_same_as_dkimpy(kind, config, message)


_RAW = st.binary(max_size=300).map(
    lambda b: bytes(b" \t\r\n a:\n\r"[x % 9] if x < 200 else x for x in b))


@given(message=st.tuples(st.sampled_from([b"From: a\r\n", b"From: a\n", b""]), _RAW)
       .map(b"".join))
@settings(max_examples=300, deadline=None)
def test_any_bytes_sign_as_dkimpy_signs_them(message: bytes) -> None:
    assert_same_as_dkimpy("ed25519", CONFIGS[0], message)


# --- The pieces, each against dkimpy's own function ------------------------------------


@given(prefix=st.sampled_from([b"", b"From: a\r\n", b"From: a\n", b"A: b\r\n\r\n", b"A: b\n\n"]),
       body=_RAW | _BODY)
@settings(max_examples=500)
def test_relaxed_body_hash_is_dkimpys(prefix: bytes, body: bytes) -> None:
    message = prefix + body
    try:
        _, parsed = dkim_crypto.PURE_RFC822_PARSE(message)
    except Exception:
        return  # no body to speak of: the header block is not one
    _, start = dkim_crypto.split_message(message)
    expected = hashlib.sha256(dkim_crypto.PURE_RELAXED_BODY(parsed)).digest()
    assert dkim_crypto.relaxed_body_sha256(message, start) == expected


@given(value=st.binary(max_size=80).map(
    lambda b: bytes(b" \t\r\n\x0b\x0ca:"[x % 8] if x < 180 else x for x in b)))
@settings(max_examples=500)
def test_relaxed_header_value_is_dkimpys(value: bytes) -> None:
    [(_, expected)] = dkim.canonicalization.Relaxed.canonicalize_headers([(b"X", value)])
    assert dkim_crypto.relaxed_header_value(value) + b"\r\n" == expected


@given(value=st.lists(st.sampled_from([b"a", b"bcd", b"x" * 30, b" ", b"; ", b"\r\n",
                                       b"\r\n ", b"=="]), max_size=60).map(b"".join),
       name_length=st.integers(0, 30), linesep=st.sampled_from([b"\r\n", b"\n"]))
@settings(max_examples=500)
def test_fold_is_dkimpys(value: bytes, name_length: int, linesep: bytes) -> None:
    assert (dkim_signer._fold(value, name_length, linesep)
            == dkim.fold(value, namelen=name_length, linesep=linesep))
