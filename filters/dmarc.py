"""DMARC (RFC 7489): the From domain, policy discovery, identifier alignment, disposition.

Theory of operation
-------------------

DMARC runs once per message (scan once, decide per tenant) in four pure steps, of which
only the second touches the network, and only through the `filters.dns.Resolver` Protocol:

1. :func:`from_domain` finds the RFC5322.From domain in the header section (RFC 7489 §3.1,
   §6.6.1): exactly one From field holding exactly one mailbox, whose domain is returned
   as a lowercase A-label. Anything else is a :class:`FromError` with a reason the
   integrator may reject on (§6.6.1: such messages "are typically rejected").
2. :func:`discover_policy` looks up ``_dmarc.<From domain>`` and, when that yields no
   DMARC record, ``_dmarc.<Organizational Domain>`` (§6.6.3), and returns a
   :class:`PolicyLookup`: the parsed record, where it was found, or why there is none.
3. The SPF and DKIM checks report their results; the integrator adapts them to
   :class:`SpfIdentity` (the SPF result for the RFC5321.MailFrom domain — §4.1, §3.1.2 —
   which for a null path is the HELO domain, RFC 7208 §2.4) and :class:`DkimIdentity` (one per
   signature, its ``d=``).
4. :func:`evaluate` decides pass/fail from identifier alignment (§3.1) and turns a failure
   into a disposition: ``p=`` or ``sp=`` (§6.3), downgraded by ``pct=`` sampling (§6.6.4).
   It reports the published policy (``policy.dmarc`` in Authentication-Results) and the
   applied disposition separately. It takes no locks, does no I/O and costs tens of µs.

Rules and the decisions taken where the RFC leaves room
--------------------------------------------------------

Record syntax (:func:`parse_dmarc_record`, §6.3 and the ABNF of §6.4):

- ``v=DMARC1`` must be the first tag and match exactly ("DMARC1" is case-sensitive, §6.3
  "v"); otherwise the text is not a DMARC record and discovery discards it (§6.6.3 step 2).
  Leading/trailing WSP around the record is tolerated.
- ``p=`` is required. §6.3 also says ``v`` and ``p`` "MUST appear in that order"; we accept
  ``p`` anywhere after ``v`` (a warning is noted), as OpenDMARC does: refusing a misordered
  record would silently turn a published ``reject`` into no policy at all.
- A missing or invalid ``p=``, or an invalid ``sp=``: if ``rua=`` has at least one valid
  URI the record is read as ``p=none`` (and ``sp`` none) keeping its reporting tags; else
  it is not a usable record (§6.6.3, "If a retrieved policy record does not contain a
  valid p tag ...").
- Every other tag with an invalid value (``pct``, ``adkim``, ``aspf``, ``fo``, ``rf``,
  ``ri``, a ``rua``/``ruf`` URI) is discarded in favour of its default and noted in
  :attr:`DmarcRecord.warnings` (§6.3: "Syntax errors in the remainder of the record SHOULD
  be discarded in favor of default values (if any) or ignored outright"). Unknown tags are
  ignored (§6.3), so DMARCbis tags (``np``, ``psd``, ``t``) do no harm; their names are kept
  in :attr:`DmarcRecord.unknown_tags`. A tag given twice counts as invalid.
- Tag names and the keyword values (``none``, ``r``, ``s`` ...) are case-insensitive (ABNF
  quoted strings, RFC 5234 §2.3).

Policy discovery (:func:`discover_policy`, §6.6.3):

- TXT records not starting with ``v=DMARC1`` are discarded; the Organizational Domain is
  queried only if the From domain leaves an empty set (NXDOMAIN and NODATA included) and
  differs from its Organizational Domain. A From domain that is itself a public suffix has
  no Organizational Domain: there is no fallback.
- More than one DMARC record at the queried name: discovery ends, result ``none`` (§6.6.3
  step 5 — "DMARC processing is not applied").
- One DMARC record with syntax errors (and no usable ``rua``): result ``permerror`` with
  disposition none (§6.6.3 applies no policy; §11.2 / RFC 8601 name "a syntactically
  incorrect DMARC record" as the example of permerror for Authentication-Results).
- `DnsTemporaryError` at either step: ``temperror`` (no fallback past a failed lookup: the
  From domain may well have a record). What a temperror means for the message is the
  tenant's policy (DESIGN: fail safe, defer).
- `DnsNameError` for ``_dmarc.<From domain>`` (a From domain within 7 octets of the 253
  limit): such a name cannot hold a record, so it counts as an empty answer and discovery
  goes on at the Organizational Domain. `DnsNameError` there, or a From domain that is not
  a valid domain name: ``permerror``.
- ``sp=`` applies only when the record was found at the Organizational Domain by the
  fallback, i.e. the From domain is a subdomain of it (§6.3 "sp": "the policy to be
  enacted ... for all subdomains"; §6.6.3 step 3). A record found at the From domain itself
  always gives ``p=``, even when that domain is a subdomain with a record of its own.
- NXDOMAIN for the From domain is recorded (:attr:`PolicyLookup.from_nxdomain`) for
  DMARCbis ``np=``; RFC 7489 gives it no meaning.

Organizational Domain (§3.2) — pluggable (:class:`OrgDomain`):

- The default, :class:`PslOrgDomain`, implements §3.2 with the Public Suffix List shipped
  inside the ``publicsuffixlist`` wheel (works offline; refresh = upgrade the package),
  loaded once, lazily, by :func:`default_org_domain` (about 30 ms: call it at startup).
- Both PSL sections count, ICANN and private: §3.2 names the PSL and the private section
  is what separates the customers of shared hosting suffixes (``github.io``,
  ``blogspot.com``, ``herokuapp.com``) — with ICANN-only rules ``a.github.io`` and
  ``b.github.io`` would share the Organizational Domain ``github.io`` and each tenant's
  mail would align with the other's (and with GitHub's). ``PslOrgDomain(only_icann=True)``
  exists for operators who want the other view. Unknown TLDs follow the PSL's implicit
  ``*`` rule.
- A public suffix has no Organizational Domain (``None``): §3.2's algorithm needs a label
  to the left of the longest matching suffix.
- DMARCbis replaces the PSL with a DNS tree walk (asynchronous). The seam for it: a
  tree-walk implementation resolves the names it will be asked about (the From, the SPF and
  the ``d=`` domains) before :func:`evaluate`, and hands both functions an `OrgDomain`
  answering from that snapshot; :func:`evaluate` stays pure and synchronous.

Alignment (§3.1, :func:`aligned`):

- Strict: the two domains are identical (after normalisation to lowercase A-labels
  without a trailing dot). Relaxed: identical, or their Organizational Domains are equal
  (§3.1.1, §3.1.2). Only a DKIM ``pass`` and an SPF ``pass`` count (§4.2); other results
  never align.
- No cross-domain credit for a public suffix: a domain that is a public suffix has no
  Organizational Domain, so it aligns with nothing but itself. From ``x.github.io`` with
  ``d=github.io`` does not align (pydmarc's plain suffix test says it does; §3.2 says
  not). An identical name still aligns (a suffix operator sending as
  itself), which keeps "strict implies relaxed".
- Relaxed alignment is symmetric, and strict alignment implies relaxed alignment.

Disposition (§6.6.4, §6.3 "pct"):

- ``pass`` → disposition none. ``fail`` → the applicable policy (``p`` or ``sp``); if
  ``pct`` < 100 the message is sampled: ``roll < pct / 100`` with ``roll`` from
  `random.random()` or the injected ``pct_roll``; a message outside the sample gets the
  next less strict policy (reject → quarantine, quarantine → none).
- ``none``, ``temperror``, ``permerror`` → disposition none; the integrator applies the
  tenant's policy for errors.

From domain (:func:`from_domain`, §6.6.1, RFC 5322 §3.4, §3.6.2):

- The header section is read up to the first empty line, unfolded (RFC 5322 §2.2.3). A
  field named ``From`` in any case, also with whitespace before the colon (obs-syntax,
  RFC 5322 §4.5), is a From field: other software would show it, so we count it.
- No From field → ``None``; more than one → :class:`FromError` (multiple fields).
- The value is tokenised per RFC 5322 §3.2 without decoding RFC 2047 encoded words, so an
  encoded ``,`` or ``@`` can never split or redirect the address; comments are dropped;
  quoted strings keep their commas. More than one mailbox (an unquoted comma in a display
  name makes two) → :class:`FromError` (multiple addresses; its ``domains`` lets the
  integrator accept a list whose domains are all equal, as §6.6.1 permits). No mailbox,
  an address without ``@`` or with an address literal, or a domain that is not a valid
  name → :class:`FromError` (no domain). A group (RFC 6854) is unwrapped: its mailboxes
  count as above.
- A display name may contain unquoted ``@`` or ``.`` (sloppy mailers write
  ``info@shop.example <info@shop.example>``); the domain is always the angle address's.
- Non-ASCII (RFC 6532) is accepted: U-labels are converted with the stdlib IDNA 2003 codec
  after NFC, as gateway/addresses.py does for envelope domains.
"""

