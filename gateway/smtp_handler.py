"""The SMTP front: the only module that imports aiosmtpd.

Theory of operation
-------------------
We subclass aiosmtpd's `SMTP` protocol for what it does well (the asyncio stream
plumbing, STARTTLS with its injection guard, the PROXY protocol parser) and replace
its command loop and DATA reader with our own, because we need what it lacks:

* command lines must end in CRLF (a bare LF is refused, RFC 5321 §2.3.8), and are
  limited to 512 octets plus what the extensions we advertise add (§4.5.3.1.4);
  longer ones get 500 5.5.2;
* DATA is read in bulk (one `readuntil` per chunk, not per line), ends only at
  CRLF.CRLF, and bare CR or LF inside it never ends it: they are normalised to CRLF
  or the message is refused, per `[inbound] smuggling` — so no `\\n.\\n` variant can
  smuggle a second message through us to a lenient downstream;
* long lines inside DATA are kept as they are (never rewrapped: that breaks DKIM);
* timeouts: 5 minutes idle per command (§4.5.3.2), and during DATA a minimum data
  rate after a grace period plus a whole-transaction deadline, so a client trickling
  bytes cannot hold a session for ever;
* PIPELINING advertised and honoured: commands are answered strictly in order;
* every reply carries an enhanced status code and bland text; exceptions are logged
  with the session id and answered 451 4.3.0, never with their names.

What each command *means* is decided in `gateway.inbound`; this module only parses
and frames. PROXY protocol headers are read only from `[inbound] proxy_protocol_from`
addresses; anyone else's connection is plain SMTP from its own address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

from aiosmtpd.proxy_protocol import get_proxy
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import login_always_fail

from filters.base import Reply
from gateway import replies
from gateway.addresses import AddressError, SMTPUTF8Required, parse_command_arg, parse_path
from gateway.config import InboundSettings
from gateway.inbound import Inbound
from gateway.metrics import Metrics
from gateway.session import Session, Transaction, new_session_id
from lmtp import CrlfBytes, DotFreeCrlfBytes, crlf_only, normalise_line_endings

log = logging.getLogger(__name__)

COMMAND_LINE_LIMIT = 512  # RFC 5321 §4.5.3.1.4, including CRLF
# RFC 5321 §4.5.3.1.4: extensions may raise the limit. SIZE adds 26 (RFC 1870),
# BODY=8BITMIME 14 (RFC 6152), SMTPUTF8 10 (RFC 6531); we add slack for future DSN
# parameters rather than refuse a legitimate client.
MAIL_LINE_LIMIT = COMMAND_LINE_LIMIT + 26 + 14 + 10 + 100
RCPT_LINE_LIMIT = COMMAND_LINE_LIMIT + 100
STREAM_LIMIT = 65536  # bytes one readuntil may buffer before handing us a chunk
MAX_ERRORS = 20  # syntax or sequence errors before we hang up (RFC 5321 §4.3.2 allows it)
PROXY_TIMEOUT = 10.0
DATA_SLOT_WAIT = 30.0


def _encode(reply: Reply) -> bytes:
    text = (f"{reply.code} {reply.status} {reply.text}\r\n" if reply.status
            else f"{reply.code} {reply.text}\r\n")
    return text.encode("utf-8")


_WIRE: dict[Reply, bytes] = {r: _encode(r) for r in vars(replies).values()
                             if isinstance(r, Reply)}


_EHLO: dict[tuple[str, int, bool], bytes] = {}


class _NoHooks:
    """aiosmtpd's event handler slot: we call gateway.inbound explicitly instead."""


_NO_HOOKS = _NoHooks()
_LINES: dict[str, bytes] = {}  # greeting and HELO lines, encoded once


def _line(text: str) -> bytes:
    wire = _LINES.get(text)
    if wire is None:
        wire = _LINES[text] = f"{text}\r\n".encode()
    return wire


