"""DKIM signing (RFC 6376, RSA-SHA256 and Ed25519-SHA256 per RFC 8463) and ARC sealing.

Theory of operation
-------------------
A `DkimSigner` is built once per (domain, selector, key) — keys arrive as PEM (PKCS#8,
or PKCS#1 for RSA) like the tenant API's `DkimKey.private_key` — and then signs any
number of messages; it is immutable and safe to share between tasks and threads.
Construction loads the key with `cryptography` (cached per PEM: loading checks an RSA
key, ~10 ms; building a signer again for the same key is cheap), picks the algorithm
from the key type, refuses RSA keys under 1024 bits (RFC 8301 §3.2), and prepares
everything that does not depend on the message (the tags up to t=).

`sign(message)` returns the DKIM-Signature field (name, folded value and line ending
matching the message's own: CRLF unless the header uses bare LF) to prepend. The
signature is relaxed/relaxed, i= is "@" + d= unless configured, t= is the signing time,
no l= and no x=. h= lists each configured header field once per occurrence in the
message, plus one more for each field in `oversign` (From by default): signing one
instance more than present makes an added From (or whatever else is oversigned) break
the signature (RFC 6376 §8.15). Fields absent from the message are not listed (except
the oversigned ones), so intermediaries that add a Cc or Reply-To do not break it
either way.

`sign` does the RFC 6376 work itself rather than through dkimpy's `DKIM.sign`, whose
fixed costs (object construction, parsing and canonicalising every header field,
regex-based b= removal) and body passes were most of a signature apart from the private
key operation. The steps, each producing exactly the bytes dkimpy 1.1.8 produces:

1. Split header block and body where dkimpy's parser does (`filters.dkim_crypto.
   split_message`) and parse only the header block (`parse_header_block`).
2. h= from the fields present (`_header_list`); the instances hashed are picked bottom
   up (RFC 6376 §5.4.2, `_select`) and only those are canonicalised (§3.4.2).
3. bh=: `dkim_crypto.relaxed_body_sha256` proves in three cheap scans that the body is
   already canonical but for trailing empty lines and hashes it in place; any other body
   (tabs, WSP runs, trailing WSP, bare LF) goes through the exact general passes.
4. The field itself is folded as dkimpy folds it (`_fold`, a port of dkimpy's `fold`,
   which can put a space inside an over-long token that relaxed canonicalisation keeps),
   canonicalised with an empty b= and hashed without its final CRLF (§3.7).
5. RSA: PKCS#1 v1.5 with SHA-256 in OpenSSL (`cryptography`). Ed25519: RFC 8463 signs
   the SHA-256 digest of that header data with pure Ed25519, done by libsodium (PyNaCl)
   because it is ~25 us there against ~45 us in `cryptography`.
6. The final field is folded again with the message's line ending.

Both signature algorithms are deterministic, so "the same bytes as dkimpy" is testable
and tested: tests/unit/test_dkim_signer_exact.py compares whole fields on named cases
and on arbitrary messages (hypothesis), with dkimpy running its own parser and
canonicalisation, and checks that dkimpy verifies them. Configuration that could make
the b= removal or the tag list ambiguous is refused up front: header names outside
printable ASCII or with ":", ";" or "="; an identity local part with ";", "=",
whitespace or controls. A message whose header block has a continuation line before the
first field is a SigningError (dkimpy raised IndexError there).

Measured per message on the project's 2-vCPU VM (bench.py --only dkim, median of 1000
signatures; 2 KB / 50 KB): RSA-2048 0.78 / 0.88 ms (CPU 0.81 / 0.90), of which the
private-key operation is 0.75 ms; Ed25519 0.065 / 0.16 ms. Through dkimpy it was
0.91 / 1.21 ms and 0.17 / 0.46 ms. docs/performance.md has the breakdown.

`arc_seal(...)` adds the next ARC set (RFC 8617) to a message: ARC-Seal,
ARC-Message-Signature and ARC-Authentication-Results, returned in that order, to be
prepended. The caller passes the authentication results it determined
(`auth_results`, the A-R value after the authserv-id) — any Authentication-Results
fields in the message are ignored — and cv= follows from its `arc=` result: absent for
the first instance, the chain's validation result after that. ARC is RSA-SHA256 only
(RFC 8617 §4.1.2). Forwarding will use it; today it serves the tests of filters.arc.

`arc_seal` still goes through dkimpy's `ARC.sign` (with filters.dkim_crypto's OpenSSL
RSA and fast parsing): 2.2 / 3.5 ms for 2 / 50 KB, two RSA signatures and dkimpy's
Python around them.

Both run synchronously (a DKIM signature is under a millisecond for ordinary messages,
see above); callers signing very large messages may use `asyncio.to_thread`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import dkim
import nacl.bindings
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from filters import dkim_crypto
from filters.dkim import quiet_logger

dkim_crypto.install()

__all__ = [
    "DEFAULT_HEADERS",
    "DEFAULT_OVERSIGN",
    "DkimAlgorithm",
    "DkimSigner",
    "SigningError",
    "arc_seal",
]

DkimAlgorithm = Literal["rsa-sha256", "ed25519-sha256"]

#: Header fields signed when present (RFC 6376 §5.4.1's recommendations that matter).
DEFAULT_HEADERS: tuple[str, ...] = (
    "from", "to", "subject", "date", "message-id", "cc", "reply-to", "mime-version",
    "content-type", "content-transfer-encoding", "in-reply-to", "references",
)
#: Header fields signed once more than present, so that none can be added.
DEFAULT_OVERSIGN: tuple[str, ...] = ("from",)
MIN_RSA_BITS = 1024

_LOG = quiet_logger("signer")
# dkimpy refuses to sign these; they change in transit or are trace fields.
_NEVER_SIGNED = frozenset({"return-path", "received", "comments", "keywords", "bcc",
                           "resent-bcc", "dkim-signature", "authentication-results",
                           "arc-seal", "arc-message-signature",
                           "arc-authentication-results"})


class SigningError(ValueError):
    """The key, the parameters or the message cannot be signed."""


def _load_key(private_key: str | bytes) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    pem = private_key.encode("ascii") if isinstance(private_key, str) else bytes(private_key)
    return _load_pem(pem)


@functools.lru_cache(maxsize=1024)
def _load_pem(pem: bytes) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    # Loading checks an RSA key's consistency (~10 ms for 2048 bits): once per key.
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"unreadable private key: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise SigningError(f"RSA key of {key.key_size} bits, under {MIN_RSA_BITS} "
                               "(RFC 8301)")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise SigningError(f"unsupported key type {type(key).__name__}: use RSA or Ed25519")


@functools.lru_cache(maxsize=1024)
def _rsa_pem(key: rsa.RSAPrivateKey) -> bytes:
    # One canonical PEM per key: the cache in filters.dkim_crypto is keyed by it.
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    dkim_crypto.parse_pem_private_key(pem)  # warm the cache
    return pem


def _linesep(message: bytes) -> bytes:
    newline = message.find(b"\n")
    return b"\n" if newline >= 0 and message[newline - 1:newline] != b"\r" else b"\r\n"


def _check_label(what: str, value: str) -> bytes:
    value = value.strip().rstrip(".").lower()
    if not value.isascii():
        value = value.encode("idna").decode("ascii")
    if not value or any(c in value for c in ";= \t\r\n\\\"()<>@,:[]"):
        raise SigningError(f"bad {what}: {value!r}")
    return value.encode("ascii")


def _header_list(headers: Iterable[Sequence[bytes]], sign: tuple[str, ...],
                 oversign: tuple[str, ...]) -> list[bytes]:
    """h=: each field of `sign` once per occurrence in `headers`, plus once more for
    each field of `oversign`; raises SigningError when there is no From."""
    present: dict[bytes, int] = {}
    for name, _ in headers:  # names as dkimpy parses them: printable ASCII, no spaces
        key = name.lower()
        present[key] = present.get(key, 0) + 1
    if not present.get(b"from"):
        raise SigningError("the message has no From field (RFC 6376 §5.4: From must be signed)")
    listed: list[bytes] = []
    for field, extra in _listing(sign, oversign):
        listed.extend([field] * (present.get(field, 0) + extra))
    return listed


@functools.lru_cache(maxsize=256)
def _listing(sign: tuple[str, ...], oversign: tuple[str, ...]) -> tuple[tuple[bytes, int], ...]:
    # (field, how many more times than present to list it), in h= order.
    return tuple((field.encode("ascii"), 1 if field in oversign else 0)
                 for field in dict.fromkeys((*sign, *oversign)))


def _fields(names: Iterable[str], what: str) -> tuple[str, ...]:
    # Field names are printable ASCII without ":" (RFC 5322 §3.6.8); ";" cannot be in
    # a tag value and "=" we refuse too, so that the only "b=" in the signature is b=.
    cleaned = tuple(dict.fromkeys(n.strip().lower() for n in names))
    bad = [n for n in cleaned if n in _NEVER_SIGNED or not n
           or any(not "!" <= c <= "~" or c in ":;=" for c in n)]
    if bad:
        raise SigningError(f"{what} cannot include {', '.join(bad)}")
    return cleaned


def _check_identity(identity: str, domain: bytes) -> bytes:
    local, at, auid_domain = identity.rpartition("@")
    auid = _check_label("identity domain", auid_domain)
    if not at or not (auid == domain or auid.endswith(b"." + domain)):
        raise SigningError("identity must be @domain or @subdomain of domain")
    # i= is written as given: no ";" (it ends a tag), no "=" (it starts a quoted-printable
    # escape there), no whitespace or control characters.
    if any(c in ";=\x7f" or c <= " " for c in local):
        raise SigningError(f"bad identity local part: {local!r}")
    return local.encode("utf-8") + b"@" + auid


class DkimSigner:
    """Signs messages for one domain with one key and selector."""

    __slots__ = ("_domain", "_ed25519_secret", "_identity", "_oversign", "_prefix",
                 "_public", "_rsa_key", "_selector", "_sign_headers", "algorithm", "domain",
                 "key_bits", "selector")

    def __init__(self, private_key: str | bytes, selector: str, domain: str, *,
                 headers: Iterable[str] = DEFAULT_HEADERS,
                 oversign: Iterable[str] = DEFAULT_OVERSIGN,
                 identity: str | None = None) -> None:
        key = _load_key(private_key)
        self.selector = selector
        self.domain = domain
        self._selector = _check_label("selector", selector)
        self._domain = domain_bytes = _check_label("domain", domain)
        self._sign_headers = _fields(headers, "headers")
        self._oversign = _fields(oversign, "oversign")
        if "from" not in (*self._sign_headers, *self._oversign):
            raise SigningError("From must be signed (RFC 6376 §5.4)")
        self._identity = b"@" + domain_bytes
        if identity is not None:
            self._identity = _check_identity(identity, domain_bytes)
        self.algorithm: DkimAlgorithm
        self._rsa_key: rsa.RSAPrivateKey | None = None
        self._ed25519_secret = b""
        if isinstance(key, rsa.RSAPrivateKey):
            self.algorithm = "rsa-sha256"
            self.key_bits: int = key.key_size
            self._rsa_key = key
            public = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        else:
            self.algorithm = "ed25519-sha256"
            self.key_bits = 256
            public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)
            # libsodium's secret key is seed + public key; it signs in ~25 us where
            # `cryptography` takes ~45 us (the signatures are the same: Ed25519 is
            # deterministic).
            self._ed25519_secret = key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption()) + public
        self._public = base64.b64encode(public).decode("ascii")
        # The tags before t=, in dkimpy's order (q= included, as dkimpy writes it).
        self._prefix = b"v=1; a=%s; c=relaxed/relaxed; d=%s; i=%s; q=dns/txt; s=%s; t=" % (
            self.algorithm.encode("ascii"), domain_bytes, self._identity, self._selector)

    def dns_record(self) -> str:
        """The TXT record to publish at `selector._domainkey.domain`."""
        kind = "rsa" if self.algorithm == "rsa-sha256" else "ed25519"
        return f"v=DKIM1; k={kind}; p={self._public}"

    @property
    def record_name(self) -> str:
        return f"{self._selector.decode()}._domainkey.{self._domain.decode()}"

    def sign(self, message: bytes, *, timestamp: int | None = None) -> bytes:
        """The DKIM-Signature field for `message`, to prepend; raises SigningError.

        `timestamp` is t= (default: now).
        """
        block, body_start = dkim_crypto.split_message(message)
        headers = _parse_headers(block)
        include = _header_list(headers, self._sign_headers, self._oversign)
        body_hash = base64.b64encode(dkim_crypto.relaxed_body_sha256(message, body_start))
        when = int(time.time()) if timestamp is None else timestamp
        tags = b"%s%d; h=%s; bh=%s; b=" % (self._prefix, when, b" : ".join(include),
                                          body_hash)
        signature = self._signature(_signed_data(headers, include, tags))
        linesep = _linesep(message)
        return b"DKIM-Signature: " + _fold(tags + base64.b64encode(signature) + linesep,
                                           _NAME_LENGTH, linesep)

    def _signature(self, data: bytes) -> bytes:
        if self._rsa_key is not None:
            return self._rsa_key.sign(data, _PKCS1, _SHA256)
        # RFC 8463 §3: Ed25519 (pure) signs the SHA-256 hash of the header data.
        signed: bytes = nacl.bindings.crypto_sign(hashlib.sha256(data).digest(),
                                                  self._ed25519_secret)
        return signed[:64]  # crypto_sign returns signature + message


# --- The signature, step by step (RFC 6376 §3.7 and §5; dkimpy's choices where the RFC
# leaves any). tests/unit/test_dkim_signer_exact.py compares the result with dkimpy's.

_NAME_LENGTH = len(b"DKIM-Signature")
_PKCS1 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()
# dkimpy folds its field with b= holding 60 zeros (so that b= lands on a line of its
# own) and hashes it with the zeros removed.
_B_PLACEHOLDER = b"0" * 60


def _parse_headers(block: bytes) -> list[list[bytes]]:
    try:
        return dkim_crypto.parse_header_block(block) if block else []
    except dkim.DKIMException as exc:
        raise SigningError(f"message not signable: {exc}") from None
    except IndexError:  # dkimpy itself would fail the same way, but not as DKIMException
        raise SigningError("message not signable: a continuation line before the first "
                           "header field") from None


def _select(headers: list[list[bytes]], include: list[bytes]) -> list[list[bytes]]:
    # dkimpy's select_headers (RFC 6376 §5.4.2): each listed name takes the next instance
    # from the bottom up, and a name listed more often than present selects nothing more.
    names = [name.lower() for name, _ in headers]
    selected: list[list[bytes]] = []
    last: dict[bytes, int] = {}
    for wanted in include:
        i = last.get(wanted, len(headers))
        while i > 0:
            i -= 1
            if names[i] == wanted:
                selected.append(headers[i])
                break
        last[wanted] = i
    return selected


def _signed_data(headers: list[list[bytes]], include: list[bytes], tags: bytes) -> bytes:
    """RFC 6376 §3.7's header hash input: the selected fields, relaxed (§3.4.2), then this
    DKIM-Signature field itself with an empty b= and without a final CRLF."""
    parts = [b"%s:%s\r\n" % (name.lower(), dkim_crypto.relaxed_header_value(value))
             for name, value in _select(headers, include)]
    # Folding can add a space inside an over-long token, which relaxed keeps: fold as
    # dkimpy does, then drop the placeholder (the only b= there, see _check_identity
    # and _fields, so dkimpy's RE_BTAG would remove exactly it).
    folded = _fold(tags + _B_PLACEHOLDER, _NAME_LENGTH, b"\r\n")
    parts.append(b"dkim-signature:" + dkim_crypto.relaxed_header_value(
        b" " + folded[:-len(_B_PLACEHOLDER)]))
    return b"".join(parts)


def _fold(value: bytes, name_length: int, linesep: bytes) -> bytes:
    """dkimpy's `fold` (1.1.8), ported as is: lines of at most 72 columns, the field
    name counting on the first; a line is broken at the last space that fits (the break
    replaces it) or, in a token without one, at the limit (which adds a space); each
    continuation line starts with one space."""
    limit = 72 - name_length
    if len(value) <= limit:
        return value
    if len(value) - value.rfind(b"\r\n") == 2 and len(value) <= limit + 2:
        return value  # fits but for its final CRLF
    done = value.rfind(b"\r\n ")
    head = b""
    if done != -1:  # already folded up to there: keep that part
        head, value = value[:done + 3], value[done + 3:]
    while len(value) > limit:
        space = value.rfind(b" ", 0, limit)
        if space == -1:
            head += value[:limit] + linesep + b" "
            value = value[limit:]
        else:
            head += value[:space] + linesep + b" "
            value = value[space + 1:]
        limit = 71
    return head + value


def arc_seal(message: bytes, key: str | bytes, selector: str, domain: str,
             authserv_id: str, auth_results: str, *,
             headers: Iterable[str] = DEFAULT_HEADERS,
             timestamp: int | None = None) -> list[bytes]:
    """The next ARC set for `message`: [ARC-Seal, ARC-Message-Signature, ARC-A-R] fields.

    `auth_results` is what the sealer found, as in an Authentication-Results value after
    "authserv-id;" (e.g. "spf=pass smtp.mailfrom=a.example; dkim=pass header.d=a.example;
    arc=pass"); its arc= result becomes cv= (no arc= for the first instance).
    Raises SigningError for an unusable key or results, or a chain dkimpy will not extend.
    """
    loaded = _load_key(key)
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise SigningError("ARC seals are RSA-SHA256 only (RFC 8617 §4.1.2)")
    pem = _rsa_pem(loaded)
    selector_bytes = _check_label("selector", selector)
    domain_bytes = _check_label("domain", domain)
    srv_id = authserv_id.strip()
    if not srv_id or any(c in srv_id for c in "; \t\r\n"):
        raise SigningError(f"bad authserv-id: {authserv_id!r}")
    linesep = _linesep(message)
    try:
        sealer: Any = dkim.ARC(message, logger=_LOG, signature_algorithm=b"rsa-sha256",
                               linesep=linesep)
    except dkim.DKIMException as exc:
        raise SigningError(f"message not sealable: {exc}") from None
    include = _header_list(sealer.headers, _fields(headers, "headers"), ())
    # dkimpy reads the results from the message's A-R fields for srv_id: give it exactly
    # ours, and hide any others (they are not signed either way).
    results = " ".join(auth_results.split())
    value = f" {srv_id}; {results}\r\n" if results else f" {srv_id}; none\r\n"
    sealer.headers = [[b"Authentication-Results", value.encode("utf-8")]] + [
        h for h in sealer.headers if h[0].lower() != b"authentication-results"]
    try:
        fields: list[bytes] = sealer.sign(selector_bytes, domain_bytes, pem,
                                          srv_id.encode("utf-8"), include_headers=include,
                                          timestamp=timestamp)
    except Exception as exc:  # dkimpy raises its own and authres errors
        raise SigningError(f"sealing failed: {exc}") from None
    if not fields:
        raise SigningError("dkimpy would not seal: unparsable auth_results, or a chain "
                           "(instance > 1) without an arc= result")
    return fields
