"""Outbound SMTP delivery: mail that leaves the node (today DSNs, later forwards).

One job is one message to recipients of one domain. The agent finds where that domain's
mail goes, opens an SMTP session there, and turns every reply into per-recipient
outcomes. It never raises for a delivery problem; the queue reads the outcomes.

Route. With a ``smarthost`` ("host", "host:port" or "[v6addr]:port") every job goes there
and no MX lookup happens. Otherwise the recipients' domain is looked up (RFC 5321 5.1):

- MX records are tried in order of preference, hosts of equal preference in random order
  (:func:`plan_mx`, a pure function); each host's A then AAAA addresses are tried in turn.
- No MX records (the name exists): the domain itself is the only host ("implicit MX").
- A null MX (a single ``0 .`` record, RFC 7505): every recipient gets
  550 5.1.10 without any connection.
- NXDOMAIN for the domain: 550 5.1.2. SERVFAIL, timeouts and other resolver trouble:
  451 4.4.3 (fail safe: retry later, never bounce on a DNS outage).
- Hosts exist but none has an address (all lookups answered definitively): 550 5.4.4.
- An address literal domain (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) is connected to
  directly.

DNS goes through the :class:`MxLookup` seam; :class:`ResolverLookup` is the thin adapter
over the project's DNS layer (filters.dns), and tests inject a table.

Session, per address, until one gives final answers:

- connect, greeting, EHLO (HELO if EHLO is refused). Connection errors, timeouts and
  non-220 greetings move on to the next address.
- Opportunistic STARTTLS: used whenever the peer offers it, **without certificate or
  host name verification** (like Postfix's ``smtp_tls_security_level = may``: encryption
  against passive listeners, no protection against an active attacker; the TLS policy
  issues add DANE / MTA-STS). A failed TLS handshake is retried once in plain text on a
  new connection; a refused STARTTLS command continues in plain text.
- MAIL FROM with the job's sender (``<>`` for the null sender), adding ``SIZE=``,
  ``BODY=8BITMIME`` and ``SMTPUTF8`` as the peer supports and the job needs. A message
  over the peer's SIZE limit is 552 5.3.4; a job that needs SMTPUTF8 at a peer without it
  is 550 5.6.7 (both permanent). A 4xx to MAIL moves on to the next address; a 5xx is the
  answer for every recipient.
- One RCPT per recipient; each recipient's own reply is its outcome if refused.
- DATA for the accepted recipients; its reply is their outcome. A connection lost after
  recipients were accepted gives them 4.4.2 (the next queue run retries).

An 8-bit job sent to a peer without 8BITMIME is sent as is (what most MTAs do; MIME
downgrading is not implemented). If no address gives final answers, every recipient gets
the last 4xx a host replied at MAIL, or 451 4.4.1 when no host could be talked to.

Outcome ``remote`` is the name of the host that answered: the MX host name, the domain
for an implicit MX, the smarthost's host, or the address literal. Only this module
imports aiosmtplib.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import aiosmtplib

from filters.dns import DnsNameError, DnsResult, Resolver
from filters.dns import DnsTemporaryError as DnsLayerTemporary
from gateway.delivery import DeliveryJob, Outcome

__all__ = [
    "DnsTemporaryError",
    "DomainNotFound",
    "MxLookup",
    "MxPlan",
    "MxRecord",
    "OutboundAgent",
    "ResolverLookup",
    "outcome_from_reply",
    "parse_smarthost",
    "plan_mx",
]

log = logging.getLogger(__name__)

MAX_ADDRESSES = 10  # addresses tried per job before giving up for this attempt
_ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_BAD_ADDRESS_CHARS = frozenset(" \t\r\n\0<>")


# --------------------------------------------------------------------------------------
# DNS: the lookup seam and the pure MX planner
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MxRecord:
    """One MX record: preference and exchange host name ("." for a null MX)."""

    preference: int
    exchange: str


class DomainNotFound(Exception):
    """The name does not exist (NXDOMAIN)."""


class DnsTemporaryError(Exception):
    """The resolver could not get an answer now (SERVFAIL, timeout, no servers)."""


class MxLookup(Protocol):
    """The DNS questions the agent asks; injectable so routing is testable without DNS."""

    async def mx(self, domain: str) -> list[MxRecord] | None:
        """The domain's MX records; None when the name exists but has none.

        Raises DomainNotFound or DnsTemporaryError.
        """
        ...

    async def addresses(self, host: str) -> list[str]:
        """The host's IPv4 then IPv6 addresses; [] when it has none.

        Raises DomainNotFound or DnsTemporaryError.
        """
        ...


class ResolverLookup:
    """MxLookup over the project's DNS layer (filters.dns), shared with the checks."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def _query(self, name: str, rdtype: str) -> DnsResult:
        try:
            result = await self._resolver.query(name, rdtype)
        except DnsLayerTemporary as exc:
            raise DnsTemporaryError(f"{rdtype} {name}: {exc}") from exc
        except DnsNameError as exc:
            raise DomainNotFound(name) from exc
        if result.nxdomain:
            raise DomainNotFound(name)
        return result

    async def mx(self, domain: str) -> list[MxRecord] | None:
        result = await self._query(domain, "MX")
        if not result.records:
            return None
        records = []
        for record in result.records:
            preference, _, exchange = record.partition(" ")
            # The layer drops the root's final dot: a null MX (RFC 7505) arrives as "".
            records.append(MxRecord(int(preference), exchange or "."))
        return records

    async def addresses(self, host: str) -> list[str]:
        results = await asyncio.gather(self._query(host, "A"), self._query(host, "AAAA"),
                                       return_exceptions=True)
        found: list[str] = []
        errors: list[BaseException] = []
        for result in results:
            if isinstance(result, BaseException):
                errors.append(result)
            else:
                found.extend(result.records)
        if found:
            return found
        for error in errors:
            if isinstance(error, DomainNotFound):
                raise error
        if errors:
            raise errors[0]
        return []


