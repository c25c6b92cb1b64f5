"""What the inbound SMTP dialogue decides, stage by stage, free of wire details.

The SMTP handler parses commands and frames replies; this module decides them:

* CONNECT, HELO, MAIL run their filters. A REJECT or TEMPFAIL there is *held* on the
  session and applied at RCPT, in the tenant's context, so postmaster@ and abuse@
  stay reachable (RFC 5321 §4.5.1 requires postmaster to be).
* RCPT resolves the recipient through the tenant directory (the built-in check that
  keeps the node from ever being an open relay: only hosted mailboxes are accepted),
  applies held denials, then runs the RCPT filters with the tenant known.
* DATA runs the MESSAGE filters once per tenant of the transaction, combines the
  tenants' verdicts into one reply (most cautious common answer), writes every copy
  durably (queue, or the tenant's quarantine) and only then answers 250.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from filters import authentication as auth
from filters import reputation
from filters.access_lists import allowlisted
from filters.base import CONTINUE, Action, Reply, Stage, Verdict
from filters.clamav import ClamdClient
from filters.dmarc import DmarcResult
from filters.dns import Resolver
from filters.rspamd import RspamdClient
from filters.state import StateStore
from gateway import replies
from gateway.addresses import Address
from gateway.config import Settings
from gateway.headers import (
    authentication_results,
    received_header,
    remove_fields,
    remove_forged_auth_results,
)
from gateway.metrics import Metrics
from gateway.pipeline import FilterContext, Pipeline, StageResult, combine_message_verdicts
from gateway.quarantine import Quarantine
from gateway.queue import PerTenant, Queue
from gateway.session import (
    AcceptedRecipient,
    EnvelopeViewImpl,
    HeldDenial,
    MessageData,
    Session,
    SessionView,
    TenantViewImpl,
    Transaction,
    header_end,
)
from gateway.spool import Envelope, QueueIdFactory, Spool, SpoolError, SpoolFull, SpoolRecipient
from lmtp import CrlfBytes, DotFreeCrlfBytes, crlf_only
from tenant_api_client import Recipient, Tenant, TenantDirectory, Unavailable, Unknown

log = logging.getLogger(__name__)

# Local parts that stay reachable whatever a reputation or policy check held against
# the client: the addresses a blocked sender needs to ask why (RFC 5321 §4.5.1, RFC 2142).
ALWAYS_REACHABLE = frozenset({"postmaster", "abuse"})
MAX_ALIAS_DEPTH = 4
_AR_FIELD = b"authentication-results"
# Header fields only our own checks write: whatever a sender put there is removed.
OUR_FIELDS = frozenset({b"x-spam-flag", b"x-spam-score", b"x-spam-status", b"x-spam-level",
                        b"x-mailedge-virus-scan"})


_NO_FILTERS = StageResult(CONTINUE, "")


@dataclass(frozen=True, slots=True)
class Services:
    """What filters may use (ctx.services)."""

    directory: TenantDirectory
    dns: Resolver
    hostname: str  # our name: SPF's receiver, the authserv-id
    settings: Settings  # filters read their own section: settings.dnsbl, .limits, ...
    state: StateStore  # shared (Redis) or node-local counters, windows, sets
    clamav: ClamdClient | None = None
    rspamd: RspamdClient | None = None


@dataclass(frozen=True, slots=True)
class DataOutcome:
    reply: Reply
    queue_ids: tuple[str, ...] = ()


class Inbound:
    def __init__(self, settings: Settings, directory: TenantDirectory, pipeline: Pipeline,
                 spool: Spool, queue: Queue, quarantine: Quarantine, metrics: Metrics,
                 ids: QueueIdFactory, dns: Resolver, state: StateStore,
                 clamav: ClamdClient | None = None, rspamd: RspamdClient | None = None) -> None:
        self.settings = settings
        self.directory = directory
        self.pipeline = pipeline
        self.spool = spool
        self.queue = queue
        self.quarantine = quarantine
        self.metrics = metrics
        self.ids = ids
        self.services = Services(directory=directory, dns=dns,
                                 hostname=settings.inbound.hostname, settings=settings,
                                 state=state, clamav=clamav, rspamd=rspamd)
        self.hostname = settings.inbound.hostname
        self._recipients_accepted = PerTenant(metrics.recipients_accepted, metrics.tenant)
        self._accepted = PerTenant(metrics.accepted, metrics.tenant)

    # -- stages before RCPT -----------------------------------------------------------

    def _context(self, stage: Stage, session: Session, txn: Transaction | None,
                 current: AcceptedRecipient | None = None,
                 recipients: Sequence[AcceptedRecipient] = (),
                 tenant: TenantViewImpl | None = None,
                 message: MessageData | None = None) -> FilterContext:
        size = message.size if message else (txn.declared_size if txn else 0)
        results = txn.results if txn is not None else session.results
        return FilterContext(stage, SessionView(session),
                             EnvelopeViewImpl(txn, recipients, current, size), tenant, message,
                             self.services, results,
                             session.results if results is not session.results else None)

    async def _early_stage(self, stage: Stage, session: Session,
                           txn: Transaction | None) -> Reply | None:
        if not self.pipeline.stages[stage]:
            return None  # no filters configured here: nothing to decide or hold
        result = await self.pipeline.run(self._context(stage, session, txn))
        reply = result.verdict.reply
        if stage is Stage.CONNECT and reply is not None and reply.code == 421:
            # 421 closes the channel (RFC 5321 §3.8): a resource limit acts at once.
            # (Only CONNECT for now: helo() and mail() would have to act on it too.)
            log.info("session=%s %s from %s at %s: %s", session.session_id, reply,
                     result.filter, stage.value, result.verdict.reason)
            return reply
        if result.verdict.action in (Action.REJECT, Action.TEMPFAIL):
            log.info("session=%s held %s from %s at %s: %s", session.session_id,
                     result.verdict.action.value, result.filter, stage.value,
                     result.verdict.reason)
            session.held.append(HeldDenial(stage, result.filter, result.verdict))
        return None

    async def connect(self, session: Session) -> Reply | None:
        """Run the CONNECT filters; a 421 to send instead of the banner (then close)."""
        return await self._early_stage(Stage.CONNECT, session, None)

    async def closed(self, session: Session) -> None:
        """The connection ended (however): filters with a disconnect hook hear of it."""
        if self.pipeline.closers:
            await self.pipeline.session_closed(SessionView(session))

    def tarpit(self, session: Session) -> float:
        """Seconds to delay replies to this client (reputation's tarpit fact), 0 if none."""
        value = _done(session.results.facts.get(reputation.TARPIT_FACT))
        return float(value) if isinstance(value, (int, float)) else 0.0

    async def helo(self, session: Session) -> None:
        # A new HELO/EHLO replaces what the last one earned.
        session.held = [h for h in session.held if h.stage is Stage.CONNECT]
        await self._early_stage(Stage.HELO, session, None)

    async def mail(self, session: Session, txn: Transaction) -> Reply:
        # MAIL denials are held with the others, and forgotten with the transaction.
        session.held = [h for h in session.held if h.stage is not Stage.MAIL]
        await self._early_stage(Stage.MAIL, session, txn)
        return replies.SENDER_OK

    # -- RCPT -------------------------------------------------------------------------

    async def rcpt(self, session: Session, txn: Transaction, address: Address) -> Reply:
        if txn.accepted_rcpt_commands >= self.settings.inbound.max_recipients:
            self.metrics.reject(None, "rcpt", "too_many_recipients")
            return replies.TOO_MANY_RECIPIENTS
        if address.domain.startswith("["):
            # Address literals name a host, not a hosted domain: never relay.
            return self._refuse(session, txn, None, "relay", replies.RELAY_DENIED, address)
        try:
            found = await self.directory.lookup_recipient(address.lookup_local,
                                                          address.lookup_domain)
            tenant = None
            if isinstance(found, Recipient):
                tenant = txn.tenants.get(found.tenant) or await self.directory.tenant(
                    found.tenant)
        except Unavailable as exc:
            # The outage itself is logged (once a minute) by the directory; this is the
            # per-recipient decision.
            log.info("session=%s from=<%s> rcpt=<%s> deferred, directory unavailable: %s",
                     session.session_id, txn.sender_text, address.text, exc)
            self.metrics.reject(None, "rcpt", "directory_unavailable")
            return replies.DIRECTORY_UNAVAILABLE
        if isinstance(found, Unknown):
            if found.domain_hosted:
                return self._refuse(session, txn, found.tenant, "unknown_user",
                                    replies.NO_SUCH_USER, address)
            return self._refuse(session, txn, None, "relay", replies.RELAY_DENIED, address)
        if tenant is None:
            log.error("session=%s rcpt=<%s> tenant %s missing from the directory",
                      session.session_id, address.text, found.tenant)
            return replies.DIRECTORY_UNAVAILABLE
        if found.disabled:
            return self._refuse(session, txn, found.tenant, "disabled", replies.MAILBOX_DISABLED,
                                address)
        if found.over_quota:
            return self._refuse(session, txn, found.tenant, "over_quota", replies.OVER_QUOTA,
                                address)
        try:
            mailboxes = await self._mailboxes(found)
        except Unavailable:
            self.metrics.reject(found.tenant, "rcpt", "directory_unavailable")
            return replies.DIRECTORY_UNAVAILABLE
        if mailboxes is None:
            # XXX forwarding to other domains needs SRS (a later issue); until then such
            # recipients are deferred, never refused and never sent unrewritten.
            log.warning("session=%s rcpt=<%s> is a %s to other domains: not yet supported",
                        session.session_id, address.text, found.kind)
            return self._refuse(session, txn, found.tenant, "forward_unsupported",
                                replies.FORWARD_UNAVAILABLE, address)
        if not mailboxes:
            return self._refuse(session, txn, found.tenant, "alias_empty", replies.NO_SUCH_USER,
                                address)
        accepted = AcceptedRecipient(address, mailboxes[0])
        if session.held and address.lookup_local not in ALWAYS_REACHABLE and not allowlisted(
                session.client_ip, txn.sender_text, TenantViewImpl(tenant).policy,
                self.settings.access):
            held = session.held[0]
            reply = held.verdict.reply or (replies.DEFAULT_REJECT
                                           if held.verdict.action is Action.REJECT
                                           else replies.DEFAULT_TEMPFAIL)
            return self._refuse(session, txn, found.tenant, f"{held.stage.value}:{held.filter}",
                                reply, address)
        if self.pipeline.stages[Stage.RCPT]:
            ctx = self._context(Stage.RCPT, session, txn, current=accepted,
                                recipients=txn.recipients, tenant=TenantViewImpl(tenant))
            result = await self.pipeline.run(ctx)
        else:
            result = _NO_FILTERS  # nothing to run: skip building the filters' context
        if result.verdict.action in (Action.REJECT, Action.TEMPFAIL):
            reply = result.verdict.reply or (replies.DEFAULT_REJECT
                                             if result.verdict.action is Action.REJECT
                                             else replies.DEFAULT_TEMPFAIL)
            return self._refuse(session, txn, found.tenant, f"rcpt:{result.filter}", reply, address)
        txn.tenants[tenant.id] = tenant
        txn.accepted_rcpt_commands += 1
        for mailbox in mailboxes:
            if all(r.lookup_key != mailbox.address for r in txn.recipients):
                txn.recipients.append(AcceptedRecipient(address, mailbox))
        self._recipients_accepted(tenant.id).inc()
        # At info the queued line names every accepted recipient (one line per message
        # instead of one per decision: logging was 14 % of the relay's CPU).
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session=%s rcpt=<%s> tenant=%s %s=%s accepted", session.session_id,
                      address.text, tenant.id, found.kind,
                      ",".join(m.address for m in mailboxes))
        return replies.RECIPIENT_OK

    async def _mailboxes(self, found: Recipient, depth: int = 0) -> list[Recipient] | None:
        """The mailboxes a recipient delivers to; None if it reaches other domains.

        A mailbox or catch-all is itself (the directory already resolved a catch-all to
        its mailbox). An alias expands to its targets, aliases of aliases up to a few
        levels (a loop ends there); targets that do not exist are skipped and logged.
        """
        if found.kind in ("mailbox", "catch_all"):
            return [found]
        if found.kind == "forward" or depth >= MAX_ALIAS_DEPTH:
            return None if found.kind == "forward" else []
        result: list[Recipient] = []
        for target in found.targets:
            local, _, domain = target.rpartition("@")
            answer = await self.directory.lookup_recipient(local, domain)
            if isinstance(answer, Unknown):
                if not answer.domain_hosted:
                    return None
                log.warning("alias %s: target %s does not exist", found.address, target)
                continue
            if answer.tenant != found.tenant:
                log.warning("alias %s: target %s belongs to tenant %s", found.address, target,
                            answer.tenant)
                continue
            expanded = await self._mailboxes(answer, depth + 1)
            if expanded is None:
                return None
            result.extend(m for m in expanded if not (m.disabled or m.over_quota))
        return result

    def _refuse(self, session: Session, txn: Transaction, tenant: str | None, reason: str,
                reply: Reply, address: Address) -> Reply:
        self.metrics.reject(tenant, "rcpt", reason)
        # The sender is named here because the MAIL line is logged at debug only.
        log.info("session=%s from=<%s> rcpt=<%s> refused (%s): %s", session.session_id,
                 txn.sender_text, address.text, reason, reply)
        return reply

    # -- DATA -------------------------------------------------------------------------

    async def data(self, session: Session, txn: Transaction, content: bytes) -> DataOutcome:
        """Decide per tenant, write every copy durably, then (and only then) accept.

        `content` is unstuffed and has CRLF line endings only: the SMTP side normalised
        it or refused it (RFC 5321 §2.3.8), and says so by its type (CrlfBytes). Copies
        whose added header fields are CRLF-clean too keep that type, so the LMTP side
        need not scan them again.
        """
        started = time.perf_counter()
        queue_id = self.ids.new()
        header_len = header_end(content)
        header = content[:header_len]
        lowered = header.lower()  # one copy to look for both kinds of field
        if _AR_FIELD in lowered or any(name in lowered for name in OUR_FIELDS):
            header, removed = remove_forged_auth_results(header, self.hostname)
            header, spoofed = remove_fields(header, OUR_FIELDS)
        else:
            removed = spoofed = 0
        if removed or spoofed:
            log.info("session=%s removed %d forged Authentication-Results and %d scan "
                     "header(s)", session.session_id, removed, spoofed)
        single = txn.recipients[0].address if len(txn.recipients) == 1 else None
        rdns = _done(session.results.facts.get("rdns"))
        trace = received_header(helo=session.helo, client_ip=session.client_ip,
                                rdns=getattr(rdns, "name", None),
                                hostname=self.hostname, protocol=self._protocol(session, txn),
                                queue_id=queue_id, recipient=single)
        # One join over a view of the body: slicing it and adding would copy it twice.
        body = memoryview(content)[header_len:]
        message = b"".join((trace, header, body))
        message_view = MessageData(message, len(trace) + len(header))

        # Decision groups: one per tenant, split further where mailboxes carry lists of
        # their own (spam allow/block), so each group is decided by one policy.
        by_tenant: dict[str, list[AcceptedRecipient]] = defaultdict(list)
        group_tenant: dict[str, str] = {}
        group_lists: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        for recipient in txn.recipients:
            lists = (recipient.recipient.spam_allow_senders,
                     recipient.recipient.spam_block_senders)
            group = recipient.tenant if not any(lists) else \
                f"{recipient.tenant}#{'|'.join(lists[0])}#{'|'.join(lists[1])}"
            by_tenant[group].append(recipient)
            group_tenant[group] = recipient.tenant
            group_lists[group] = lists
        tenant_ids = list(by_tenant)
        runs = [self.pipeline.run(self._context(
                    Stage.MESSAGE, session, txn, recipients=by_tenant[t],
                    tenant=self._group_view(txn.tenants[group_tenant[t]], group_lists[t]),
                    message=message_view))
                for t in tenant_ids]
        # gather() wraps every coroutine in a Task (and a loop round trip); the usual
        # message has one decision group, which needs no concurrency.
        verdicts_list = [await runs[0]] if len(runs) == 1 else await asyncio.gather(*runs)
        verdicts = {t: r.verdict for t, r in zip(tenant_ids, verdicts_list, strict=True)}
        settled_by = {t: r.filter for t, r in zip(tenant_ids, verdicts_list, strict=True)}
        combined = combine_message_verdicts(verdicts)
        results_header = self._authentication_results(session, txn)
        if results_header:
            # Our verdict on the sender's authenticity goes right below our Received.
            message = b"".join((trace, results_header, header, body))
            message_view = MessageData(message, message_view.header_size + len(results_header))
        if combined.action is not Action.ACCEPT:
            tenant = combined.reply_from
            assert tenant is not None
            verdict = verdicts[tenant]
            default = (replies.DEFAULT_TEMPFAIL if combined.action is Action.TEMPFAIL
                       else replies.DEFAULT_MESSAGE_REJECT)
            for t in tenant_ids:
                self.metrics.reject(group_tenant[t], "data", settled_by[t] or "policy")
            log.info("session=%s from=<%s> nrcpt=%d data %s (%s by %s for tenant %s): %s",
                     session.session_id, txn.sender_text, len(txn.recipients),
                     combined.action.value, verdict.reason, settled_by[tenant], tenant,
                     verdict.reply or default)
            if combined.action is Action.REJECT:
                await self._record(session, _outcome(verdicts, settled_by,
                                                     reputation.MailOutcome.REJECTED))
            return DataOutcome(verdict.reply or default)

        # Which copies go where: one queued copy per distinct set of added headers,
        # and a quarantine copy for each tenant whose checks refused or held it.
        deliver: dict[tuple[tuple[str, str], ...], list[AcceptedRecipient]] = defaultdict(list)
        quarantine: list[tuple[str, Verdict]] = []
        for t in tenant_ids:
            verdict = verdicts[t]
            if verdict.action in (Action.REJECT, Action.QUARANTINE):
                policy = txn.tenants[group_tenant[t]].policy.rejected_copies
                if verdict.action is Action.REJECT and policy == "discard":
                    log.info("session=%s tenant %s copy discarded by policy (%s)",
                             session.session_id, t, verdict.reason)
                    continue
                quarantine.append((t, verdict))
            elif verdict.action is Action.DISCARD:
                log.info("session=%s tenant %s copy discarded: %s", session.session_id, t,
                         verdict.reason)
            else:
                deliver[tuple(verdict.add_headers)].extend(by_tenant[t])

        envelopes: list[tuple[Envelope, bytes]] = []
        for index, (added, recipients) in enumerate(deliver.items()):
            copy_id = queue_id if index == 0 else self.ids.new()
            # Mail scored as spam never causes a DSN later (it would be backscatter).
            spam = any(name.lower() == "x-spam-flag" and value.strip().upper() == "YES"
                       for name, value in added)
            envelopes.append((self._envelope(copy_id, session, txn, recipients, message_view,
                                             spam),
                              _with_headers(message, len(trace), added)))
        try:
            writes = [*(self.spool.commit(env, data) for env, data in envelopes),
                      *(self.quarantine.store(group_tenant[t], self._envelope(
                          f"{queue_id}-q{i or ''}", session, txn, by_tenant[t], message_view),
                          message, f"{settled_by[t]}: {v.reason}")
                        for i, (t, v) in enumerate(quarantine))]
            if len(writes) == 1:
                await writes[0]  # the usual single copy: no Task for gather to make
            else:
                await asyncio.gather(*writes)
        except (SpoolError, OSError) as exc:
            # All or nothing: a copy that did get written must not be delivered, since
            # the client will send the whole message again after our 4xx.
            for env, _ in envelopes:
                await self.spool.remove(env.id)
            log.error("session=%s spool write failed: %s", session.session_id, exc)
            self.metrics.reject(None, "data", "spool")
            full = isinstance(exc, SpoolFull) or getattr(exc, "errno", None) in (28, 122)
            return DataOutcome(replies.SPOOL_FULL if full else replies.LOCAL_ERROR)
        self.metrics.spool_commit_seconds.observe(time.perf_counter() - started)
        for env, data in envelopes:
            self.queue.submit(env, _vouched(data, content))
            for t in {r.tenant for r in env.recipients}:
                self._accepted(t).inc()
        for t, verdict in quarantine:
            self.metrics.quarantined.labels(self.metrics.tenant(group_tenant[t])).inc()
            log.info("session=%s queue=%s-q tenant %s copy quarantined: %s",
                     session.session_id, queue_id, t, verdict.reason)
        await self._record(session, _outcome(verdicts, settled_by,
                                             reputation.MailOutcome.ACCEPTED))
        ids = tuple(env.id for env, _ in envelopes)
        log.info("session=%s from=<%s> size=%d nrcpt=%d to=%s tenant=%s queued=%s results=%s",
                 session.session_id, txn.sender_text, len(message), len(txn.recipients),
                 _recipients_text(txn), ",".join(txn.tenants), ",".join(ids) or "-",
                 summarise(txn))
        return DataOutcome(Reply(250, "2.0.0", f"Ok: queued as {queue_id}"), ids)

    async def _record(self, session: Session, outcome: reputation.MailOutcome) -> None:
        """Feed local reputation; never let its store stand between mail and its reply."""
        try:
            await reputation.record_outcome(self.services.state, session.client_ip, outcome,
                                            self.settings.reputation)
        except Exception:
            log.warning("session=%s reputation not recorded", session.session_id,
                        exc_info=True)

    @staticmethod
    def _group_view(tenant: Tenant, lists: tuple[tuple[str, ...], tuple[str, ...]]
                    ) -> TenantViewImpl:
        allow, block = lists
        if not allow and not block:
            return TenantViewImpl(tenant)
        policy = tenant.policy
        return TenantViewImpl(tenant, {
            "spam_allow_senders": (*policy.spam_allow_senders, *allow),
            "spam_block_senders": (*policy.spam_block_senders, *block)})

    def _authentication_results(self, session: Session, txn: Transaction) -> bytes:
        """The A-R field from the authentication facts, b"" when no check ran."""
        if not txn.results.facts:
            return b""  # no check computed anything (the plain relay)
        facts = {key: _done(txn.results.facts.get(key))
                 for key in (auth.SPF, auth.SPF_HELO, auth.DKIM, auth.DMARC, auth.ARC)}
        if not any(value is not None for value in facts.values()):
            return b""
        dmarc = facts[auth.DMARC]
        return authentication_results(
            self.hostname, client_ip=session.client_ip, spf=facts[auth.SPF],
            spf_helo=facts[auth.SPF_HELO], dkim=facts[auth.DKIM],
            dmarc=dmarc if isinstance(dmarc, DmarcResult) else None, arc=facts[auth.ARC])

    def _envelope(self, queue_id: str, session: Session, txn: Transaction,
                  recipients: Sequence[AcceptedRecipient], message: MessageData,
                  spam: bool = False) -> Envelope:
        return Envelope(
            id=queue_id, sender=txn.sender_text,
            recipients=tuple(SpoolRecipient(address=r.address, mailbox=r.lookup_key,
                                            tenant=r.tenant) for r in recipients),
            received=time.time(), client_ip=session.client_ip, helo=session.helo or "",
            smtputf8=txn.smtputf8, eight_bit=txn.eight_bit, header_size=message.header_size,
            spam=spam)

    @staticmethod
    def _protocol(session: Session, txn: Transaction) -> str:
        base = "UTF8SMTP" if txn.smtputf8 else ("ESMTP" if session.esmtp else "SMTP")
        return base + ("S" if session.tls else "")


