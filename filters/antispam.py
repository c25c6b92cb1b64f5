"""MESSAGE: spam scanning with Rspamd, scanned once per message and decided per tenant.

Theory of operation
-------------------
`AntispamCheck` runs at the MESSAGE stage once per tenant of the transaction. The first
tenant's call scans the message (`ctx.once("antispam", ...)`, through the `RspamdClient`
in `ctx.services.rspamd`); the others await the same scan and get the same `SpamResult`
(or the same `SpamScanError`). With no scanner configured (`services.rspamd` missing or
None) the filter records a skip and has no opinion.

What Rspamd is told: the client's IP, HELO name, its forward-confirmed reverse DNS name
(the fact "rdns" of filters/rdns.py, computed once per transaction through
`ctx.services.dns`; without it Rspamd scores HFILTER_HOSTNAME_UNKNOWN), the envelope
sender and the recipients of the tenant that scans first (MESSAGE views only show a tenant
its own recipients), our hostname and the session id as Queue-Id, and the SPF, DKIM and
DMARC results the authentication filters already computed (facts "spf", "dkim", "dmarc",
used only when they are finished: run `spf`/`dkim`/`dmarc` before `antispam` in
`[pipeline] message`). See filters/rspamd.py for how Rspamd takes them.

Each tenant then decides from the shared result with its own policy (`decide`, a pure
function), comparing the score with the tenant's thresholds, highest first:

    score >= spam_reject_score      REJECT 550 5.7.1 "Message rejected as spam"
    score >= spam_quarantine_score  QUARANTINE (the copy goes to the tenant's quarantine)
    score >= spam_tag_score         CONTINUE, tagged: X-Spam-Flag: YES, X-Spam-Score,
                                    X-Spam-Status: Yes, score=.. required=.. tests=..
    below                           CONTINUE with X-Spam-Score (informative)

A threshold set to None is never reached. Rspamd's own `action` does not decide, except
when Rspamd settled the message before scoring (`forced`, e.g. GTUBE or a force_actions
rule): a forced "reject" counts as the highest score there is (the tenant's strongest
configured reaction applies), a forced "add header"/"rewrite subject" at least as the tag
threshold. The headers go only into the copy of the tenant that earned them (Verdict.
add_headers); a REJECT in a transaction another tenant accepts puts this tenant's copy in
its quarantine (gateway/inbound.py), never a bounce.

Filing tagged mail into Junk is the mailbox's job. With Dovecot's Pigeonhole Sieve, a
global before-script (`sieve_before = /etc/dovecot/sieve/spam.sieve`, compiled with
`sievec`) does it for every mailbox:

    require "fileinto";
    if header :is "X-Spam-Flag" "YES" {
        fileinto "Junk";
        stop;
    }

(`:is` compares case-insensitively; add `require "mailbox"; fileinto :create "Junk";` when
the folder may not exist yet.)

Scanner down (connection refused, timeout, 5xx, garbage): TEMPFAIL 451 4.3.2 "Content
scanner unavailable, try again later", unless the tenant's policy says
`antispam_fail_open`: then the message goes on, with `X-Spam-Status: unscanned`. A message
larger than the client's `max_size` is not scanned (CONTINUE, `X-Spam-Status: unscanned`,
a skip in the results record). The client's `timeout` ([antispam] timeout) must stay below
this filter's `timeout` (60 s), so that a slow scanner is a SpamScanError that
fail-open can act on and not a pipeline timeout (always TEMPFAIL).

Sender allow and block lists, per tenant policy (`spam_allow_senders`,
`spam_block_senders`: lists of addresses "user@example.com" or domains "@example.com";
matched case-insensitively, subaddresses ignored, IDN domains as A-labels) against the
envelope sender and the header From addresses:

* blocked: REJECT 550 5.7.1 "Message rejected by recipient policy", whatever the score
  (the scan is still made once for the transaction's other tenants);
* allowed: no spam decision at all (CONTINUE with X-Spam-Score / X-Spam-Status for
  information; a scanner outage does not defer it). Because sender addresses are trivially
  forged, an allow entry counts only for an *authenticated* identity: the envelope sender
  with SPF pass, or the header From domain with DMARC pass (facts "spf" and "dmarc").
  An unauthenticated match is recorded and ignored (the message is scored as usual).
* the most specific matching entry wins (an address beats a domain); between equally
  specific allow and block entries, block wins.

The results record gets one line per tenant: pass (below tag), fail (tagged, quarantined,
rejected or blocked), skip (no scanner, not scanned) or error (scanner down), with the
score in the detail as "score=N.NN"; the SpamResult itself is the transaction fact
"antispam" (`ctx.fact("antispam")`) for whoever needs the score later (DSN, logs).
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from filters import authentication as auth
from filters.base import CONTINUE, Action, Context, Outcome, Reply, Stage, Verdict
from filters.dkim import DkimResult
from filters.dmarc import DmarcResult, DmarcStatus, Policy
from filters.rdns import rdns_of
from filters.rspamd import RspamdClient, SpamResult, SpamScanError
from filters.spf import SpfResult

__all__ = [
    "ANTISPAM",
    "SCANNER_UNAVAILABLE",
    "SENDER_BLOCKED",
    "SPAM_REJECT",
    "AntispamCheck",
    "Listing",
    "SenderListing",
    "decide",
    "decide_unscanned",
    "sender_listing",
]

ANTISPAM = "antispam"  # transaction fact: the SpamResult

SPAM_REJECT = Reply(550, "5.7.1", "Message rejected as spam")
SENDER_BLOCKED = Reply(550, "5.7.1", "Message rejected by recipient policy")
SCANNER_UNAVAILABLE = Reply(451, "4.3.2", "Content scanner unavailable, try again later")

FLAG = "X-Spam-Flag"
SCORE = "X-Spam-Score"
STATUS = "X-Spam-Status"
UNSCANNED = "unscanned"

# The model's defaults (tenant_api_client.models.Policy), for policies that lack a key.
_DEFAULT_THRESHOLDS = {"spam_tag_score": 5.0, "spam_quarantine_score": 10.0,
                       "spam_reject_score": 15.0}
_MAX_STATUS = 900  # characters of X-Spam-Status: one unfolded line well under 998


# -- the decision -------------------------------------------------------------------


def _threshold(policy: Mapping[str, Any], key: str) -> float | None:
    value = policy.get(key, _DEFAULT_THRESHOLDS[key])
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _effective_score(result: SpamResult, tag: float | None) -> float:
    """The score the thresholds are compared with (see the module docstring: forced)."""
    if result.forced and result.action == "reject":
        return math.inf
    if result.forced and result.action in ("add header", "rewrite subject") and tag is not None:
        return max(result.score, tag)
    return result.score


def _status(word: str, result: SpamResult, required: float | None) -> str:
    head = f"{word}, score={result.score:.2f}"
    if required is not None:
        head += f" required={required:.2f}"
    symbols = result.top_symbols() or sorted(result.symbols.items())
    if not symbols:
        return head
    text = head + " tests="
    for index, (name, score) in enumerate(symbols):
        item = f"{',' if index else ''}{name}({score:.2f})"
        if len(text) + len(item) > _MAX_STATUS:
            return text + ",..."
        text += item
    return text


def _spam_headers(result: SpamResult, required: float | None) -> tuple[tuple[str, str], ...]:
    return ((FLAG, "YES"), (SCORE, f"{result.score:.2f}"),
            (STATUS, _status("Yes", result, required)))


def _why(result: SpamResult) -> str:
    if result.forced:
        names = ",".join(sorted(result.symbols)) or "no symbol"
        return f"forced {result.action} by rspamd ({names})"
    return f"score {result.score:.2f}"


def decide(result: SpamResult, policy: Mapping[str, Any], *, allowed: bool = False) -> Verdict:
    """One tenant's verdict on a scanned message (pure: the table in the module docstring).

    `allowed`: the sender is on the tenant's allow list (authenticated): headers for
    information only, never a spam decision.
    """
    tag = _threshold(policy, "spam_tag_score")
    if result.skipped:
        return Verdict(Action.CONTINUE, reason=f"not scanned: {result.reason}",
                       add_headers=((STATUS, UNSCANNED),))
    if allowed:
        return Verdict(Action.CONTINUE, reason=f"sender allowlisted, {_why(result)}",
                       add_headers=((SCORE, f"{result.score:.2f}"),
                                    (STATUS, _status("No", result, tag) + " allowlisted")))
    score = _effective_score(result, tag)
    reject = _threshold(policy, "spam_reject_score")
    quarantine = _threshold(policy, "spam_quarantine_score")
    if reject is not None and score >= reject:
        return Verdict(Action.REJECT, SPAM_REJECT,
                       reason=f"spam: {_why(result)} >= reject {reject:.2f}")
    if quarantine is not None and score >= quarantine:
        return Verdict(Action.QUARANTINE,
                       reason=f"spam: {_why(result)} >= quarantine {quarantine:.2f}",
                       add_headers=_spam_headers(result, tag))
    if tag is not None and score >= tag:
        return Verdict(Action.CONTINUE, reason=f"spam: {_why(result)} >= tag {tag:.2f}",
                       add_headers=_spam_headers(result, tag))
    return Verdict(Action.CONTINUE, reason=f"ham: {_why(result)}",
                   add_headers=((SCORE, f"{result.score:.2f}"),))


def decide_unscanned(policy: Mapping[str, Any], *, reason: str,
                     allowed: bool = False) -> Verdict:
    """One tenant's verdict when the scanner failed: 451, or on with fail-open/allowed."""
    if allowed or policy.get("antispam_fail_open"):
        why = "sender allowlisted" if allowed else "antispam_fail_open"
        return Verdict(Action.CONTINUE, reason=f"unscanned ({why}): {reason}",
                       add_headers=((STATUS, UNSCANNED),))
    return Verdict(Action.TEMPFAIL, SCANNER_UNAVAILABLE, reason=f"scanner unavailable: {reason}")