from __future__ import annotations

import enum
import functools
import random
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from publicsuffixlist import PublicSuffixList

from filters.dns import DnsNameError, DnsTemporaryError, Resolver

__all__ = [
    "Alignment",
    "DkimIdentity",
    "DmarcRecord",
    "DmarcResult",
    "DmarcStatus",
    "FromError",
    "FromProblem",
    "LookupStatus",
    "OrgDomain",
    "Policy",
    "PolicyLookup",
    "PslOrgDomain",
    "RecordError",
    "ReportUri",
    "SpfIdentity",
    "aligned",
    "check_dmarc_record",
    "default_org_domain",
    "discover_policy",
    "evaluate",
    "from_domain",
    "is_dmarc_record",
    "normalize_domain",
    "parse_dmarc_record",
]


# --------------------------------------------------------------------------- values


class Policy(enum.Enum):
    """A requested policy (``p=``/``sp=``, §6.3) and also an applied disposition."""

    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"

    def downgraded(self) -> Policy:
        """The next less strict policy (§6.6.4): reject → quarantine → none."""
        if self is Policy.REJECT:
            return Policy.QUARANTINE
        return Policy.NONE


class Alignment(enum.Enum):
    """``adkim=``/``aspf=`` (§6.3): relaxed (default) or strict."""

    RELAXED = "r"
    STRICT = "s"