def _vouched(message: bytes, content: bytes) -> bytes:
    """`message` typed as its line endings and dot lines allow, else unchanged.

    A copy is header fields of ours above `content`'s header and body (the body is
    never changed). When the SMTP side typed `content` as CrlfBytes (or
    DotFreeCrlfBytes), checking the header section, a few hundred bytes, vouches for
    the whole message; the LMTP side then skips its scans.
    """
    if not isinstance(content, CrlfBytes):
        return message
    head_size = header_end(message)
    if len(message) - head_size != len(content) - header_end(content):
        return message  # not the shape described above: let the LMTP side scan it
    head = message[:head_size]
    if not crlf_only(head):
        return message
    if (type(content) is DotFreeCrlfBytes and not head.startswith(b".")
            and b"\r\n." not in head):
        return DotFreeCrlfBytes(message)
    return CrlfBytes(message)


def _with_headers(message: bytes, at: int, headers: Sequence[tuple[str, str]]) -> bytes:
    if not headers:
        return message
    added = b"".join(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")
                     for name, value in headers)
    return message[:at] + added + message[at:]


def _recipients_text(txn: Transaction) -> str:
    """Every accepted recipient: `<given>`, followed by `(mailbox)` when the directory
    resolved it to another mailbox (catch-all, alias); with the `tenant=` field this is
    what the per-recipient "accepted" lines (now at debug) said at info."""
    return ",".join(
        f"<{r.given.text}>" if r.given.text == r.recipient.address
        else f"<{r.given.text}>({r.recipient.address})"
        for r in txn.recipients)


def summarise(txn: Transaction) -> str:
    """The results record in one log field: filter[@tenant]:outcome, in order."""
    return ",".join(
        f"{e.filter}{'@' + e.tenant if e.tenant else ''}:{e.outcome.value}"
        for e in txn.results.entries) or "-"


def _done(task: Any) -> Any:
    """The result of a finished fact computation, None if it failed or never ran."""
    if task is None or not task.done() or task.cancelled() or task.exception() is not None:
        return None
    return task.result()


def _outcome(verdicts: dict[str, Verdict], settled_by: dict[str, str],
             default: reputation.MailOutcome) -> reputation.MailOutcome:
    """What a message says about its client: a virus or spam found for any tenant
    outweighs the plain accept or reject."""
    caught = {settled_by[t] for t, v in verdicts.items()
              if v.action in (Action.REJECT, Action.QUARANTINE)}
    if "antivirus" in caught:
        return reputation.MailOutcome.VIRUS
    if "antispam" in caught:
        return reputation.MailOutcome.SPAM
    return default