@dataclass(frozen=True, slots=True)
class MxPlan:
    """Where a domain's mail goes: host names in the order to try them."""

    hosts: tuple[str, ...]
    null_mx: bool = False  # RFC 7505: the domain accepts no mail
    implicit: bool = False  # no MX records: the domain itself is the host


def plan_mx(
    domain: str, records: Sequence[MxRecord] | None, *, rng: random.Random | None = None
) -> MxPlan:
    """Order a domain's MX answer into the hosts to try (pure; RFC 5321 5.1, RFC 7505).

    ``records`` None or empty means no MX records: the domain itself is the one host.
    A single record whose exchange is the root (``.``) is a null MX. A root exchange
    among other records is ignored. Hosts are sorted by preference; within one
    preference they are shuffled with ``rng`` (kept in answer order when None).
    Names are lowercased without the trailing dot; duplicates keep their best place.
    """
    domain = domain.rstrip(".").lower()
    if not records:
        return MxPlan(hosts=(domain,), implicit=True)
    if len(records) == 1 and records[0].exchange.strip() in (".", ""):
        return MxPlan(hosts=(), null_mx=True)
    usable = [r for r in records if r.exchange.strip() not in (".", "")]
    by_pref: dict[int, list[str]] = {}
    for record in usable:
        host = record.exchange.strip().rstrip(".").lower()
        by_pref.setdefault(record.preference, []).append(host)
    hosts: list[str] = []
    for preference in sorted(by_pref):
        group = by_pref[preference]
        if rng is not None:
            rng.shuffle(group)
        for host in group:
            if host not in hosts:
                hosts.append(host)
    return MxPlan(hosts=tuple(hosts))