class DmarcStatus(enum.Enum):
    """The DMARC result keyword for Authentication-Results (RFC 7489 §11.2)."""

    PASS = "pass"
    FAIL = "fail"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class LookupStatus(enum.Enum):
    """How policy discovery ended."""

    FOUND = "found"  # one usable DMARC record
    NONE = "none"  # no record, or several (§6.6.3 step 5)
    TEMPERROR = "temperror"  # DNS did not answer (DnsTemporaryError)
    PERMERROR = "permerror"  # one record, unusable; or a name that cannot be queried


@dataclass(frozen=True, slots=True)
class ReportUri:
    """One ``rua=``/``ruf=`` entry (§6.4 dmarc-uri): the URI and its optional size limit."""

    uri: str
    max_size: int | None = None  # octets, from "!<n>[kmgt]" (units of 1024)


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """A parsed DMARC policy record (§6.3). Defaults are the RFC's."""

    p: Policy
    sp: Policy | None = None  # None: not published, subdomains get `p` (§6.3 "sp")
    pct: int = 100
    adkim: Alignment = Alignment.RELAXED
    aspf: Alignment = Alignment.RELAXED
    fo: tuple[str, ...] = ("0",)
    rua: tuple[ReportUri, ...] = ()
    ruf: tuple[ReportUri, ...] = ()
    rf: tuple[str, ...] = ("afrf",)
    ri: int = 86400
    p_fallback: bool = False  # p/sp were invalid; read as p=none because rua is valid
    warnings: tuple[str, ...] = ()  # tags discarded for their syntax (§6.3)
    unknown_tags: tuple[str, ...] = ()  # ignored (§6.3), e.g. DMARCbis np/psd/t

    @property
    def subdomain_policy(self) -> Policy:
        """``sp`` if published, else ``p`` (§6.3 "sp")."""
        return self.p if self.sp is None else self.sp


@dataclass(frozen=True, slots=True)
class RecordError:
    """Why a text is not a usable DMARC record."""

    reason: str


@dataclass(frozen=True, slots=True)
class SpfIdentity:
    """The SPF result (RFC 7208 §2.6 keyword) for the domain SPF checked.

    `domain` is the RFC5321.MailFrom domain (RFC 7489 §4.1, §3.1.2); for the null path
    that is the HELO domain (RFC 7208 §2.4).
    """

    result: str
    domain: str


@dataclass(frozen=True, slots=True)
class DkimIdentity:
    """The result (RFC 8601 keyword) of one DKIM signature and its ``d=`` domain."""

    result: str
    domain: str


@dataclass(frozen=True, slots=True)
class PolicyLookup:
    """What :func:`discover_policy` found for a From domain."""

    status: LookupStatus
    from_domain: str  # normalised when valid, else as given
    org_domain: str | None = None  # None: the From domain is a public suffix (or invalid)
    record: DmarcRecord | None = None  # set when status is FOUND
    policy_domain: str | None = None  # where the record (or the unusable one) was found
    found_at_org_domain: bool = False  # by the §6.6.3 fallback: sp= applies
    from_nxdomain: bool = False  # _dmarc.<from> answered NXDOMAIN (for DMARCbis np=)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """The verdict of :func:`evaluate`."""

    result: DmarcStatus
    from_domain: str
    disposition: Policy = Policy.NONE  # what to apply, after pct sampling (§6.6.4)
    policy: Policy | None = None  # the published policy for this domain (p or sp)
    record: DmarcRecord | None = None
    policy_domain: str | None = None
    org_domain: str | None = None
    subdomain_policy_applied: bool = False  # `policy` came from sp= (or p= for subdomains)
    spf_aligned: bool = False
    dkim_aligned: bool = False
    aligned_dkim_domain: str | None = None  # the first aligned passing d=
    sampled: bool = True  # False: outside pct, the disposition was downgraded
    reason: str = ""

    @property
    def policy_dmarc(self) -> str | None:
        """The ``policy.dmarc`` value for Authentication-Results: the published policy."""
        return None if self.policy is None else self.policy.value

    def authentication_results(self) -> str:
        """The ``dmarc=`` resinfo of an Authentication-Results field (RFC 8601 §2.2).

        For example ``dmarc=fail (p=reject sp=none dis=quarantine) header.from=example.com
        policy.dmarc=reject``. Only keywords and a validated domain appear in it.
        """
        parts = [f"dmarc={self.result.value}"]
        record = self.record
        if record is not None and self.policy is not None:
            parts.append(
                f"(p={record.p.value} sp={record.subdomain_policy.value}"
                f" dis={self.disposition.value})"
            )
        if _DOMAIN.fullmatch(self.from_domain):
            parts.append(f"header.from={self.from_domain}")
        if self.policy is not None:
            parts.append(f"policy.dmarc={self.policy.value}")
        return " ".join(parts)