class GatewaySMTP(AioSMTP):
    """One instance per connection."""

    line_length_limit = STREAM_LIMIT
    # asyncio.FlowControlMixin's state (not in typeshed), used by _send.
    _paused: bool
    _connection_lost: bool
    _drain_helper: Callable[[], Awaitable[None]]

    def __init__(self, inbound: Inbound, settings: InboundSettings, metrics: Metrics,
                 tls_context: ssl.SSLContext | None, data_slots: asyncio.Semaphore,
                 active: Callable[[int], int], live: set[GatewaySMTP]) -> None:
        # aiosmtpd's SMTP.__init__ would look for hooks and AUTH methods by name and
        # format a log line on every connection; we dispatch ourselves, so this sets
        # the state its plumbing (connection_made/lost, STARTTLS, PROXY) uses, with the
        # values its __init__ gives for these arguments. tests/unit/test_smtp_protocol_init.py
        # keeps the two in step.
        loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.__ident__ = "ESMTP mailedge"
        self.loop = loop
        self.event_handler = _NO_HOOKS
        self.data_size_limit = settings.max_message_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        self.hostname = settings.hostname or socket.getfqdn()
        self.tls_context = tls_context
        self.require_starttls = tls_context and False
        self._timeout_duration = settings.command_timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods = {}
        self._handle_hooks = {}
        self._ehlo_hook_ver = None
        self._smtp_methods = {}
        self._enforce_call_limit = False
        self.inbound = inbound
        self.settings = settings
        self.metrics = metrics
        self.data_slots = data_slots
        self.active = active
        self.live = live
        self.gw: Session | None = None
        self.txn: Transaction | None = None
        self.commands: dict[str, Callable[[str], Awaitable[None]]] = {
            "EHLO": self.cmd_EHLO, "HELO": self.cmd_HELO, "MAIL": self.cmd_MAIL,
            "RCPT": self.cmd_RCPT, "DATA": self.cmd_DATA, "RSET": self.cmd_RSET,
            "NOOP": self.cmd_NOOP, "QUIT": self.cmd_QUIT, "VRFY": self.cmd_VRFY,
            "EXPN": self.cmd_EXPN, "HELP": self.cmd_HELP, "STARTTLS": self.cmd_STARTTLS,
        }
        self._closing = False
        self._idle_deadline = 0.0
        self._timer_at = float("inf")  # when the armed timer fires (inf: none armed)
        # While DATA is read: the reply its current deadline earns, and its progress.
        self._data_timeout: tuple[Reply, Transaction, int] | None = None

    # -- plumbing ---------------------------------------------------------------------

    async def reply(self, reply: Reply) -> None:
        # The fixed replies (gateway.replies) are encoded once; aiosmtpd's push() would
        # format, encode and concatenate each one again.
        wire = _WIRE.get(reply)
        if wire is None:
            wire = _encode(reply)
        await self._send(wire)

    async def _send(self, wire: bytes) -> None:
        """Write to the client; wait only while the transport asks us to (flow control).

        StreamWriter.drain() would do the same checks through three more calls per
        reply; a closing transport or a lost connection still takes its path, which
        raises for the caller.
        """
        writer = self._writer
        transport = writer.transport
        if transport.is_closing() or self._connection_lost:
            writer.write(wire)
            await writer.drain()
            return
        transport.write(wire)
        if self._paused:
            await self._drain_helper()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Move the idle deadline (before every command and every DATA chunk).

        aiosmtpd cancels its timer and schedules a new one each time; here one timer
        stays armed and, when it fires before the deadline moved past it, re-arms for
        the rest. The connection still closes `duration` seconds after the last reset.
        """
        loop = self.loop
        deadline = loop.time() + (self._timeout_duration if duration is None else duration)
        self._idle_deadline = deadline
        if self._timeout_handle is not None and self._timer_at <= deadline:
            return  # the armed timer fires first and then looks at the deadline
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        self._timer_at = deadline
        self._timeout_handle = loop.call_at(deadline, self._idle_check)

    def _idle_check(self) -> None:
        deadline = self._idle_deadline
        if self.loop.time() < deadline:
            self._timer_at = deadline
            self._timeout_handle = self.loop.call_at(deadline, self._idle_check)
            return
        self._timer_at = float("inf")
        self._timeout_cb()

    async def reply_and_close(self, reply: Reply) -> None:
        self._closing = True
        try:
            await self.reply(reply)
        except (ConnectionError, OSError):
            pass
        if self.transport is not None:
            self.transport.close()

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2: the server may close after its timeout; say why first.
        reply = replies.SESSION_TIMEOUT
        if self._data_timeout is not None:  # a deadline of the DATA being read
            reply, txn, size = self._data_timeout
            if self.gw is not None:
                log.info("session=%s from=<%s> DATA aborted after %d bytes: %s",
                         self.gw.session_id, txn.sender_text, size, reply.text)
        elif self.gw is not None:
            log.info("session=%s idle timeout", self.gw.session_id)
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(_WIRE.get(reply) or _encode(reply))
            self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        session_id = self.gw.session_id if self.gw else "-"
        log.error("session=%s internal error", session_id, exc_info=error)
        return f"451 4.3.0 Temporary local problem, try again later (session {session_id})"

    async def _refuse_long_line(self, consumed: int) -> None:
        """After readuntil hit the limit: drain the rest of the over-long line, refuse it."""
        await self._reader.readexactly(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                break
            except asyncio.LimitOverrunError as more:
                await self._reader.readexactly(more.consumed)
        await self.reply(replies.LINE_TOO_LONG)

    # -- the session ------------------------------------------------------------------

    async def _handle_client(self) -> None:
        peer = self._peer()
        self.active(+1)
        self.live.add(self)
        try:
            await self._session(peer)
        except asyncio.CancelledError:
            raise
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self.active(-1)
            self.live.discard(self)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()
            if self.gw is not None:
                await self.inbound.closed(self.gw)
                log.info("session=%s disconnect after %.1fs, %d transaction(s)",
                         self.gw.session_id, time.monotonic() - self.gw.started,
                         self.gw.transactions)

    def _peer(self) -> tuple[str, int]:
        peer = self.session.peer if self.session is not None else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            return str(peer[0]), int(peer[1])
        return "unknown", 0

    async def _session(self, peer: tuple[str, int]) -> None:
        client_ip, client_port = peer
        proxied_by = None
        if self._from_balancer(client_ip):
            proxy = await asyncio.wait_for(get_proxy(self._reader), PROXY_TIMEOUT)
            if not proxy.valid or proxy.src_addr is None:
                log.warning("invalid PROXY header from balancer %s: %s", client_ip,
                            proxy.error or "no source address")
                if self.transport is not None:
                    self.transport.close()
                return
            proxied_by = client_ip
            client_ip, client_port = str(proxy.src_addr), int(proxy.src_port or 0)
        sockname = self.transport.get_extra_info("sockname") if self.transport else None
        self.gw = Session(session_id=new_session_id(), client_ip=client_ip,
                          client_port=client_port, proxied_by=proxied_by,
                          local_ip=str(sockname[0]) if sockname else "",
                          local_port=int(sockname[1]) if sockname else 0)
        self.metrics.connections.inc()
        log.info("session=%s connect from [%s]:%d%s", self.gw.session_id, client_ip,
                 client_port, f" via {proxied_by}" if proxied_by else "")
        if self.active(0) > self.settings.max_connections:
            self.metrics.reject(None, "connect", "max_connections")
            await self.reply_and_close(replies.TOO_MANY_CONNECTIONS)
            return
        refused = await self.inbound.connect(self.gw)
        if refused is not None:
            self.metrics.reject(None, "connect", "limits")
            await self.reply_and_close(refused)
            return
        tarpit = self.inbound.tarpit(self.gw)
        if tarpit:
            await asyncio.sleep(tarpit)
        await self._send(_line(f"220 {self.hostname} ESMTP mailedge"))
        self._reset_timeout()
        reader = self._reader
        while self.transport is not None and not self._closing:
            # One command line including its line end (read here, not in a helper
            # coroutine: one frame less per command).
            line: bytes | None
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as error:
                await self._refuse_long_line(error.consumed)
                line = None
            if line is None:
                await self._count_error()
                continue
            self._reset_timeout()
            if time.monotonic() - self.gw.started > self.settings.max_session_time:
                await self.reply_and_close(replies.SESSION_TOO_LONG)
                return
            if not line.endswith(b"\r\n") or line.find(b"\r", 0, len(line) - 2) >= 0:
                await self.reply(replies.BARE_LF_COMMAND)
                await self._count_error()
                continue
            text = line[:-2]
            verb_bytes, _, arg_bytes = text.partition(b" ")
            verb = verb_bytes.upper().decode("ascii", "replace")
            limit = (MAIL_LINE_LIMIT if verb == "MAIL" else
                     RCPT_LINE_LIMIT if verb == "RCPT" else COMMAND_LINE_LIMIT)
            if len(line) > limit:
                await self.reply(replies.LINE_TOO_LONG)
                await self._count_error()
                continue
            command = self.commands.get(verb)
            if command is None:
                await self.reply(replies.UNRECOGNISED)
                await self._count_error()
                continue
            arg = arg_bytes.decode("utf-8", "surrogateescape").strip(" ")
            try:
                await command(arg)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                raise
            except Exception as error:
                await self.push(await self.handle_exception(error))

    def _from_balancer(self, ip: str) -> bool:
        if not self.settings.proxy_protocol_from:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.settings.proxy_protocol_from)

    async def _count_error(self) -> None:
        assert self.gw is not None
        self.gw.errors += 1
        if self.gw.errors >= MAX_ERRORS:
            log.info("session=%s too many errors", self.gw.session_id)
            await self.reply_and_close(replies.TOO_MANY_ERRORS)

    async def _refuse(self, reply: Reply) -> None:
        await self.reply(reply)
        if reply.code >= 500:
            await self._count_error()

    # -- commands ---------------------------------------------------------------------

    async def cmd_EHLO(self, arg: str) -> None:
        await self._greet(arg, esmtp=True)

    async def cmd_HELO(self, arg: str) -> None:
        await self._greet(arg, esmtp=False)

    async def _greet(self, arg: str, *, esmtp: bool) -> None:
        assert self.gw is not None
        if not arg or " " in arg:
            await self._refuse(replies.SYNTAX)
            return
        self.gw.helo = arg
        self.gw.esmtp = esmtp
        self.txn = None
        await self.inbound.helo(self.gw)
        if not esmtp:
            await self._send(_line(f"250 {self.hostname}"))
            return
        starttls = self.tls_context is not None and not self.gw.tls
        key = (self.hostname, self.settings.max_message_size, starttls)
        wire = _EHLO.get(key)
        if wire is None:  # the same few answers every time: build each once
            lines = [self.hostname, "PIPELINING", f"SIZE {self.settings.max_message_size}",
                     "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
            if starttls:
                lines.append("STARTTLS")
            text = "\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}"
            wire = _EHLO[key] = (text + "\r\n").encode("utf-8")
        await self._send(wire)

    async def cmd_STARTTLS(self, arg: str) -> None:
        assert self.gw is not None
        if arg:
            await self._refuse(replies.SYNTAX)
            return
        if self.tls_context is None or self.gw.tls:
            await self._refuse(Reply(454, "4.7.0", "TLS not available"))
            return
        await self.smtp_STARTTLS("")  # aiosmtpd's: 220, handshake, drops buffered plaintext
        # RFC 3207 §4.2: forget everything learnt before the handshake.
        self.gw.tls = True
        self.gw.helo = None
        self.gw.esmtp = False
        self.txn = None
        log.info("session=%s TLS established", self.gw.session_id)

    async def cmd_MAIL(self, arg: str) -> None:
        assert self.gw is not None
        if self.gw.helo is None:
            await self._refuse(replies.NEED_HELO)
            return
        if self.txn is not None:
            await self._refuse(replies.NESTED_MAIL)
            return
        if arg[:5].upper() != "FROM:":
            await self._refuse(replies.SYNTAX)
            return
        try:
            sender, params = parse_command_arg(arg[5:].lstrip(" "), allow_null=True,
                                               smtputf8=True)
        except AddressError as exc:
            log.info("session=%s MAIL refused: %s", self.gw.session_id, exc)
            await self._refuse(replies.BAD_SENDER_SYNTAX)
            return
        if params and not self.gw.esmtp:
            await self._refuse(replies.SYNTAX)
            return
        options: dict[str, str] = {}
        size = 0
        for param in params:
            key, _, value = param.partition("=")
            key = key.upper()
            if key == "SIZE" and value.isdigit():
                size = int(value)
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                value = value.upper()
            elif key == "SMTPUTF8" and not value:
                pass
            else:
                await self._refuse(replies.PARAM_NOT_RECOGNISED)
                return
            options[key] = value
        if size > self.settings.max_message_size:
            await self._refuse(replies.SIZE_EXCEEDED)
            return
        smtputf8 = "SMTPUTF8" in options
        if sender is not None and sender.needs_smtputf8 and not smtputf8:
            await self._refuse(replies.SMTPUTF8_REQUIRED)
            return
        txn = Transaction(sender=sender, mail_params=options, declared_size=size,
                          smtputf8=smtputf8, eight_bit=options.get("BODY") == "8BITMIME")
        reply = await self.inbound.mail(self.gw, txn)
        if reply.code < 400:
            self.txn = txn
            self.gw.transactions += 1
            # debug: the queued line, and every refusal line, name the sender at info.
            log.debug("session=%s from=<%s> size=%d", self.gw.session_id, txn.sender_text,
                      size)
        await self.reply(reply)

    async def cmd_RCPT(self, arg: str) -> None:
        assert self.gw is not None
        if self.txn is None:
            await self._refuse(replies.NEED_MAIL)
            return
        if arg[:3].upper() != "TO:":
            await self._refuse(replies.SYNTAX)
            return
        try:
            address, params = parse_command_arg(arg[3:].lstrip(" "), allow_null=False,
                                                smtputf8=self.txn.smtputf8,
                                                allow_bare_postmaster=True)
        except SMTPUTF8Required:
            await self._refuse(replies.SMTPUTF8_REQUIRED)
            return
        except AddressError as exc:
            log.info("session=%s RCPT refused: %s", self.gw.session_id, exc)
            await self._refuse(replies.BAD_RECIPIENT_SYNTAX)
            return
        if params:
            await self._refuse(replies.PARAM_NOT_RECOGNISED)
            return
        assert address is not None
        if not address.domain:  # RFC 5321 §4.1.1.3: <Postmaster> means ours
            address = parse_path(f"<{address.local}@{self.hostname}>", allow_null=False,
                                 smtputf8=False)
            assert address is not None
        if self._transaction_expired():
            await self.reply_and_close(replies.TRANSACTION_TOO_LONG)
            return
        reply = await self.inbound.rcpt(self.gw, self.txn, address)
        await self.reply(reply)

    def _transaction_expired(self) -> bool:
        return (self.txn is not None and time.monotonic() - self.txn.started
                > self.settings.max_transaction_time)

    async def cmd_DATA(self, arg: str) -> None:
        assert self.gw is not None
        if arg:
            await self._refuse(replies.SYNTAX)
            return
        if self.txn is None:
            await self._refuse(replies.NEED_MAIL)
            return
        if not self.txn.recipients:
            await self._refuse(replies.NEED_RCPT)
            return
        txn = self.txn
        if self.data_slots.locked():
            try:
                await asyncio.wait_for(self.data_slots.acquire(), DATA_SLOT_WAIT)
            except TimeoutError:
                await self.reply(Reply(451, "4.3.2", "Too busy, try again later"))
                return
        else:
            # A free slot is taken at once; wait_for() would wrap the acquire in a Task.
            await self.data_slots.acquire()
        try:
            await self.reply(replies.START_DATA)
            content = await self._read_data(txn)
            self.txn = None
            if content is None:
                return
            outcome = await self.inbound.data(self.gw, txn, content)
            await self.reply(outcome.reply)
        finally:
            self.data_slots.release()

    async def _read_data(self, txn: Transaction) -> bytes | None:
        """Read up to CRLF.CRLF; return the unstuffed message, or None after replying.

        Reads with `readuntil(b".\\r\\n")` and checks whether the dot starts a line (the
        data's first line counts as starting after the DATA command's CRLF). A line
        ending in a dot costs an extra round, which is rare; the usual message is one
        or a few large reads.
        """
        assert self.gw is not None
        limit = self.settings.max_message_size
        parts: list[bytes] = []
        size = 0
        too_big = False
        previous_ends_line = True
        started = time.monotonic()
        txn_deadline = txn.started + self.settings.max_transaction_time
        # The session's one timer enforces the deadlines (no timeout context per read):
        # when it fires, _timeout_cb sends the reply noted here and closes, and the
        # pending read ends with IncompleteReadError.
        try:
            while True:
                now = time.monotonic()
                rate_deadline = started + max(self.settings.data_rate_grace,
                                              size / self.settings.min_data_rate
                                              if self.settings.min_data_rate else float("inf"))
                deadline = min(now + self.settings.command_timeout, txn_deadline,
                               rate_deadline)
                self._data_timeout = (
                    replies.TRANSACTION_TOO_LONG if deadline == txn_deadline
                    else replies.DATA_TOO_SLOW if deadline == rate_deadline
                    else replies.SESSION_TIMEOUT, txn, size)
                self._reset_timeout(max(0.0, deadline - now))
                try:
                    chunk = await self._reader.readuntil(b".\r\n")
                except asyncio.LimitOverrunError as error:
                    chunk = await self._reader.readexactly(error.consumed)
                final = chunk.endswith(b".\r\n") and (
                    (chunk == b".\r\n" and previous_ends_line)
                    or chunk.endswith(b"\r\n.\r\n"))
                body = chunk[:-3] if final else chunk
                size += len(body)
                if not too_big:
                    if size > limit:
                        too_big = True
                        parts.clear()
                    else:
                        parts.append(body)
                if final:
                    break
                previous_ends_line = chunk.endswith(b"\r\n")
        finally:
            self._data_timeout = None
        if self._closing:  # the timer fired as the last chunk came: it has answered
            return None
        self._reset_timeout()
        if too_big:
            log.info("session=%s from=<%s> DATA over size limit (%d > %d)", self.gw.session_id,
                     txn.sender_text, size, limit)
            self.metrics.reject(None, "data", "size")
            await self.reply(replies.SIZE_EXCEEDED)
            return None
        data = b"".join(parts)
        # RFC 5321 §2.3.8: CR and LF only as the CRLF pair.
        if not crlf_only(data):
            if self.settings.smuggling == "reject":
                log.info("session=%s from=<%s> DATA refused: bare CR or LF",
                         self.gw.session_id, txn.sender_text)
                self.metrics.reject(None, "data", "bare_cr_lf")
                await self.reply(replies.BARE_CR_LF_DATA)
                return None
            log.info("session=%s DATA had bare CR or LF: normalised", self.gw.session_id)
            data = normalise_line_endings(data)
        return unstuffed(data)

    async def cmd_RSET(self, arg: str) -> None:
        if arg:
            await self._refuse(replies.SYNTAX)
            return
        self.txn = None
        await self.reply(replies.RESET_OK)

    async def cmd_NOOP(self, arg: str) -> None:
        await self.reply(replies.OK)

    async def cmd_QUIT(self, arg: str) -> None:
        await self.reply_and_close(replies.BYE)

    async def cmd_VRFY(self, arg: str) -> None:
        # Revealing which mailboxes exist helps harvesters; RFC 5321 §3.5.3 allows 252.
        await self.reply(replies.VRFY_NOTHING)

    async def cmd_EXPN(self, arg: str) -> None:
        await self.reply(replies.EXPN_NOTHING)

    async def cmd_HELP(self, arg: str) -> None:
        await self.reply(Reply(214, "2.0.0", "See RFC 5321; mailedge"))


class Listener:
    """Makes one GatewaySMTP per connection (for `loop.create_server`) and tracks them."""

    def __init__(self, inbound: Inbound, settings: InboundSettings, metrics: Metrics,
                 tls_context: ssl.SSLContext | None) -> None:
        self.inbound = inbound
        self.settings = settings
        self.metrics = metrics
        self.tls_context = tls_context
        self.data_slots = asyncio.Semaphore(settings.max_concurrent_data)
        self.sessions: set[GatewaySMTP] = set()
        self._count = 0
        metrics.count_sessions(lambda: self._count)

    def active(self, delta: int) -> int:
        self._count += delta  # the gauge reads it when scraped (Metrics.count_sessions)
        return self._count

    def __call__(self) -> GatewaySMTP:
        return GatewaySMTP(self.inbound, self.settings, self.metrics, self.tls_context,
                           self.data_slots, self.active, self.sessions)

    async def close_sessions(self, grace: float) -> None:
        """Let sessions finish for `grace` seconds, then say 421 and close the rest."""
        tasks = {s._handler_coroutine for s in self.sessions if s._handler_coroutine}
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for session in list(self.sessions):
            if session.transport is not None and not session.transport.is_closing():
                session._writer.write(b"421 4.3.2 Service shutting down\r\n")
                session.transport.close()
        await asyncio.sleep(0)


def unstuffed(data: bytes) -> CrlfBytes:
    """The message in CRLF-only DATA `data`, its transparency dots removed (RFC 5321
    §4.5.2), typed by what is now known of it: CrlfBytes, or DotFreeCrlfBytes when no
    line starts with a dot (so the LMTP side has nothing to stuff either)."""
    if data.startswith(b".."):
        data = data[1:]
    # The usual message has none: one scan, no copy (rfind: CPython's reverse search
    # is about twice as fast as `in` for this needle, and existence is all we ask).
    if data.rfind(b"\r\n.") >= 0:
        return CrlfBytes(data.replace(b"\r\n..", b"\r\n."))
    return CrlfBytes(data) if data.startswith(b".") else DotFreeCrlfBytes(data)