def _address_literal(domain: str) -> str | None:
    """The IP of an address-literal domain ('[192.0.2.1]', '[IPv6:...]'), else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def parse_smarthost(spec: str, default_port: int) -> tuple[str, int]:
    """'host', 'host:port', '[v6]' or '[v6]:port' -> (host, port)."""
    spec = spec.strip()
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif spec.count(":") == 1:
        host, _, port_text = spec.partition(":")
    else:
        host, port_text = spec, ""
    if not host:
        raise ValueError(f"smarthost {spec!r} has no host")
    port = int(port_text) if port_text else default_port
    if not 0 < port < 65536:
        raise ValueError(f"smarthost {spec!r} has an invalid port")
    return host, port


# --------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------


def outcome_from_reply(code: int, message: str, remote: str) -> Outcome:
    """Turn an SMTP reply into an Outcome, taking the enhanced status code from its text.

    The status is used only when its class matches the reply code's (RFC 3463); else a
    generic x.0.0. Multi-line replies are joined with spaces, repeated status codes
    stripped. A code outside 2xx/4xx/5xx is a protocol error: 451 4.5.0.
    """
    lines = [line.strip() for line in message.replace("\r", "").split("\n")]
    status = ""
    texts: list[str] = []
    for line in lines:
        match = _ENHANCED_RE.match(line)
        if match is not None and match.group(1) == str(code // 100):
            status = status or line[: match.end()].strip()
            line = line[match.end():]
        if line:
            texts.append(line)
    text = " ".join(" ".join(texts).split())
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    if code // 100 not in (2, 4, 5):
        return Outcome(451, "4.5.0", f"Unexpected reply {code} {text}".strip(), remote)
    return Outcome(code, status or f"{code // 100}.0.0", text, remote)


# --------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------


class _TryNext(Exception):
    """This address cannot take the job now; try the next one."""

    def __init__(self, reason: str, reply: Outcome | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


class _TlsFailed(Exception):
    """The STARTTLS handshake failed; the same address may be retried in plain text."""


@dataclass(frozen=True, slots=True)
class _Target:
    name: str  # host name as routed (MX name, domain, smarthost host)
    address: str  # what to connect to
    port: int


class OutboundAgent:
    """Delivers a job to its recipients' domain over SMTP; one outcome per recipient."""

    def __init__(
        self,
        *,
        helo_name: str,
        smarthost: str | None,
        resolver: Resolver | None,
        port: int = 25,
        timeout: float = 60,
        lookup: MxLookup | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not helo_name or any(ch.isspace() for ch in helo_name):
            raise ValueError("helo_name must be a host name")
        self.helo_name = helo_name
        self.port = port
        self.timeout = timeout
        self.smarthost = parse_smarthost(smarthost, port) if smarthost else None
        if lookup is None and resolver is not None:
            lookup = ResolverLookup(resolver)
        self._lookup: MxLookup | None = lookup  # None: smarthost only
        self._rng = rng if rng is not None else random.Random()
        # Opportunistic TLS: encrypt, do not authenticate (see the module docstring).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self._tls_context = context

    async def aclose(self) -> None:
        """Nothing pooled yet: every job opens and closes its own connection."""

    async def deliver(self, job: DeliveryJob) -> list[Outcome]:
        if not job.recipients:
            return []
        domains = {r.rpartition("@")[2].lower() for r in job.recipients}
        assert len(domains) == 1, "an outbound job's recipients must share one domain"
        domain = domains.pop()

        outcomes: list[Outcome | None] = [None] * len(job.recipients)
        bad_sender = self._address_problem(job.sender, job, allow_empty=True)
        if bad_sender is not None:
            status = "5.6.7" if bad_sender[0] == "5.6.7" else "5.1.7"
            return [Outcome(553, status, f"Invalid sender address: {bad_sender[1]}", "")
                    for _ in job.recipients]
        for i, rcpt in enumerate(job.recipients):
            problem = self._address_problem(rcpt, job, allow_empty=False)
            if problem is not None:
                outcomes[i] = Outcome(553, problem[0], f"Invalid recipient address: {problem[1]}",
                                      "")
        pending = [i for i, o in enumerate(outcomes) if o is None]
        if pending:
            for i, outcome in zip(pending, await self._deliver_to_domain(job, domain, pending),
                                  strict=True):
                outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    @staticmethod
    def _address_problem(
        address: str, job: DeliveryJob, *, allow_empty: bool
    ) -> tuple[str, str] | None:
        """(enhanced status, reason) when an address cannot go on the wire, else None."""
        if address == "":
            return None if allow_empty else ("5.1.3", "empty")
        if any(ch in _BAD_ADDRESS_CHARS for ch in address):
            return "5.1.3", "forbidden characters"
        if not address.isascii() and not job.smtputf8:
            return "5.6.7", "non-ASCII address in a message without SMTPUTF8"
        return None

    async def _deliver_to_domain(
        self, job: DeliveryJob, domain: str, pending: list[int]
    ) -> list[Outcome]:
        def every(outcome: Outcome) -> list[Outcome]:
            return [outcome for _ in pending]

        if self.smarthost is not None:
            host, port = self.smarthost
            return await self._try_targets(
                job, pending, [_Target(host, host, port)], domain, dns_trouble=False,
                no_address=False,
            )

        literal = _address_literal(domain)
        if literal is not None:
            return await self._try_targets(
                job, pending, [_Target(domain, literal, self.port)], domain,
                dns_trouble=False, no_address=False,
            )

        lookup = self._lookup
        if lookup is None:
            return every(Outcome(451, "4.3.5", "No DNS resolver configured for outbound mail"))
        try:
            records = await lookup.mx(domain)
        except DomainNotFound:
            return every(Outcome(550, "5.1.2", f"Recipient domain {domain} does not exist"))
        except DnsTemporaryError as exc:
            log.info("outbound %s: MX lookup for %s failed: %s", job.queue_id, domain, exc)
            return every(Outcome(451, "4.4.3", f"DNS lookup for {domain} failed, will retry"))
        plan = plan_mx(domain, records, rng=self._rng)
        if plan.null_mx:
            return every(Outcome(550, "5.1.10", "Recipient domain does not accept mail"))

        targets: list[_Target] = []
        dns_trouble = False
        for host in plan.hosts:
            literal_ip = _as_ip(host)
            if literal_ip is not None:  # an MX that names an address: not allowed, but seen
                targets.append(_Target(host, literal_ip, self.port))
                continue
            try:
                addresses = await lookup.addresses(host)
            except DomainNotFound:
                if plan.implicit:
                    return every(Outcome(550, "5.1.2", f"Recipient domain {domain} does not exist"))
                log.info("outbound %s: MX host %s does not exist", job.queue_id, host)
                continue
            except DnsTemporaryError as exc:
                log.info("outbound %s: address lookup for %s failed: %s", job.queue_id, host, exc)
                dns_trouble = True
                continue
            targets.extend(_Target(host, address, self.port) for address in addresses)
            if len(targets) >= MAX_ADDRESSES:
                break
        return await self._try_targets(
            job, pending, targets[:MAX_ADDRESSES], domain, dns_trouble=dns_trouble,
            no_address=True,
        )

    async def _try_targets(
        self,
        job: DeliveryJob,
        pending: list[int],
        targets: list[_Target],
        domain: str,
        *,
        dns_trouble: bool,
        no_address: bool,
    ) -> list[Outcome]:
        recipients = [job.recipients[i] for i in pending]
        last_reply: Outcome | None = None
        for target in targets:
            try:
                try:
                    return await self._session(job, recipients, target, use_tls=True)
                except _TlsFailed as exc:
                    log.info("outbound %s: TLS with %s[%s] failed (%s); retrying in plain text",
                             job.queue_id, target.name, target.address, exc)
                    return await self._session(job, recipients, target, use_tls=False)
            except (_TryNext, _TlsFailed) as exc:
                log.info("outbound %s: %s[%s]:%d: %s", job.queue_id, target.name,
                         target.address, target.port, exc)
                if isinstance(exc, _TryNext) and exc.reply is not None:
                    last_reply = exc.reply
        if last_reply is not None:
            outcome = last_reply
        elif not targets and no_address and not dns_trouble:
            outcome = Outcome(550, "5.4.4", f"No mail server address found for {domain}")
        elif not targets and dns_trouble:
            outcome = Outcome(451, "4.4.3", f"DNS lookup for {domain} failed, will retry")
        elif self.smarthost is not None:
            outcome = Outcome(451, "4.4.1", "The relay host could not be reached, will retry")
        else:
            outcome = Outcome(451, "4.4.1", f"No mail server for {domain} could be reached, "
                                            "will retry")
        return [outcome for _ in recipients]

    async def _session(
        self, job: DeliveryJob, recipients: list[str], target: _Target, *, use_tls: bool
    ) -> list[Outcome]:
        """One SMTP session; final outcomes, or _TryNext / _TlsFailed before any RCPT."""
        client = aiosmtplib.SMTP(
            hostname=target.address,
            port=target.port,
            local_hostname=self.helo_name,
            timeout=self.timeout,
            start_tls=False,
            validate_certs=False,
        )
        try:
            try:
                await client.connect()
            except aiosmtplib.SMTPConnectResponseError as exc:
                raise _TryNext(f"greeting {exc.code} {exc.message}") from exc
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise _TryNext(f"cannot connect: {exc}") from exc
            try:
                await self._hello(client)
                if use_tls and client.supports_extension("starttls"):
                    await self._starttls(client, target)
                return await self._transaction(client, job, recipients, target)
            except (aiosmtplib.SMTPException, OSError) as exc:
                # disconnects, timeouts, anything unexpected before a RCPT was answered
                raise _TryNext(f"session failed before the transaction: {exc!r}") from exc
        finally:
            await _close(client)

    async def _hello(self, client: aiosmtplib.SMTP) -> None:
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError as exc:
            if not client.is_connected:
                raise _TryNext(f"EHLO refused: {exc.code} {exc.message}") from exc
            try:
                await client.helo()
            except aiosmtplib.SMTPHeloError as exc2:
                raise _TryNext(f"HELO refused: {exc2.code} {exc2.message}") from exc2

    async def _starttls(self, client: aiosmtplib.SMTP, target: _Target) -> None:
        server_hostname = None if _as_ip(target.name) is not None else target.name
        try:
            await client.starttls(server_hostname=server_hostname, tls_context=self._tls_context)
        except aiosmtplib.SMTPResponseException as exc:
            # STARTTLS refused with a reply: the session stays usable in plain text.
            log.info("outbound: %s refused STARTTLS: %s %s", target.name, exc.code, exc.message)
            return
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _TlsFailed(str(exc) or type(exc).__name__) from exc
        await self._hello(client)  # RFC 3207 4.2: forget the pre-TLS EHLO answer

    async def _transaction(
        self, client: aiosmtplib.SMTP, job: DeliveryJob, recipients: list[str], target: _Target
    ) -> list[Outcome]:
        remote = target.name

        def every(outcome: Outcome) -> list[Outcome]:
            return [outcome for _ in recipients]

        size = len(job.message)
        options: list[bytes] = []
        if client.supports_extension("size"):
            limit_text = client.esmtp_extensions.get("size", "").strip()
            limit = int(limit_text) if limit_text.isdigit() else 0
            if limit and size > limit:
                await _quit(client)
                return every(Outcome(552, "5.3.4",
                                     f"Message is larger than {remote} accepts ({limit} bytes)",
                                     remote))
            options.append(f"SIZE={size}".encode())
        if job.eight_bit and client.supports_extension("8bitmime"):
            options.append(b"BODY=8BITMIME")
        encoding = "ascii"
        if job.smtputf8:
            if not client.supports_extension("smtputf8"):
                await _quit(client)
                return every(Outcome(550, "5.6.7",
                                     f"{remote} does not support internationalised mail",
                                     remote))
            options.append(b"SMTPUTF8")
            encoding = "utf-8"

        reply = await client.execute_command(
            b"MAIL", b"FROM:<" + job.sender.encode(encoding) + b">", *options
        )
        if reply.code != 250:
            outcome = outcome_from_reply(reply.code, reply.message, remote)
            if outcome.temporary:
                raise _TryNext(f"MAIL refused: {reply.code} {reply.message}", outcome)
            await _quit(client)
            return every(outcome)

        results: list[Outcome | None] = [None] * len(recipients)
        accepted: list[int] = []
        try:
            for i, rcpt in enumerate(recipients):
                reply = await client.execute_command(
                    b"RCPT", b"TO:<" + rcpt.encode(encoding) + b">"
                )
                if reply.code in (250, 251):
                    accepted.append(i)
                else:
                    results[i] = outcome_from_reply(reply.code, reply.message, remote)
            if accepted:
                try:
                    reply = await client.data(job.message)
                    data_outcome = outcome_from_reply(reply.code, reply.message, remote)
                except aiosmtplib.SMTPDataError as exc:
                    data_outcome = outcome_from_reply(exc.code, exc.message, remote)
                for i in accepted:
                    results[i] = data_outcome
        except (aiosmtplib.SMTPException, OSError) as exc:  # disconnect, timeout, protocol
            log.info("outbound %s: session with %s failed: %r", job.queue_id, remote, exc)
            lost = Outcome(451, "4.4.2", f"Connection to {remote} was lost, will retry", remote)
            return [r if r is not None and i not in accepted else lost
                    for i, r in enumerate(results)]
        await _quit(client)
        return [r if r is not None else Outcome(451, "4.4.2", "No reply", remote)
                for r in results]


def _as_ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


async def _quit(client: aiosmtplib.SMTP) -> None:
    """Say goodbye; the answers are already known, so any trouble here is ignored."""
    transport = client.transport
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError):
        pass
    if isinstance(transport, asyncio.Transport):
        transport.abort()


async def _close(client: aiosmtplib.SMTP) -> None:
    """Release the connection's socket now.

    Closing a TLS transport gracefully waits for the peer's close_notify (up to half a
    minute); once the session is over, or has failed, nothing more is owed to the peer,
    so the transport is aborted, which closes the socket on the next loop iteration.
    """
    transport = client.transport
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    client.close()
    await asyncio.sleep(0)  # let connection_lost run and the socket close