class FromProblem(enum.Enum):
    """Why the header section gives no single From domain (§6.6.1)."""

    MULTIPLE_FIELDS = "multiple From fields"
    MULTIPLE_ADDRESSES = "multiple addresses in From"
    NO_ADDRESS = "no address in From"
    NO_DOMAIN = "no domain name in the From address"
    SYNTAX = "From field syntax error"


@dataclass(frozen=True, slots=True)
class FromError:
    """:func:`from_domain` found no single From domain; RFC 7489 §6.6.1 allows rejecting."""

    problem: FromProblem
    reason: str
    domains: tuple[str, ...] = ()  # the valid domains seen, for MULTIPLE_* problems


# --------------------------------------------------------------------------- domains

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN: Final = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
_MAX_DOMAIN = 253  # RFC 1035 §2.3.4, without the final dot


def normalize_domain(name: str) -> str | None:
    """The lookup form of a domain (DESIGN "Normalised lookups"), or None if invalid.

    Lowercase A-labels without the final dot; U-labels are NFC-normalised and converted
    with the stdlib IDNA 2003 codec. Labels are letters, digits, hyphens (and underscores,
    which DNS allows) of at most 63 octets; the name at most 253 octets.
    """
    if name.endswith("."):
        name = name[:-1]
    if name.isascii():
        domain = name.lower()
    else:
        labels: list[str] = []
        for label in name.split("."):
            if label.isascii():
                labels.append(label.lower())
                continue
            try:
                a_label = unicodedata.normalize("NFC", label).lower().encode("idna")
            except UnicodeError:
                return None
            labels.append(a_label.decode("ascii").lower())
        domain = ".".join(labels)
    if len(domain) > _MAX_DOMAIN or not _DOMAIN.fullmatch(domain):
        return None
    return domain


class OrgDomain(Protocol):
    """Organizational Domain discovery (§3.2), the pluggable part of alignment.

    `org_domain` gets a normalised domain (see :func:`normalize_domain`) and returns its
    Organizational Domain — the domain itself or one of its parents — or None when it has
    none (a public suffix). It must be pure and fast: :func:`evaluate` calls it for the
    From, SPF and DKIM domains.
    """

    def org_domain(self, domain: str) -> str | None: ...


class PslOrgDomain:
    """§3.2 with the Public Suffix List bundled in ``publicsuffixlist`` (ICANN + private).

    Lookups are memoised (bounded LRU): the same few domains recur in a mail stream.
    """

    def __init__(
        self,
        psl: PublicSuffixList | None = None,
        *,
        only_icann: bool = False,
        cache_size: int = 16384,
    ) -> None:
        self._psl = psl if psl is not None else PublicSuffixList(only_icann=only_icann)
        self._lookup = functools.lru_cache(maxsize=cache_size)(self._uncached)

    def _uncached(self, domain: str) -> str | None:
        found = self._psl.privatesuffix(domain)
        return found if isinstance(found, str) else None

    def org_domain(self, domain: str) -> str | None:
        return self._lookup(domain)


_default_org: PslOrgDomain | None = None


def default_org_domain() -> PslOrgDomain:
    """The process-wide PSL Organizational Domain finder, loaded on first use (~30 ms)."""
    global _default_org
    if _default_org is None:
        _default_org = PslOrgDomain()
    return _default_org


def _aligned(identity: str, from_dom: str, from_org: str | None, mode: Alignment,
             org: OrgDomain) -> bool:
    """Alignment of two normalised domains, `from_org` being `from_dom`'s org domain."""
    if identity == from_dom:
        return True
    if mode is Alignment.STRICT or from_org is None:
        return False
    # Cheap pre-test: sharing an org domain means both end in it.
    if identity != from_org and not identity.endswith("." + from_org):
        return False
    return org.org_domain(identity) == from_org


def aligned(identity: str, from_dom: str, mode: Alignment = Alignment.RELAXED, *,
            org: OrgDomain | None = None) -> bool:
    """Whether an authenticated domain aligns with the From domain (§3.1).

    Strict: identical names. Relaxed: identical names or equal Organizational Domains; a
    name without one (a public suffix) aligns with nothing but itself. Invalid names never
    align.
    """
    a = normalize_domain(identity)
    b = normalize_domain(from_dom)
    if a is None or b is None:
        return False
    finder = default_org_domain() if org is None else org
    return _aligned(a, b, finder.org_domain(b), mode, finder)


# --------------------------------------------------------------------------- record syntax

# §6.4: dmarc-version = "v" *WSP "=" *WSP %x44 %x4d %x41 %x52 %x43 %x31, then dmarc-sep.
_VERSION: Final = re.compile(r"[ \t]*[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|\Z)")
_TAG: Final = re.compile(r"([A-Za-z][A-Za-z0-9_]*)[ \t]*=[ \t]*(.*?)[ \t]*", re.S)
_PCT: Final = re.compile(r"[0-9]{1,3}")
_RI: Final = re.compile(r"[0-9]{1,32}")
_FO: Final = re.compile(r"[01dsDS](?:[ \t]*:[ \t]*[01dsDS])*")
_RF: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                        r"(?:[ \t]*:[ \t]*[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")
# dmarc-uri = URI [ "!" 1*DIGIT [ "k" / "m" / "g" / "t" ] ]; "," and "!" in the URI itself
# must be %-encoded (§6.4), so neither can occur in it unencoded.
_URI: Final = re.compile(
    r"(?P<uri>[A-Za-z][A-Za-z0-9+.-]*:[^\s!,;]+)(?:!(?P<size>[0-9]+)(?P<unit>[kmgtKMGT]?))?"
)
_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_POLICIES: Final = {p.value: p for p in Policy}
_ALIGNMENTS: Final = {a.value: a for a in Alignment}
_KNOWN: Final = frozenset({"p", "sp", "pct", "adkim", "aspf", "fo", "rua", "ruf", "rf", "ri"})
_UINT32_MAX: Final = 2**32 - 1


