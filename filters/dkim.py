"""DKIM verification (RFC 6376, RFC 8301, RFC 8463) of inbound mail, one result per signature.

Theory of operation
-------------------
`verify_dkim(message, resolver)` works in three phases so that nothing blocks the event
loop on the network and little blocks it on the CPU:

1. Plan (sync, cheap). The header block is parsed with dkimpy's parser (sped up by
   `filters.dkim_crypto`), every DKIM-Signature field is read as a tag list and checked
   with dkimpy's own field validation. A signature that is broken in itself gets its
   result here and needs no DNS. The well-formed ones are ordered for the cap: those
   whose d= is the From domain or a parent of it first (they are what DMARC needs; a
   sender cannot crowd them out by adding signatures on top), then the others in header
   order. The first `max_signatures` are evaluated; the rest are recorded as `policy`,
   "not evaluated". At most 50 fields are even read (the rest: `policy` unread).
2. Prefetch (async). The key records `selector._domainkey.domain` of the evaluated
   signatures are looked up concurrently through the project's `Resolver` (one query
   per distinct name).
3. Verify (sync CPU). For each evaluated signature, the key record is judged first (so
   key problems are reported as such: dkimpy would only say "False"), then dkimpy's
   `DKIM.verify(idx)` runs with a `dnsfunc` closure serving the prefetched answer, so
   dkimpy never does DNS itself. RSA goes through OpenSSL (`filters.dkim_crypto`),
   Ed25519 through PyNaCl. dkimpy's hot spots run through exact replacements from
   `filters.dkim_crypto` too: message parsing, relaxed header and body
   canonicalisation, the b= removal regex (50 us on dkimpy's, 3 us) and the tag-list
   parser. They are compared with dkimpy's own functions on arbitrary input, and whole
   verifications of signed and mutated messages with dkimpy as shipped
   (tests/unit/test_dkim_verify_exact.py): same outcomes, same reasons. We verify
   through dkimpy's procedure rather than a procedure of our own so that every check
   and error message stays dkimpy's.

CPU and the loop (measured on the project's 2-vCPU VM, one RSA-2048 relaxed/relaxed
signature, all phases, median of 15 batches): 0.28 ms for a 2 KB message, 0.43 ms for
50 KB, 1.0 ms for 200 KB, 3.0 ms for 1 MB, against 0.48 / 0.75 / 1.7 / 6.6 ms in the same
conditions before those replacements and the parser's and relaxed body's cheaper scans
(an earlier, quieter measurement had 0.25 / 0.41 / 0.94 / 3.7 ms). Each further
signature costs the same again (it canonicalises and hashes the body anew). The cost of
`n` signatures is about that of `n * (len(message) + PER_SIGNATURE_BYTES)` bytes of
body. PER_SIGNATURE_BYTES and the threshold below were set from "0.22 ms per signature
plus 3.6 us per KiB"; now it is ~0.27 ms plus ~2.8 us per KiB, so every case that runs
inline costs less than before, but the split is no longer at exactly ~1 ms (one
signature could stay inline up to ~260 KiB; three or four small ones reach ~1.1 ms).
Left as they are until measured on a quiet machine. Phase 3 runs inline up to
`INLINE_WORK_BYTES` (256 KiB: one signature up to ~190 KiB, two up to ~70 KiB) and in
`asyncio.to_thread` above. The thread hop costs ~0.04 ms of CPU, and it does not free
the loop as much as one would hope: dkimpy's Python holds the GIL, which the loop gets
back at the latest every `sys.getswitchinterval()` (5 ms), and a single regex pass over
a multi-megabyte body never yields. Measured with a ticker task: 5 signatures on 50 KB
stall the loop 2.0 ms inline vs 1.8 ms max in the thread; 1 MB 5-8 ms vs 4-5.6 ms; 4 MB
16-33 ms vs 12-24 ms. So under ~1 ms inline is strictly better (no hop, same stall), and
above it the thread bounds the worst stalls; huge messages remain the size limit's
business.

Results (RFC 8601 §2.7.1 vocabulary, decided here):

* pass — verified, with an acceptable algorithm and key.
* fail — the body hash or the signature did not verify.
* policy — the signature verifies but is not acceptable: rsa-sha1 (RFC 8301 §3.1: a
  historic algorithm; "policy" tells the operator the math was right and the rule
  refused it, where "fail" would suggest tampering) and RSA keys under 1024 bits
  (RFC 8301 §3.2). Also signatures not evaluated because of the cap. An rsa-sha1 or
  short-key signature that does not verify is plainly "fail". Neither is ever "pass".
* neutral — the DKIM-Signature itself cannot be evaluated: bad tag list, missing or
  invalid tags, unknown a= or c=, i= outside d=, From not in h=, t= in the future, x=
  past ("syntax errors or not otherwise able to be processed").
* permerror — the key record is the problem: none (NXDOMAIN, no TXT), revoked (empty
  p=), unparsable, of the wrong type (k= vs a=), not for email (s=), refusing the hash
  (h=), t=s with a subdomain i=, a key name DNS cannot ask for. Also a message whose
  header block cannot be parsed at all.
* temperror — DNS gave no answer now (DnsTemporaryError, or an unexpected resolver
  exception): try again later, never a permanent verdict.

l= (body length limit) is accepted as RFC 6376 allows and noted in `reason`, as is a
key in testing mode (t=y). The verifier never raises for any input bytes: dkimpy is an
untrusted parser of hostile input here, so everything it raises becomes a result.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import dkim

from filters import dkim_crypto
from filters.dkim_crypto import parse_tag_value
from filters.dns import DnsNameError, DnsResult, DnsTemporaryError, Resolver

dkim_crypto.install()

__all__ = [
    "INLINE_WORK_BYTES",
    "PER_SIGNATURE_BYTES",
    "DkimOutcome",
    "DkimResult",
    "KeyLookup",
    "dnsfunc_for",
    "key_name",
    "normalise_name",
    "prefetch_keys",
    "quiet_logger",
    "verify_dkim",
]

log = logging.getLogger(__name__)

DkimOutcome = Literal["pass", "fail", "neutral", "temperror", "permerror", "policy"]

#: Phase 3 runs inline up to this much estimated work, in a worker thread above.
INLINE_WORK_BYTES = 256 * 1024
#: The fixed cost of one signature (parsing, header canonicalisation, key, RSA) in bytes
#: of body processing: ~0.22 ms at ~3.6 us per KiB.
PER_SIGNATURE_BYTES = 60 * 1024
#: DKIM-Signature fields read at all; the rest are recorded unread.
MAX_EXAMINED = 50
MIN_RSA_BITS = 1024  # RFC 8301 §3.2


def quiet_logger(name: str) -> logging.Logger:
    """A logger for dkimpy that says nothing unless an operator turns it on.

    dkimpy logs every bad signature at ERROR; on a mail gateway those are the sender's
    problem, reported in our results, not operator alarms. The logger is ours
    (`mailedge.dkimpy.*`), set to CRITICAL and not propagating, so `logging` config
    can still lower its level to debug dkimpy itself.
    """
    logger = logging.getLogger(f"mailedge.dkimpy.{name}")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.CRITICAL)
        logger.propagate = False
    return logger


_DKIMPY_LOG = quiet_logger("dkim")


@dataclass(frozen=True, slots=True)
class DkimResult:
    """The outcome for one DKIM-Signature field, in header order."""

    result: DkimOutcome
    domain: str = ""  # d=, lowercased
    selector: str = ""  # s=, lowercased
    identity: str = ""  # i=, or "@" + d= when absent (RFC 6376 §3.5)
    algorithm: str = ""  # a=
    key_bits: int | None = None  # known once the key record was read
    header_b: str = ""  # first 8 characters of b=, for A-R header.b (RFC 6008)
    reason: str = ""  # for operators; notes (l=, t=y) also on pass


# --- Key records, shared with filters.arc ---------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyLookup:
    """The prefetched answer for one key name: a TXT record, or why there is none."""

    name: str
    record: str | None = None
    error: Literal["temperror", "permerror"] | None = None
    reason: str = ""


def normalise_name(name: str) -> str:
    """A DNS name as our resolver wants it: lowercase A-labels, no final dot."""
    labels = []
    for label in name.strip().rstrip(".").split("."):
        if not label.isascii():
            label = label.encode("idna").decode("ascii")
        labels.append(label.lower())
    return ".".join(labels)


def key_name(selector: bytes, domain: bytes) -> str:
    """`selector._domainkey.domain` (RFC 6376 §3.6.2.1); ValueError if it is no DNS name."""
    name = normalise_name(f"{selector.decode().strip()}._domainkey.{domain.decode().strip()}")
    if not re.fullmatch(r"[a-z0-9_\-]+(\.[a-z0-9_\-]+)+", name):
        raise ValueError(f"not a key name: {name!r}")
    return name


def _choose_record(records: Iterable[str]) -> str | None:
    # RFC 6376 §3.6.2.2: several TXT records at a selector are undefined; take the first
    # that looks like a key, else the first.
    records = list(records)
    for record in records:
        if re.search(r"(^|;)\s*p\s*=", record):
            return record
    return records[0] if records else None


async def _lookup(resolver: Resolver, name: str) -> KeyLookup:
    try:
        answer: DnsResult = await resolver.query(name, "TXT")
    except DnsTemporaryError as exc:
        return KeyLookup(name, error="temperror", reason=f"DNS: {exc or 'no answer'}")
    except DnsNameError as exc:
        return KeyLookup(name, error="permerror", reason=f"key name not queryable: {exc}")
    except Exception as exc:  # a resolver bug must not become a permanent verdict
        log.warning("DNS lookup of %s raised %r", name, exc)
        return KeyLookup(name, error="temperror", reason=f"DNS lookup failed: {type(exc).__name__}")
    record = _choose_record(answer.records)
    if record is None:
        what = "NXDOMAIN" if answer.nxdomain else "no TXT record"
        return KeyLookup(name, error="permerror", reason=f"no key record ({what})")
    return KeyLookup(name, record=record)


async def prefetch_keys(names: Iterable[str], resolver: Resolver) -> dict[str, KeyLookup]:
    """Look every distinct key name up concurrently; never raises (but can be cancelled)."""
    distinct = list(dict.fromkeys(names))
    found = await asyncio.gather(*(_lookup(resolver, name) for name in distinct))
    return dict(zip(distinct, found, strict=True))


def dnsfunc_for(keys: Mapping[str, KeyLookup]) -> Callable[..., bytes | None]:
    """A dkimpy `dnsfunc` serving prefetched answers: no DNS, no blocking.

    A temporary failure is raised as dkimpy's DnsTimeoutError (dkimpy turns it into an
    invalid signature; the caller knows it was temporary); a name not prefetched or
    without a record answers None (dkimpy: "missing public key").
    """

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        try:
            text = name.decode() if isinstance(name, bytes) else name
            found = keys.get(normalise_name(text))
        except UnicodeError:
            found = None
        if found is None:
            return None
        if found.error == "temperror":
            raise dkim.DnsTimeoutError(found.reason)
        return None if found.record is None else found.record.encode("utf-8", "replace")

    return dnsfunc


# --- Verification -----------------------------------------------------------------------


@dataclass(slots=True)
class _Signature:
    index: int  # among the DKIM-Signature fields, dkimpy's idx
    fields: dict[bytes, bytes] | None = None
    name: str = ""  # key name, once known
    done: DkimResult | None = None  # decided without verification

    def text(self, tag: bytes) -> str:
        value = (self.fields or {}).get(tag, b"")
        return value.decode("utf-8", "replace")

    def result(self, outcome: DkimOutcome, reason: str, key_bits: int | None = None
               ) -> DkimResult:
        domain = self.text(b"d").lower()
        identity = self.text(b"i") or (f"@{domain}" if domain else "")
        header_b = re.sub(r"\s+", "", self.text(b"b"))[:8]
        return DkimResult(outcome, domain, self.text(b"s").lower(), identity,
                          self.text(b"a").lower(), key_bits, header_b, reason)


def _from_domain(headers: list[list[bytes]]) -> str | None:
    values = [value for name, value in headers if name.lower() == b"from"]
    if len(values) != 1:
        return None
    text = re.sub(r"\r?\n", "", values[0].decode("utf-8", "replace"))
    try:
        addresses = [addr for _, addr in email.utils.getaddresses([text]) if "@" in addr]
    except Exception:  # only an ordering hint: never worth a crash
        return None
    if len(addresses) != 1:
        return None
    return addresses[0].rpartition("@")[2].strip().lower().rstrip(".") or None


def _aligned(domain: str, from_domain: str | None) -> bool:
    return bool(from_domain and domain
                and (from_domain == domain or from_domain.endswith("." + domain)))


def _plan(headers: list[list[bytes]], max_signatures: int) -> list[_Signature]:
    values = [value for name, value in headers if name.lower() == b"dkim-signature"]
    signatures = [_Signature(i) for i in range(len(values))]
    for sig, value in zip(signatures, values, strict=True):
        if sig.index >= MAX_EXAMINED:
            sig.done = sig.result("policy", f"not examined: more than {MAX_EXAMINED} "
                                            "DKIM-Signature fields")
            continue
        try:
            sig.fields = parse_tag_value(value)
        except Exception as exc:
            sig.done = sig.result("neutral", f"malformed tag list: {_describe(exc)}")
            continue
        try:
            dkim.validate_signature_fields(dict(sig.fields))
        except Exception as exc:
            sig.done = sig.result("neutral", _describe(exc))
            continue
        signed = [h.strip().lower() for h in sig.fields[b"h"].split(b":")]
        if b"from" not in signed:
            sig.done = sig.result("neutral", "From not signed (h=)")
            continue
        try:
            sig.name = key_name(sig.fields[b"s"], sig.fields[b"d"])
        except (ValueError, UnicodeError) as exc:
            sig.done = sig.result("neutral", f"bad s= or d=: {_describe(exc)}")
    candidates = [sig for sig in signatures if sig.done is None]
    cap = max(max_signatures, 0)
    if len(candidates) <= cap:
        return signatures  # all evaluated: no order to choose (the From parse is ~15 us)
    from_domain = _from_domain(headers)
    candidates.sort(key=lambda s: (not _aligned(s.text(b"d").lower(), from_domain), s.index))
    for sig in candidates[cap:]:
        sig.done = sig.result("policy", f"not evaluated: more than {max_signatures} signatures")
    return signatures


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _judge_key(sig: _Signature, record: str) -> tuple[DkimResult | None, int | None, str]:
    """The key record's verdict before any crypto: (result if refused, key bits, notes)."""
    try:
        tags = parse_tag_value(record.encode("utf-8", "replace"))
    except Exception as exc:
        return sig.result("permerror", f"malformed key record: {_describe(exc)}"), None, ""
    if not tags.get(b"p", b"").strip():
        return sig.result("permerror", "key revoked (empty p=)"), None, ""
    try:
        pk, bits, ktag, tlsrpt = dkim.evaluate_pk(sig.name.encode(), record.encode("utf-8",
                                                                                   "replace"))
    except Exception as exc:
        return sig.result("permerror", f"bad key record: {_describe(exc)}"), None, ""
    if pk is None:
        return sig.result("permerror", "key not for email (s=)"), None, ""
    if tlsrpt:
        return sig.result("permerror", "key for TLS reports only (s=tlsrpt)", bits), bits, ""
    algorithm = sig.fields[b"a"].lower() if sig.fields else b""
    if algorithm.split(b"-")[0] != ktag:
        return sig.result("permerror", f"key type {ktag.decode()} does not fit a="
                                       f"{algorithm.decode('ascii', 'replace')}", bits), bits, ""
    hash_name = algorithm.split(b"-")[-1]
    allowed = [h.strip().lower() for h in tags.get(b"h", b"").split(b":") if h.strip()]
    if allowed and hash_name not in allowed:
        return sig.result("permerror", f"key does not allow {hash_name.decode()} (h=)",
                          bits), bits, ""
    flags = [f.strip().lower() for f in tags.get(b"t", b"").split(b":")]
    if b"s" in flags and b"i" in (sig.fields or {}):
        auid_domain = sig.text(b"i").rpartition("@")[2].lower()
        if auid_domain != sig.text(b"d").lower():
            return sig.result("permerror", "key has t=s but i= is a subdomain", bits), bits, ""
    return None, bits, "key in testing mode (t=y)" if b"y" in flags else ""