# -- allow and block lists -------------------------------------------------------------


class Listing(enum.Enum):
    NONE = "none"
    ALLOWED = "allowed"
    BLOCKED = "blocked"


@dataclass(frozen=True, slots=True)
class SenderListing:
    """What the tenant's lists say about this message's senders."""

    kind: Listing
    entry: str = ""  # the list entry that decided
    identity: str = ""  # the address it matched
    ignored: str = ""  # an allow match that did not count, and why (for the results record)


def _domain(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def _normalise(address: str) -> tuple[str, str] | None:
    """(local part case-folded without +subaddress, A-label domain) or None."""
    address = address.strip().strip("<>")
    local, at, domain = address.rpartition("@")
    if not at or not domain:
        return None
    return local.casefold().split("+", 1)[0], _domain(domain)


def _entries(policy: Mapping[str, Any], key: str) -> list[str]:
    value = policy.get(key) or ()
    if isinstance(value, str):
        value = (value,)
    return [v for v in value if isinstance(v, str) and "@" in v]


def _match(entries: Sequence[str], local: str, domain: str) -> tuple[int, str]:
    """(specificity, entry) of the best matching entry: 2 address, 1 domain, 0 none."""
    best = (0, "")
    for entry in entries:
        if entry.startswith("@"):
            if _domain(entry[1:]) == domain and best[0] < 1:
                best = (1, entry)
        else:
            normal = _normalise(entry)
            if normal == (local, domain):
                return 2, entry
    return best


def sender_listing(policy: Mapping[str, Any], *, envelope_sender: str,
                   header_from: Iterable[str] = (), spf_pass_domain: str | None = None,
                   dmarc_pass_domain: str | None = None) -> SenderListing:
    """Apply `spam_allow_senders` / `spam_block_senders` (see the module docstring).

    `spf_pass_domain`: the envelope sender's domain if SPF passed for it;
    `dmarc_pass_domain`: the header From domain if DMARC passed for it.
    """
    allow = _entries(policy, "spam_allow_senders")
    block = _entries(policy, "spam_block_senders")
    if not allow and not block:
        return SenderListing(Listing.NONE)
    identities: list[tuple[str, bool]] = []  # (address, authenticated)
    if envelope_sender:
        normal = _normalise(envelope_sender)
        identities.append((envelope_sender, normal is not None and spf_pass_domain is not None
                           and normal[1] == _domain(spf_pass_domain)))
    for address in header_from:
        normal = _normalise(address)
        identities.append((address, normal is not None and dmarc_pass_domain is not None
                           and normal[1] == _domain(dmarc_pass_domain)))
    best_block: tuple[int, str, str] = (0, "", "")
    best_allow: tuple[int, str, str] = (0, "", "")
    ignored = ""
    for address, authenticated in identities:
        normal = _normalise(address)
        if normal is None:
            continue
        rank, entry = _match(block, *normal)
        if rank > best_block[0]:
            best_block = (rank, entry, address)
        rank, entry = _match(allow, *normal)
        if rank and not authenticated:
            ignored = ignored or f"allow entry {entry} matched unauthenticated {address}"
        elif rank > best_allow[0]:
            best_allow = (rank, entry, address)
    if best_allow[0] > best_block[0]:
        return SenderListing(Listing.ALLOWED, best_allow[1], best_allow[2], ignored)
    if best_block[0]:
        return SenderListing(Listing.BLOCKED, best_block[1], best_block[2], ignored)
    return SenderListing(Listing.NONE, ignored=ignored)


def _header_from(header_bytes: bytes) -> list[str]:
    """The addresses of the message's From field(s)."""
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
        header_bytes)
    fields = [str(value) for value in parsed.get_all("From") or ()]
    return [address for _, address in email.utils.getaddresses(fields) if address]