def is_dmarc_record(text: str) -> bool:
    """Whether a TXT record starts with ``v=DMARC1`` (§6.6.3 step 2 keeps only these)."""
    return _VERSION.match(text) is not None


def _uris(value: str, tag: str, warnings: list[str]) -> tuple[ReportUri, ...]:
    uris: list[ReportUri] = []
    for item in value.split(","):
        item = item.strip(" \t")
        match = _URI.fullmatch(item)
        if match is None:
            warnings.append(f"{tag}: ignored invalid URI {item[:64]!r}")
            continue
        size = match["size"]
        max_size = None if size is None else int(size) * _UNITS[match["unit"].lower()]
        uris.append(ReportUri(match["uri"], max_size))
    return tuple(uris)


def check_dmarc_record(text: str) -> DmarcRecord | RecordError:
    """Parse a DMARC TXT record (§6.3, §6.4); a :class:`RecordError` says why it is unusable.

    See the module docstring for how strictly each tag is read.
    """
    version = _VERSION.match(text)
    if version is None:
        return RecordError("not a DMARC record: it does not start with v=DMARC1 (§6.3)")
    tags: dict[str, str] = {}
    duplicated: set[str] = set()
    order: list[str] = []
    warnings: list[str] = []
    unknown: list[str] = []
    for spec in text[version.end():].split(";"):
        spec = spec.strip(" \t")
        if not spec:
            continue
        match = _TAG.fullmatch(spec)
        if match is None:
            warnings.append(f"ignored malformed tag {spec[:32]!r}")
            continue
        name, value = match[1].lower(), match[2]
        order.append(name)
        if name not in _KNOWN:
            if name not in unknown:
                unknown.append(name)
            continue
        if name in tags:
            duplicated.add(name)
        tags[name] = value

    def value_of(name: str) -> str | None:
        if name in duplicated:
            warnings.append(f"{name}: given more than once, ignored")
            return None
        return tags.get(name)

    raw = value_of("rua")
    rua = _uris(raw, "rua", warnings) if raw is not None else ()
    raw = value_of("ruf")
    ruf = _uris(raw, "ruf", warnings) if raw is not None else ()

    raw_p, raw_sp = value_of("p"), value_of("sp")
    p = _POLICIES.get(raw_p.lower()) if raw_p is not None else None
    sp = _POLICIES.get(raw_sp.lower()) if raw_sp is not None else None
    p_fallback = False
    problem = None
    if raw_p is None:
        problem = "p= is missing" if "p" not in duplicated else "p= is given more than once"
    elif p is None:
        problem = f"p= has an invalid value {raw_p[:32]!r}"
    elif raw_sp is not None and sp is None:
        problem = f"sp= has an invalid value {raw_sp[:32]!r}"
    elif "sp" in duplicated:
        problem = "sp= is given more than once"
    if problem is not None:
        # §6.6.3: act as if "p=none" was published when rua has a valid URI.
        if not rua:
            return RecordError(f"{problem} and no valid rua= (§6.3, §6.6.3)")
        warnings.append(f"{problem}: read as p=none because rua= is valid (§6.6.3)")
        p, sp, p_fallback = Policy.NONE, None, True
    elif order and order[0] != "p":
        warnings.append("p= is not the tag after v= (§6.3); accepted")
    assert p is not None

    pct, ri = 100, 86400
    adkim = aspf = Alignment.RELAXED
    fo: tuple[str, ...] = ("0",)
    rf: tuple[str, ...] = ("afrf",)
    raw = value_of("pct")
    if raw is not None:
        if _PCT.fullmatch(raw) and int(raw) <= 100:
            pct = int(raw)
        else:
            warnings.append(f"pct: invalid value {raw[:32]!r}, using 100")
    raw = value_of("adkim")
    if raw is not None:
        if raw.lower() in _ALIGNMENTS:
            adkim = _ALIGNMENTS[raw.lower()]
        else:
            warnings.append(f"adkim: invalid value {raw[:32]!r}, using r")
    raw = value_of("aspf")
    if raw is not None:
        if raw.lower() in _ALIGNMENTS:
            aspf = _ALIGNMENTS[raw.lower()]
        else:
            warnings.append(f"aspf: invalid value {raw[:32]!r}, using r")
    raw = value_of("fo")
    if raw is not None:
        if _FO.fullmatch(raw):
            fo = tuple(x.strip(" \t").lower() for x in raw.split(":"))
        else:
            warnings.append(f"fo: invalid value {raw[:32]!r}, using 0")
    raw = value_of("rf")
    if raw is not None:
        if _RF.fullmatch(raw):
            rf = tuple(x.strip(" \t").lower() for x in raw.split(":"))
        else:
            warnings.append(f"rf: invalid value {raw[:32]!r}, using afrf")
    raw = value_of("ri")
    if raw is not None:
        if _RI.fullmatch(raw) and int(raw) <= _UINT32_MAX:
            ri = int(raw)
        else:
            warnings.append(f"ri: invalid value {raw[:32]!r}, using 86400")
    return DmarcRecord(
        p=p, sp=sp, pct=pct, adkim=adkim, aspf=aspf, fo=fo, rua=rua, ruf=ruf, rf=rf, ri=ri,
        p_fallback=p_fallback, warnings=tuple(warnings), unknown_tags=tuple(unknown),
    )