def _verify_planned(headers: list[list[bytes]], body: bytes, signatures: list[_Signature],
                    keys: Mapping[str, KeyLookup]) -> list[DkimResult]:
    verifier: Any = None
    dnsfunc = dnsfunc_for(keys)
    results = []
    for sig in signatures:
        if sig.done is not None:
            results.append(sig.done)
            continue
        found = keys.get(sig.name, KeyLookup(sig.name, error="temperror", reason="not looked up"))
        if found.error is not None or found.record is None:
            results.append(sig.result(found.error or "permerror", found.reason))
            continue
        refused, bits, notes = _judge_key(sig, found.record)
        if refused is not None:
            results.append(refused)
            continue
        if verifier is None:
            verifier = dkim.DKIM(None, logger=_DKIMPY_LOG, minkey=0)
            verifier.headers, verifier.body = headers, body
        results.append(_run_dkimpy(verifier, sig, dnsfunc, bits, notes))
    return results


def _run_dkimpy(verifier: Any, sig: _Signature, dnsfunc: Callable[..., bytes | None],
                bits: int | None, notes: str) -> DkimResult:
    assert sig.fields is not None
    if b"l" in sig.fields:
        notes = "; ".join(filter(None, [notes, f"l={sig.text(b'l')}: body past it unsigned"]))
    try:
        valid = verifier.verify(idx=sig.index, dnsfunc=dnsfunc)
    except dkim.ValidationError as exc:
        if str(exc).startswith("body hash mismatch"):
            return sig.result("fail", _join("body hash did not verify", notes), bits)
        return sig.result("neutral", _describe(exc), bits)
    except dkim.KeyFormatError as exc:
        return sig.result("permerror", _describe(exc), bits)
    except Exception as exc:  # dkimpy on hostile input: a result, never a crash
        return sig.result("neutral", f"not verifiable: {_describe(exc)}", bits)
    if not valid:
        return sig.result("fail", _join("signature did not verify", notes), bits)
    algorithm = sig.text(b"a").lower()
    if algorithm == "rsa-sha1":
        return sig.result("policy", _join("rsa-sha1 is historic (RFC 8301)", notes), bits)
    if algorithm.startswith("rsa-") and bits is not None and bits < MIN_RSA_BITS:
        return sig.result("policy", _join(f"RSA key of {bits} bits, under {MIN_RSA_BITS} "
                                          "(RFC 8301)", notes), bits)
    return sig.result("pass", notes, bits)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


async def verify_dkim(message: bytes, resolver: Resolver, *, max_signatures: int = 5
                      ) -> list[DkimResult]:
    """Verify every DKIM-Signature of `message` (up to `max_signatures`); never raises.

    Returns one result per DKIM-Signature field in header order (empty: unsigned, A-R
    `dkim=none`). Only cancellation propagates.
    """
    try:
        headers, body = dkim.rfc822_parse(message)
    except Exception as exc:
        header_block = re.split(rb"\n\r?\n", message, maxsplit=1)[0]
        count = len(re.findall(rb"(?im)^dkim-signature\s*:", header_block))
        reason = f"message header unparsable: {_describe(exc)}"
        return [DkimResult("permerror", reason=reason) for _ in range(count)]
    signatures = _plan(headers, max_signatures)
    todo = [sig for sig in signatures if sig.done is None]
    keys = await prefetch_keys((sig.name for sig in todo), resolver) if todo else {}
    if len(todo) * (len(message) + PER_SIGNATURE_BYTES) <= INLINE_WORK_BYTES:
        return _verify_planned(headers, body, signatures, keys)
    return await asyncio.to_thread(_verify_planned, headers, body, signatures, keys)