# -- what Rspamd is told ------------------------------------------------------------------


def _spf_word(ctx: Context) -> str | None:
    spf = ctx.fact(auth.SPF)
    return spf.result if isinstance(spf, SpfResult) else None


def _dkim_words(ctx: Context) -> list[tuple[str, str]] | str | None:
    dkim = ctx.fact(auth.DKIM)
    if not isinstance(dkim, list):
        return None
    if not dkim:
        return "none"
    return [(d.result, d.domain) for d in dkim if isinstance(d, DkimResult)]


def _dmarc_word(ctx: Context) -> str | None:
    dmarc = ctx.fact(auth.DMARC)
    if not isinstance(dmarc, DmarcResult):
        return None
    if dmarc.result is DmarcStatus.FAIL:
        published = dmarc.policy or Policy.NONE
        return {Policy.REJECT: "reject", Policy.QUARANTINE: "quarantine"}.get(published,
                                                                               "softfail")
    word: str = dmarc.result.value
    return word


async def _client_hostname(ctx: Context) -> str | None:
    """The client's forward-confirmed name (fact "rdns"), None without one or a resolver."""
    if getattr(ctx.services, "dns", None) is None:
        return None
    return (await rdns_of(ctx)).name


async def _scan(ctx: Context, client: RspamdClient) -> SpamResult:
    message = ctx.message
    assert message is not None
    hostname = await _client_hostname(ctx)
    return await client.check(
        message.content(), ip=ctx.session.client_ip, helo=ctx.session.helo,
        sender=ctx.envelope.sender, recipients=[r.address for r in ctx.envelope.recipients],
        hostname=hostname, queue_id=ctx.session.session_id,
        mta_name=getattr(ctx.services, "hostname", None),
        spf=_spf_word(ctx), dkim=_dkim_words(ctx), dmarc=_dmarc_word(ctx))