def parse_dmarc_record(text: str) -> DmarcRecord | None:
    """Parse a DMARC record; None when unusable (:func:`check_dmarc_record` says why)."""
    parsed = check_dmarc_record(text)
    return parsed if isinstance(parsed, DmarcRecord) else None


# --------------------------------------------------------------------------- discovery


class _NoName(Exception):
    """The _dmarc name cannot be queried (DnsNameError)."""


async def _dmarc_records(resolver: Resolver, domain: str) -> tuple[list[str], bool]:
    """The DMARC TXT records at _dmarc.<domain> and whether the name is NXDOMAIN."""
    try:
        answer = await resolver.query(f"_dmarc.{domain}", "TXT")
    except DnsNameError as exc:
        raise _NoName(str(exc)) from None
    return [r for r in answer.records if is_dmarc_record(r)], answer.nxdomain


async def discover_policy(
    from_domain: str, resolver: Resolver, *, org: OrgDomain | None = None
) -> PolicyLookup:
    """Find the DMARC record for an RFC5322.From domain (§6.6.3); never raises DNS errors."""
    domain = normalize_domain(from_domain)
    if domain is None:
        return PolicyLookup(LookupStatus.PERMERROR, from_domain,
                            reason="the From domain is not a valid domain name")
    org_dom = (default_org_domain() if org is None else org).org_domain(domain)
    nxdomain = False
    try:
        records, nxdomain = await _dmarc_records(resolver, domain)
    except DnsTemporaryError as exc:
        return PolicyLookup(LookupStatus.TEMPERROR, domain, org_dom, policy_domain=domain,
                            reason=f"DNS error for _dmarc.{domain}: {exc}")
    except _NoName:
        records = []  # too long to exist: no record here, go on at the org domain
    at_org = False
    where = domain
    if not records and org_dom is not None and org_dom != domain:
        where, at_org = org_dom, True
        try:
            records, _ = await _dmarc_records(resolver, org_dom)
        except DnsTemporaryError as exc:
            return PolicyLookup(LookupStatus.TEMPERROR, domain, org_dom, policy_domain=where,
                                from_nxdomain=nxdomain,
                                reason=f"DNS error for _dmarc.{org_dom}: {exc}")
        except _NoName as exc:
            return PolicyLookup(LookupStatus.PERMERROR, domain, org_dom, policy_domain=where,
                                from_nxdomain=nxdomain, reason=f"DNS name error: {exc}")
    if not records:
        return PolicyLookup(LookupStatus.NONE, domain, org_dom, from_nxdomain=nxdomain,
                            reason="no DMARC record")
    if len(records) > 1:
        return PolicyLookup(LookupStatus.NONE, domain, org_dom, policy_domain=where,
                            found_at_org_domain=at_org, from_nxdomain=nxdomain,
                            reason=f"{len(records)} DMARC records at _dmarc.{where} (§6.6.3)")
    parsed = check_dmarc_record(records[0])
    if isinstance(parsed, RecordError):
        return PolicyLookup(LookupStatus.PERMERROR, domain, org_dom, policy_domain=where,
                            found_at_org_domain=at_org, from_nxdomain=nxdomain,
                            reason=f"invalid DMARC record at _dmarc.{where}: {parsed.reason}")
    return PolicyLookup(LookupStatus.FOUND, domain, org_dom, record=parsed, policy_domain=where,
                        found_at_org_domain=at_org, from_nxdomain=nxdomain,
                        reason=f"record at _dmarc.{where}")


# --------------------------------------------------------------------------- evaluation

_NOT_FOUND: Final = {
    LookupStatus.NONE: DmarcStatus.NONE,
    LookupStatus.TEMPERROR: DmarcStatus.TEMPERROR,
    LookupStatus.PERMERROR: DmarcStatus.PERMERROR,
}


def evaluate(
    from_domain: str,
    policy_lookup: PolicyLookup,
    spf: SpfIdentity | None,
    dkim: Sequence[DkimIdentity],
    *,
    pct_roll: float | None = None,
    org: OrgDomain | None = None,
) -> DmarcResult:
    """The DMARC result and disposition for a message (§3.1, §4.2, §6.6.2 to §6.6.4).

    `pct_roll` is the sampling draw in [0, 1) (default `random.random()`, drawn only for a
    failure under a policy other than none with pct < 100); the message is inside the
    sample when ``roll < pct / 100``.
    Never raises for any domain strings.
    """
    domain = normalize_domain(from_domain)
    if domain is None:
        return DmarcResult(DmarcStatus.PERMERROR, from_domain,
                           reason="the From domain is not a valid domain name")
    finder = default_org_domain() if org is None else org
    from_org = finder.org_domain(domain)
    record = policy_lookup.record
    adkim = aspf = Alignment.RELAXED
    if record is not None:
        adkim, aspf = record.adkim, record.aspf

    # §4.2: a pass of either mechanism with an aligned identifier is a DMARC pass.
    spf_ok = False
    if spf is not None and spf.result.lower() == "pass":
        spf_dom = normalize_domain(spf.domain)
        spf_ok = spf_dom is not None and _aligned(spf_dom, domain, from_org, aspf, finder)
    dkim_dom: str | None = None
    for sig in dkim:
        if sig.result.lower() != "pass":
            continue
        d = normalize_domain(sig.domain)
        if d is not None and _aligned(d, domain, from_org, adkim, finder):
            dkim_dom = d
            break
    dkim_ok = dkim_dom is not None
    where = policy_lookup.policy_domain

    if policy_lookup.status is not LookupStatus.FOUND or record is None:
        status = _NOT_FOUND.get(policy_lookup.status, DmarcStatus.NONE)
        return DmarcResult(status, domain, org_domain=from_org, policy_domain=where,
                           spf_aligned=spf_ok, dkim_aligned=dkim_ok,
                           aligned_dkim_domain=dkim_dom,
                           reason=policy_lookup.reason or status.value)

    use_sp = policy_lookup.found_at_org_domain
    policy = record.subdomain_policy if use_sp else record.p
    if spf_ok or dkim_ok:
        via = "SPF" if spf_ok else f"DKIM d={dkim_dom}"
        return DmarcResult(DmarcStatus.PASS, domain, Policy.NONE, policy, record,
                           policy_domain=where, org_domain=from_org,
                           subdomain_policy_applied=use_sp, spf_aligned=spf_ok,
                           dkim_aligned=dkim_ok, aligned_dkim_domain=dkim_dom,
                           reason=f"aligned {via}")

    disposition, sampled = policy, True
    if policy is not Policy.NONE and record.pct < 100:
        roll = random.random() if pct_roll is None else pct_roll
        if not roll < record.pct / 100:
            sampled = False
            disposition = policy.downgraded()
    reason = "no aligned SPF or DKIM pass"
    if not sampled:
        reason += f"; outside pct={record.pct}: {policy.value} downgraded"
    return DmarcResult(DmarcStatus.FAIL, domain, disposition, policy, record,
                       policy_domain=where, org_domain=from_org,
                       subdomain_policy_applied=use_sp, sampled=sampled, reason=reason)


# --------------------------------------------------------------------------- From header

_END_OF_HEADER: Final = re.compile(rb"\r?\n\r?\n")
_LINES: Final = re.compile(r"\r?\n")
_SPECIALS: Final = frozenset('()<>[]:;@\\,."')
_WSP: Final = frozenset(" \t\r\n")


class _Syntax(Exception):
    pass


def _tokens(value: str) -> list[tuple[str, str]]:
    """RFC 5322 §3.2 lexical tokens of a header value; comments and CFWS dropped.

    Kinds: "atom", "quoted", "literal", or the special character itself.
    """
    out: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c in _WSP:
            i += 1
        elif c == "(":  # comment, may nest, may hold quoted-pairs (§3.2.2)
            depth = 1
            i += 1
            while depth:
                if i >= n:
                    raise _Syntax("unterminated comment")
                c = value[i]
                if c == "\\":
                    i += 1
                elif c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                i += 1
        elif c == '"':  # quoted-string (§3.2.4)
            j = i + 1
            text: list[str] = []
            while True:
                if j >= n:
                    raise _Syntax("unterminated quoted string")
                c = value[j]
                if c == "\\":
                    j += 1
                    if j < n:
                        text.append(value[j])
                elif c == '"':
                    break
                else:
                    text.append(c)
                j += 1
            out.append(("quoted", "".join(text)))
            i = j + 1
        elif c == "[":  # domain-literal (§3.4.1)
            j = value.find("]", i)
            if j < 0:
                raise _Syntax("unterminated domain literal")
            out.append(("literal", value[i:j + 1]))
            i = j + 1
        elif c in "<>@,:;.":
            out.append((c, c))
            i += 1
        elif c in _SPECIALS:
            raise _Syntax(f"unexpected {c!r}")
        else:
            j = i
            while j < n and value[j] not in _SPECIALS and value[j] not in _WSP:
                if ord(value[j]) < 0x20 or value[j] == "\x7f":
                    raise _Syntax("control character")
                j += 1
            out.append(("atom", value[i:j]))
            i = j
    return out