def _listing(ctx: Context, policy: Mapping[str, Any]) -> SenderListing:
    if not (policy.get("spam_allow_senders") or policy.get("spam_block_senders")):
        return SenderListing(Listing.NONE)
    message = ctx.message
    spf = ctx.fact(auth.SPF)
    dmarc = ctx.fact(auth.DMARC)
    return sender_listing(
        policy, envelope_sender=ctx.envelope.sender,
        header_from=_header_from(message.header_bytes) if message is not None else (),
        spf_pass_domain=spf.domain if isinstance(spf, SpfResult) and spf.result == "pass"
        and spf.identity == "mailfrom" else None,
        dmarc_pass_domain=dmarc.from_domain if isinstance(dmarc, DmarcResult)
        and dmarc.result is DmarcStatus.PASS else None)


class AntispamCheck:
    """MESSAGE: scan once with Rspamd, then apply the tenant's spam thresholds and lists."""

    name: ClassVar[str] = "antispam"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.MESSAGE})
    timeout: ClassVar[float] = 60.0  # keep [antispam] timeout (the client's) below this
    on_error: ClassVar[Action] = Action.TEMPFAIL

    async def check(self, ctx: Context) -> Verdict:
        client: RspamdClient | None = getattr(ctx.services, "rspamd", None)
        if client is None or ctx.message is None:
            ctx.note(Outcome.SKIP, "no scanner configured" if client is None else "no message")
            return CONTINUE
        policy: Mapping[str, Any] = ctx.tenant.policy if ctx.tenant is not None else {}
        listing = _listing(ctx, policy)
        suffix = f"; {listing.ignored}" if listing.ignored else ""
        if listing.kind is Listing.BLOCKED:
            ctx.note(Outcome.FAIL, f"sender {listing.identity} blocked by {listing.entry}"
                     + suffix)
            return Verdict(Action.REJECT, SENDER_BLOCKED,
                           reason=f"sender {listing.identity} on block list ({listing.entry})")
        allowed = listing.kind is Listing.ALLOWED
        if allowed:
            suffix += f"; sender {listing.identity} allowed by {listing.entry}"
        try:
            result = await ctx.once(ANTISPAM, lambda: _scan(ctx, client))
        except SpamScanError as exc:
            verdict = decide_unscanned(policy, reason=str(exc), allowed=allowed)
            ctx.note(Outcome.ERROR, f"scanner unavailable: {exc}; "
                     f"{verdict.action.value}{suffix}")
            return verdict
        verdict = decide(result, policy, allowed=allowed)
        if result.skipped:
            outcome = Outcome.SKIP
        elif verdict.action is Action.CONTINUE and not any(
                name == FLAG for name, _ in verdict.add_headers):
            outcome = Outcome.PASS
        else:
            outcome = Outcome.FAIL
        ctx.note(outcome, f"score={result.score:.2f} rspamd_action={result.action} "
                 f"{verdict.action.value}: {verdict.reason}{suffix}")
        return verdict