def _mailbox_domain(tokens: list[tuple[str, str]]) -> str | FromError:
    """The domain of one mailbox (name-addr or addr-spec, RFC 5322 §3.4)."""
    kinds = [k for k, _ in tokens]
    if "<" in kinds:
        start = kinds.index("<")
        if kinds.count("<") != 1 or kinds.count(">") != 1 or kinds[-1] != ">":
            return FromError(FromProblem.SYNTAX, "malformed angle address")
        # The display name may hold atoms, quoted strings, "." and (sloppily) "@".
        if any(k not in ("atom", "quoted", ".", "@") for k in kinds[:start]):
            return FromError(FromProblem.SYNTAX, "malformed display name")
        spec = tokens[start + 1:-1]
        if spec and spec[0][0] == "@":  # obs-route (RFC 5322 §4.4): "@a,@b:" is ignored
            kinds_spec = [k for k, _ in spec]
            if ":" not in kinds_spec:
                return FromError(FromProblem.SYNTAX, "malformed route")
            spec = spec[kinds_spec.index(":") + 1:]
    elif ">" in kinds:
        return FromError(FromProblem.SYNTAX, "unmatched '>'")
    else:
        spec = tokens
    at = [i for i, (k, _) in enumerate(spec) if k == "@"]
    if not at:
        return FromError(FromProblem.NO_DOMAIN, "the From address has no domain")
    if len(at) > 1:
        return FromError(FromProblem.SYNTAX, "more than one unquoted '@' in the address")
    local, dom = spec[:at[0]], spec[at[0] + 1:]
    if any(k not in ("atom", "quoted", ".") for k, _ in local):
        return FromError(FromProblem.SYNTAX, "malformed local part")
    if any(k == "literal" for k, _ in dom):
        return FromError(FromProblem.NO_DOMAIN, "the From address has an address literal")
    if not dom or any(k not in ("atom", ".") for k, _ in dom):
        return FromError(FromProblem.NO_DOMAIN, "the From address has no domain name")
    text = "".join(t for _, t in dom)
    domain = normalize_domain(text) if not text.endswith(".") else None
    if domain is None:
        return FromError(FromProblem.NO_DOMAIN, f"invalid From domain {text[:64]!r}")
    return domain


def _from_value_domain(value: str) -> str | FromError:
    try:
        tokens = _tokens(value)
    except _Syntax as exc:
        return FromError(FromProblem.SYNTAX, str(exc))
    # Group syntax (RFC 5322 §3.4, RFC 6854): display-name ":" [mailbox-list] ";".
    depth = 0
    colon = None
    for i, (k, _) in enumerate(tokens):
        if k == "<":
            depth += 1
        elif k == ">":
            depth -= 1
        elif k == ":" and depth == 0:
            colon = i
            break
    if colon is not None:
        if not tokens or tokens[-1][0] != ";":
            return FromError(FromProblem.SYNTAX, "unterminated group")
        tokens = tokens[colon + 1:-1]
    elements: list[list[tuple[str, str]]] = [[]]
    depth = 0
    for token in tokens:
        kind = token[0]
        if kind == "<":
            depth += 1
        elif kind == ">":
            depth -= 1
        if kind == "," and depth == 0:
            elements.append([])
        elif kind in (":", ";") and depth == 0:
            return FromError(FromProblem.SYNTAX, f"unexpected {kind!r}")
        else:
            elements[-1].append(token)
    mailboxes = [e for e in elements if e]  # obs-mbox-list allows empty elements (§4.4)
    if not mailboxes:
        return FromError(FromProblem.NO_ADDRESS, "the From field holds no address")
    results = [_mailbox_domain(m) for m in mailboxes]
    if len(results) > 1:
        domains = tuple(dict.fromkeys(r for r in results if isinstance(r, str)))
        return FromError(FromProblem.MULTIPLE_ADDRESSES,
                         f"{len(results)} addresses in the From field", domains)
    return results[0]


def from_domain(headers: bytes) -> str | FromError | None:
    """The RFC5322.From domain (lowercase A-label) of a header section (§3.1, §6.6.1).

    None when there is no From field; a :class:`FromError` for several From fields,
    several addresses, no address, no domain name, or unparseable syntax. `headers` may be
    the whole message: reading stops at the first empty line.
    """
    if headers.startswith((b"\r\n", b"\n")):
        return None  # an empty header section: what follows is the body
    end = _END_OF_HEADER.search(headers)
    if end is not None:
        headers = headers[:end.start()]
    text = headers.decode("utf-8", "surrogateescape")
    fields: list[list[str]] = []
    current: list[str] | None = None
    for line in _LINES.split(text):
        if line[:1] in (" ", "\t"):
            if current is not None:
                current.append(line)  # unfolding removes only the CRLF (RFC 5322 §2.2.3)
            continue
        name, colon, rest = line.partition(":")
        if colon and name.rstrip(" \t").lower() == "from":
            current = [rest]
            fields.append(current)
        else:
            current = None
    if not fields:
        return None
    values = ["".join(f) for f in fields]
    if len(values) > 1:
        domains = tuple(dict.fromkeys(
            d for d in map(_from_value_domain, values) if isinstance(d, str)))
        return FromError(FromProblem.MULTIPLE_FIELDS, f"{len(values)} From fields", domains)
    return _from_value_domain(values[0])
