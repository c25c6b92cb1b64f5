"""RspamdClient against a scripted HTTP server; the per-tenant spam decision as tables.

The scripted server (`ScriptedRspamd`) is a bare asyncio server on 127.0.0.1 that reads
each request as raw bytes (so the tests see exactly which headers, in which order and
how many times, the client sent) and answers with the next step of its script: a
status and a body, a hang, a disconnect.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from filters import authentication as auth
from filters.antispam import (
    ANTISPAM,
    SCANNER_UNAVAILABLE,
    SENDER_BLOCKED,
    SPAM_REJECT,
    AntispamCheck,
    Listing,
    decide,
    decide_unscanned,
    sender_listing,
)
from filters.base import Action, Outcome, Results, Stage, Verdict
from filters.dkim import DkimResult
from filters.dmarc import DmarcResult, DmarcStatus, Policy
from filters.dns import DnsResult, DnsTemporaryError
from filters.rspamd import RspamdClient, SpamResult, SpamScanError
from filters.spf import SpfResult
from gateway.pipeline import FilterContext
from tests.peers.ports import free_port

# A real /checkv2 reply of Rspamd 3.4 (clean message, trimmed to four symbols).
CLEAN_REPLY = {
    "is_skipped": False, "score": 2.7, "required_score": 15.0, "action": "no action",
    "symbols": {
        "HFILTER_FROMHOST_NORES_A_OR_MX": {
            "name": "HFILTER_FROMHOST_NORES_A_OR_MX", "score": 1.5, "metric_score": 1.5,
            "description": "FROM host no resolve to A or MX", "options": ["example.com"]},
        "HFILTER_HELO_IP_A": {"name": "HFILTER_HELO_IP_A", "score": 1.0,
                              "metric_score": 1.0, "options": ["mail.example.com"]},
        "MIME_GOOD": {"name": "MIME_GOOD", "score": -0.1, "metric_score": -0.1,
                      "options": ["text/plain"]},
        "ARC_NA": {"name": "ARC_NA", "score": 0.0, "metric_score": 0.0},
    },
    "messages": {}, "message-id": "abc@example.com", "time_real": 0.086436,
    "milter": {"remove_headers": {"X-Spam": 0}},
}
GTUBE_REPLY = {
    "is_skipped": True, "score": 15.0, "required_score": 15.0, "action": "reject",
    "symbols": {"GTUBE": {"name": "GTUBE", "score": 0.0, "metric_score": 0.0}},
    "messages": {"smtp_message": "Gtube pattern"}, "message-id": "gt@example.com",
    "time_real": 0.001024,
}
MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: hi\r\n"
           b"Message-ID: <abc@example.com>\r\n\r\nLunch?\r\n")


# -- the scripted server ------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def one(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


@dataclass
class Step:
    status: int = 200
    body: bytes = b""
    delay: float = 0.0
    disconnect: bool = False  # close without answering


def reply(payload: Any, status: int = 200, delay: float = 0.0) -> Step:
    return Step(status, json.dumps(payload).encode(), delay)


@dataclass
class ScriptedRspamd:
    script: list[Step] = field(default_factory=list)
    default: Step = field(default_factory=lambda: reply(CLEAN_REPLY))
    requests: list[Request] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    port: int = 0
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> ScriptedRspamd:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("utf-8", "surrogateescape").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in
                                                      lines[1:] if line)]
            length = int(next((v for k, v in headers if k.lower() == "content-length"), 0))
            body = await reader.readexactly(length)
            self.requests.append(Request(method, path, headers, body))
            step = self.script.pop(0) if self.script else self.default
            if step.delay:
                await asyncio.sleep(step.delay)
            if not step.disconnect:
                writer.write(f"HTTP/1.1 {step.status} X\r\nConnection: close\r\n"
                             f"Content-Type: application/json\r\n"
                             f"Content-Length: {len(step.body)}\r\n\r\n".encode() + step.body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.active -= 1
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[ScriptedRspamd]:
    instance = await ScriptedRspamd().start()
    yield instance
    await instance.stop()


@pytest.fixture
async def client(server: ScriptedRspamd) -> AsyncIterator[RspamdClient]:
    instance = RspamdClient(server.url, timeout=2.0, max_size=100_000)
    yield instance
    await instance.aclose()


async def scan(client: RspamdClient, message: bytes = MESSAGE, **kwargs: Any) -> SpamResult:
    args: dict[str, Any] = {"ip": "192.0.2.10", "helo": "mail.example.com",
                            "sender": "alice@example.com", "recipients": ["bob@example.net"]}
    args.update(kwargs)
    return await client.check(message, **args)


# -- what the client sends ------------------------------------------------------------------


async def test_request_line_headers_and_body(server: ScriptedRspamd,
                                             client: RspamdClient) -> None:
    await scan(client, recipients=["bob@example.net", "carol@example.org", "dave@example.net"],
               hostname="mail.example.com", user="alice", queue_id="S1-Q1",
               mta_name="mx.test.example")
    [request] = server.requests
    assert (request.method, request.path) == ("POST", "/checkv2")
    assert request.body == MESSAGE
    assert request.one("Content-Length") == str(len(MESSAGE))
    assert request.one("IP") == "192.0.2.10"
    assert request.one("Helo") == "mail.example.com"
    assert request.one("Hostname") == "mail.example.com"
    assert request.one("From") == "alice@example.com"
    assert request.all("Rcpt") == ["bob@example.net", "carol@example.org", "dave@example.net"]
    assert request.one("User") == "alice"
    assert request.one("Queue-Id") == "S1-Q1"
    assert request.one("MTA-Name") == "mx.test.example"
    assert request.one("Password") is None
    for name in ("SPF", "DKIM", "DMARC"):
        assert request.one(name) is None


async def test_optional_headers_left_out_and_null_sender(server: ScriptedRspamd,
                                                         client: RspamdClient) -> None:
    await scan(client, ip=None, helo=None, sender="", recipients=["bob@example.net"])
    [request] = server.requests
    assert request.one("From") == "<>"
    for name in ("IP", "Helo", "Hostname", "User", "Queue-Id", "MTA-Name"):
        assert request.one(name) is None


async def test_password_header(server: ScriptedRspamd) -> None:
    async with RspamdClient(server.url, timeout=2, max_size=1000, password="s3cret") as c:
        await scan(c)
    assert server.requests[0].one("Password") == "s3cret"


async def test_authentication_results_in_http_headers_vocabulary(
        server: ScriptedRspamd, client: RspamdClient) -> None:
    await scan(client, spf="pass", dkim=[("pass", "example.com"), ("fail", "other.example")],
               dmarc="reject")
    request = server.requests[0]
    assert json.loads(request.one("SPF") or "") == {"result": "pass"}
    assert json.loads(request.one("DKIM") or "") == {"results": [
        {"result": "pass", "domain": "example.com"},
        {"result": "fail", "domain": "other.example"}]}
    assert json.loads(request.one("DMARC") or "") == {"result": "reject"}


@pytest.mark.parametrize(("spf", "dkim", "dmarc", "expect"), [
    ("softfail", "none", "quarantine",
     ({"result": "softfail"}, {"results": [{"result": "na", "domain": "unknown"}]},
      {"result": "quarantine"})),
    ("none", [("temperror", "x.example")], "temperror",
     ({"result": "na"}, {"results": [{"result": "tempfail", "domain": "x.example"}]},
      {"result": "tempfail"})),
    ("permerror", [("permerror", "")], "permerror",
     ({"result": "permfail"}, {"results": [{"result": "permfail", "domain": "unknown"}]},
      {"result": "badpolicy"})),
    # Words the module cannot take are not sent (with http_headers on: no symbol at all).
    ("temperror", [], "bogus", (None, None, None)),
])
async def test_authentication_words_mapped(server: ScriptedRspamd, client: RspamdClient,
                                           spf: str, dkim: Any, dmarc: str,
                                           expect: tuple[Any, Any, Any]) -> None:
    await scan(client, spf=spf, dkim=dkim, dmarc=dmarc)
    request = server.requests[0]
    sent = tuple(None if request.one(n) is None else json.loads(request.one(n) or "")
                 for n in ("SPF", "DKIM", "DMARC"))
    assert sent == expect


async def test_non_ascii_addresses(server: ScriptedRspamd, client: RspamdClient) -> None:
    # Rspamd 3.4 scores BROKEN_HEADERS (8) for non-ASCII envelope addresses.
    await scan(client, sender="jörg@example.com",
               recipients=["bob@exämple.net", "bøb@example.net", "carol@example.org"])
    request = server.requests[0]
    assert request.one("From") == "<>"
    assert request.all("Rcpt") == ["bob@xn--exmple-cua.net", "carol@example.org"]
    await scan(client, sender="joerg@exämple.com")
    assert server.requests[1].one("From") == "joerg@xn--exmple-cua.com"


async def test_no_header_injection(server: ScriptedRspamd, client: RspamdClient) -> None:
    await scan(client, helo="evil\r\nX-Injected: 1", queue_id="q\n1")
    request = server.requests[0]
    assert request.one("X-Injected") is None
    assert request.one("Helo") == "evil  X-Injected: 1"
    assert request.one("Queue-Id") == "q 1"


# -- what the client makes of the answer -------------------------------------------------


async def test_decodes_reply(client: RspamdClient) -> None:
    result = await scan(client)
    assert result == SpamResult(
        score=2.7, required_score=15.0, action="no action",
        symbols={"HFILTER_FROMHOST_NORES_A_OR_MX": 1.5, "HFILTER_HELO_IP_A": 1.0,
                 "MIME_GOOD": -0.1, "ARC_NA": 0.0},
        message_id="abc@example.com", forced=False, skipped=False, seconds=0.086436)
    assert result.top_symbols() == [("HFILTER_FROMHOST_NORES_A_OR_MX", 1.5),
                                    ("HFILTER_HELO_IP_A", 1.0), ("MIME_GOOD", -0.1)]


async def test_decodes_forced_gtube(server: ScriptedRspamd, client: RspamdClient) -> None:
    server.script = [reply(GTUBE_REPLY)]
    result = await scan(client)
    assert (result.forced, result.action, result.score, dict(result.symbols)) == (
        True, "reject", 15.0, {"GTUBE": 0.0})


@pytest.mark.parametrize(("step", "needle"), [
    (reply({"error": "invalid command", "error_domain": "protocol-error"}, 500), "HTTP 500"),
    (Step(503, b"<html>busy</html>"), "HTTP 503"),
    (reply({"error": "boom"}, 400), "HTTP 400"),
    (Step(200, b"this is not json"), "bad JSON"),
    (Step(200, b'{"score": 1.0'), "bad JSON"),
    (reply({"error": "message is too big"}), "message is too big"),
    (reply({"score": 1.0, "symbols": {}}), "without score or action"),
    (reply({"score": "high", "action": "reject"}), "bad JSON"),
    (Step(disconnect=True), "ServerDisconnected"),
])
async def test_errors_become_spam_scan_error(server: ScriptedRspamd, client: RspamdClient,
                                             step: Step, needle: str) -> None:
    server.script = [step]
    with pytest.raises(SpamScanError, match=needle):
        await scan(client)


async def test_connection_refused() -> None:
    async with RspamdClient(f"http://127.0.0.1:{free_port()}", timeout=2,
                            max_size=1000) as c:
        started = time.monotonic()
        with pytest.raises(SpamScanError, match="Connect"):
            await scan(c)
        assert time.monotonic() - started < 1


async def test_timeout(server: ScriptedRspamd) -> None:
    server.script = [reply(CLEAN_REPLY, delay=3)]
    async with RspamdClient(server.url, timeout=0.3, max_size=1000) as c:
        started = time.monotonic()
        with pytest.raises(SpamScanError, match=r"timeout after 0\.3s"):
            await scan(c)
        assert 0.25 < time.monotonic() - started < 1.5


async def test_too_large_is_not_sent(server: ScriptedRspamd) -> None:
    async with RspamdClient(server.url, timeout=1, max_size=len(MESSAGE) - 1) as c:
        result = await scan(c)
    assert result.skipped and "too large" in result.reason
    assert server.requests == []


async def test_connection_limit(server: ScriptedRspamd) -> None:
    server.default = reply(CLEAN_REPLY, delay=0.1)
    async with RspamdClient(server.url, timeout=5, max_size=1000, connections=2) as c:
        results = await asyncio.gather(*(scan(c) for _ in range(6)))
    assert len(results) == 6 and server.max_active <= 2


async def test_closed_client_refuses(server: ScriptedRspamd) -> None:
    c = RspamdClient(server.url, timeout=1, max_size=1000)
    await scan(c)
    await c.aclose()
    await c.aclose()  # idempotent
    with pytest.raises(SpamScanError, match="closed"):
        await scan(c)


async def test_ping(server: ScriptedRspamd) -> None:
    async with RspamdClient(server.url, timeout=1, max_size=1000) as c:
        server.script = [Step(200, b"pong\r\n")]
        assert await c.ping()
        server.script = [Step(500, b"")]
        assert not await c.ping()


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        RspamdClient("http://127.0.0.1:1", timeout=0, max_size=1)


# -- the decision, per tenant ------------------------------------------------------------

DEFAULTS = {"spam_tag_score": 5.0, "spam_quarantine_score": 10.0, "spam_reject_score": 15.0,
            "antispam_fail_open": False}


def result(score: float, *, action: str = "no action", forced: bool = False,
           symbols: dict[str, float] | None = None) -> SpamResult:
    return SpamResult(score=score, required_score=15.0, action=action, forced=forced,
                      symbols=symbols if symbols is not None else {"SYM_A": score})


def headers(verdict: Verdict) -> dict[str, str]:
    return dict(verdict.add_headers)


@pytest.mark.parametrize(("score", "policy", "action", "flagged"), [
    (-1.0, {}, Action.CONTINUE, False),
    (4.99, {}, Action.CONTINUE, False),
    (5.0, {}, Action.CONTINUE, True),
    (9.99, {}, Action.CONTINUE, True),
    (10.0, {}, Action.QUARANTINE, True),
    (15.0, {}, Action.REJECT, False),
    (99.0, {}, Action.REJECT, False),
    (20.0, {"spam_reject_score": None}, Action.QUARANTINE, True),
    (20.0, {"spam_reject_score": None, "spam_quarantine_score": None}, Action.CONTINUE, True),
    (20.0, {"spam_tag_score": None, "spam_reject_score": None,
            "spam_quarantine_score": None}, Action.CONTINUE, False),
    (3.0, {"spam_tag_score": 2.0}, Action.CONTINUE, True),
    (6.0, {"spam_reject_score": 6}, Action.REJECT, False),
    (8.0, {"spam_quarantine_score": 7.5, "spam_reject_score": 7.9}, Action.REJECT, False),
    (6.0, {"spam_reject_score": True}, Action.CONTINUE, True),  # not a number: ignored
])
def test_decide_thresholds(score: float, policy: dict[str, Any], action: Action,
                           flagged: bool) -> None:
    verdict = decide(result(score), {**DEFAULTS, **policy})
    assert verdict.action is action
    assert ("X-Spam-Flag" in headers(verdict)) is flagged
    if action is Action.REJECT:
        assert verdict.reply == SPAM_REJECT and str(verdict.reply) == (
            "550 5.7.1 Message rejected as spam")
    if action is Action.CONTINUE and not flagged:
        assert headers(verdict) == {"X-Spam-Score": f"{score:.2f}"}


def test_missing_policy_keys_use_model_defaults() -> None:
    assert decide(result(12.0), {}).action is Action.QUARANTINE


def test_tag_headers() -> None:
    verdict = decide(result(6.3, symbols={"HFILTER_HOSTNAME_UNKNOWN": 2.5, "RDNS_NONE": 1.0,
                                          "ARC_NA": 0.0, "MIME_GOOD": -0.1,
                                          "ONCE_RECEIVED": 0.1}), DEFAULTS)
    assert list(verdict.add_headers) == [
        ("X-Spam-Flag", "YES"), ("X-Spam-Score", "6.30"),
        ("X-Spam-Status", "Yes, score=6.30 required=5.00 tests=HFILTER_HOSTNAME_UNKNOWN(2.50),"
                          "RDNS_NONE(1.00),ONCE_RECEIVED(0.10),MIME_GOOD(-0.10)")]
    assert "6.30 >= tag 5.00" in verdict.reason


def test_status_header_stays_one_short_line() -> None:
    many = {f"SYMBOL_NUMBER_{i:03d}": 1.0 for i in range(200)}
    status = headers(decide(result(200.0, symbols=many), {"spam_reject_score": None,
                                                          "spam_quarantine_score": None}))
    value = status["X-Spam-Status"]
    assert len(value) <= 905 and value.endswith(",...") and "\n" not in value


@pytest.mark.parametrize(("policy", "action"), [
    ({}, Action.REJECT),
    ({"spam_reject_score": 100.0}, Action.REJECT),  # forced: beyond any threshold
    ({"spam_reject_score": None}, Action.QUARANTINE),
    ({"spam_reject_score": None, "spam_quarantine_score": None}, Action.CONTINUE),
])
def test_forced_reject_gets_the_strongest_configured_reaction(policy: dict[str, Any],
                                                              action: Action) -> None:
    gtube = SpamResult(score=15.0, required_score=15.0, action="reject", forced=True,
                       symbols={"GTUBE": 0.0})
    verdict = decide(gtube, {**DEFAULTS, **policy})
    assert verdict.action is action
    assert "forced reject by rspamd (GTUBE)" in verdict.reason
    if action is Action.CONTINUE:
        assert headers(verdict)["X-Spam-Flag"] == "YES"


def test_forced_add_header_tags_and_forced_no_action_scores() -> None:
    assert "X-Spam-Flag" in headers(decide(result(0.0, action="add header", forced=True),
                                           DEFAULTS))
    assert decide(result(1.0, action="no action", forced=True), DEFAULTS).add_headers == (
        ("X-Spam-Score", "1.00"),)


def test_unforced_rspamd_action_does_not_decide() -> None:
    assert decide(result(2.0, action="reject"), DEFAULTS).action is Action.CONTINUE


def test_skipped_and_allowed() -> None:
    skipped = decide(SpamResult.not_scanned("too large (9 > 8 bytes)"), DEFAULTS)
    assert skipped.action is Action.CONTINUE
    assert headers(skipped) == {"X-Spam-Status": "unscanned"}
    allowed = decide(result(50.0), DEFAULTS, allowed=True)
    assert allowed.action is Action.CONTINUE
    assert headers(allowed)["X-Spam-Score"] == "50.00"
    assert headers(allowed)["X-Spam-Status"].startswith("No, score=50.00 required=5.00")
    assert "X-Spam-Flag" not in headers(allowed)


@pytest.mark.parametrize(("policy", "allowed", "action"), [
    ({}, False, Action.TEMPFAIL),
    ({"antispam_fail_open": False}, False, Action.TEMPFAIL),
    ({"antispam_fail_open": True}, False, Action.CONTINUE),
    ({}, True, Action.CONTINUE),
])
def test_decide_unscanned(policy: dict[str, Any], allowed: bool, action: Action) -> None:
    verdict = decide_unscanned(policy, reason="timeout after 5s", allowed=allowed)
    assert verdict.action is action
    if action is Action.TEMPFAIL:
        assert verdict.reply == SCANNER_UNAVAILABLE and str(verdict.reply).startswith(
            "451 4.3.2 ")
    else:
        assert headers(verdict) == {"X-Spam-Status": "unscanned"}


# -- allow and block lists -----------------------------------------------------------------


@pytest.mark.parametrize(("policy", "kwargs", "kind", "entry"), [
    ({}, {"envelope_sender": "a@x.example"}, Listing.NONE, ""),
    ({"spam_block_senders": ["a@x.example"]}, {"envelope_sender": "A+news@X.Example"},
     Listing.BLOCKED, "a@x.example"),
    ({"spam_block_senders": ["@x.example"]}, {"envelope_sender": "",
                                              "header_from": ["b@x.example"]},
     Listing.BLOCKED, "@x.example"),
    ({"spam_block_senders": ["@x.example"]}, {"envelope_sender": "b@sub.x.example"},
     Listing.NONE, ""),
    # allow needs the matched identity authenticated
    ({"spam_allow_senders": ["@x.example"]}, {"envelope_sender": "a@x.example"},
     Listing.NONE, ""),
    ({"spam_allow_senders": ["@x.example"]}, {"envelope_sender": "a@x.example",
                                              "spf_pass_domain": "x.example"},
     Listing.ALLOWED, "@x.example"),
    ({"spam_allow_senders": ["@x.example"]}, {"envelope_sender": "a@x.example",
                                              "spf_pass_domain": "other.example"},
     Listing.NONE, ""),
    ({"spam_allow_senders": ["news@x.example"]}, {"envelope_sender": "bounce@esp.example",
                                                  "header_from": ["News@X.example"],
                                                  "dmarc_pass_domain": "x.example"},
     Listing.ALLOWED, "news@x.example"),
    # the most specific entry wins; a tie goes to block
    ({"spam_allow_senders": ["a@x.example"], "spam_block_senders": ["@x.example"]},
     {"envelope_sender": "a@x.example", "spf_pass_domain": "x.example"},
     Listing.ALLOWED, "a@x.example"),
    ({"spam_allow_senders": ["@x.example"], "spam_block_senders": ["a@x.example"]},
     {"envelope_sender": "a@x.example", "spf_pass_domain": "x.example"},
     Listing.BLOCKED, "a@x.example"),
    ({"spam_allow_senders": ["@x.example"], "spam_block_senders": ["@x.example"]},
     {"envelope_sender": "a@x.example", "spf_pass_domain": "x.example"},
     Listing.BLOCKED, "@x.example"),
    ({"spam_allow_senders": ["a@x.example"], "spam_block_senders": ["@x.example"]},
     {"envelope_sender": "a@x.example"}, Listing.BLOCKED, "@x.example"),  # unauthenticated
    # IDN entries and addresses compare as A-labels
    ({"spam_block_senders": ["@exämple.net"]}, {"envelope_sender": "z@xn--exmple-cua.net"},
     Listing.BLOCKED, "@exämple.net"),
    ({"spam_block_senders": "a@x.example"}, {"envelope_sender": "a@x.example"},
     Listing.BLOCKED, "a@x.example"),  # a single string is a list of one
    ({"spam_block_senders": ["nonsense", 7]}, {"envelope_sender": "a@x.example"},
     Listing.NONE, ""),
])
def test_sender_listing(policy: dict[str, Any], kwargs: dict[str, Any], kind: Listing,
                        entry: str) -> None:
    listing = sender_listing(policy, **kwargs)
    assert (listing.kind, listing.entry) == (kind, entry)


def test_unauthenticated_allow_match_is_reported() -> None:
    listing = sender_listing({"spam_allow_senders": ["@x.example"]},
                             envelope_sender="a@x.example")
    assert listing.kind is Listing.NONE
    assert listing.ignored == "allow entry @x.example matched unauthenticated a@x.example"


# -- the filter, with a fake scanner -------------------------------------------------------


class FakeResolver:
    def __init__(self, answers: dict[tuple[str, str], list[str] | Exception]) -> None:
        self.answers = answers

    async def query(self, name: str, rdtype: str) -> DnsResult:
        answer = self.answers.get((name, rdtype), [])
        if isinstance(answer, Exception):
            raise answer
        return DnsResult(name=name, rdtype=rdtype, records=tuple(answer),
                         nxdomain=not answer, ttl=60)


class FakeScanner:
    """Stands in for RspamdClient: counts scans, returns or raises what it is told."""

    def __init__(self, outcome: SpamResult | Exception, delay: float = 0.0) -> None:
        self.outcome = outcome
        self.delay = delay
        self.calls: list[dict[str, Any]] = []

    async def check(self, message: bytes, **kwargs: Any) -> SpamResult:
        self.calls.append({"message": message, **kwargs})
        await asyncio.sleep(self.delay)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


@dataclass
class FakeSession:
    session_id: str = "S1"
    client_ip: str = "192.0.2.10"
    client_port: int = 40000
    helo: str | None = "mail.example.com"
    tls: bool = False


@dataclass
class FakeRecipient:
    address: str
    lookup_key: str
    tenant: str


@dataclass
class FakeEnvelope:
    sender: str
    recipients: list[FakeRecipient]
    current_recipient: None = None
    size: int = len(MESSAGE)


@dataclass
class FakeTenant:
    id: str
    policy: dict[str, Any]


@dataclass
class FakeMessage:
    data: bytes = MESSAGE

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def header_bytes(self) -> bytes:
        return self.data[:self.data.index(b"\r\n\r\n") + 4]

    def content(self) -> bytes:
        return self.data


def make_ctx(results: Results, tenant: str, policy: dict[str, Any], services: Any,
             sender: str = "alice@example.com") -> FilterContext:
    recipients = [FakeRecipient(f"user@{tenant}.example", f"user@{tenant}.example", tenant)]
    ctx = FilterContext(Stage.MESSAGE, FakeSession(), FakeEnvelope(sender, recipients),
                        FakeTenant(tenant, {**DEFAULTS, **policy}), FakeMessage(), services,
                        results)
    ctx.current_filter = AntispamCheck.name
    return ctx


def services(scanner: Any, dns: Any = None) -> SimpleNamespace:
    return SimpleNamespace(rspamd=scanner, dns=dns, hostname="mx.test.example")


def finished(value: Any) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def run_tenants(scanner: Any, policies: dict[str, dict[str, Any]],
                      results: Results | None = None, dns: Any = None,
                      sender: str = "alice@example.com") -> tuple[dict[str, Verdict], Results]:
    results = results or Results()
    check = AntispamCheck()
    ctxs = {t: make_ctx(results, t, p, services(scanner, dns), sender)
            for t, p in policies.items()}
    verdicts = await asyncio.gather(*(check.check(c) for c in ctxs.values()))
    return dict(zip(ctxs, verdicts, strict=True)), results


async def test_scan_once_decide_per_tenant() -> None:
    scanner = FakeScanner(result(12.0), delay=0.05)
    verdicts, results = await run_tenants(scanner, {
        "acme": {}, "globex": {"spam_quarantine_score": None, "spam_reject_score": 11.0},
        "initech": {"spam_tag_score": 20.0, "spam_quarantine_score": None,
                    "spam_reject_score": None}})
    assert len(scanner.calls) == 1
    assert verdicts["acme"].action is Action.QUARANTINE
    assert verdicts["globex"].action is Action.REJECT
    assert verdicts["initech"].action is Action.CONTINUE
    assert verdicts["initech"].add_headers == (("X-Spam-Score", "12.00"),)
    lines = {e.tenant: e for e in results.for_filter("antispam")}
    assert lines["acme"].outcome is Outcome.FAIL and "score=12.00" in lines["acme"].detail
    assert lines["initech"].outcome is Outcome.PASS
    fact = results.facts[ANTISPAM]
    assert fact.done() and fact.result().score == 12.0


async def test_scan_request_carries_the_transaction() -> None:
    scanner = FakeScanner(result(1.0))
    resolver = FakeResolver({("10.2.0.192.in-addr.arpa", "PTR"): ["mail.example.com"],
                             ("mail.example.com", "A"): ["192.0.2.10"]})
    results = Results()
    results.facts[auth.SPF] = finished(SpfResult(
        result="pass", domain="example.com", identity="mailfrom", sender="alice@example.com",
        client_ip="192.0.2.10", helo="mail.example.com"))
    results.facts[auth.DKIM] = finished([DkimResult(result="pass", domain="example.com")])
    results.facts[auth.DMARC] = finished(DmarcResult(
        result=DmarcStatus.FAIL, from_domain="example.com", policy=Policy.REJECT))
    await run_tenants(scanner, {"acme": {}}, results=results, dns=resolver)
    [call] = scanner.calls
    assert call["message"] == MESSAGE
    assert {k: call[k] for k in ("ip", "helo", "sender", "recipients", "hostname",
                                 "queue_id", "mta_name", "spf", "dkim", "dmarc")} == {
        "ip": "192.0.2.10", "helo": "mail.example.com", "sender": "alice@example.com",
        "recipients": ["user@acme.example"], "hostname": "mail.example.com",
        "queue_id": "S1", "mta_name": "mx.test.example", "spf": "pass",
        "dkim": [("pass", "example.com")], "dmarc": "reject"}
    assert results.facts["rdns"].result().name == "mail.example.com"


async def test_unconfirmed_or_failed_rdns_sends_no_hostname() -> None:
    unconfirmed: dict[tuple[str, str], list[str] | Exception] = {
        ("10.2.0.192.in-addr.arpa", "PTR"): ["liar.example"],
        ("liar.example", "A"): ["198.51.100.1"]}
    failed: dict[tuple[str, str], list[str] | Exception] = {
        ("10.2.0.192.in-addr.arpa", "PTR"): DnsTemporaryError("timeout")}
    for answers in (unconfirmed, failed):
        scanner = FakeScanner(result(1.0))
        await run_tenants(scanner, {"acme": {}}, dns=FakeResolver(answers))
        assert scanner.calls[0]["hostname"] is None


async def test_without_authentication_facts_rspamd_checks_itself() -> None:
    scanner = FakeScanner(result(1.0))
    await run_tenants(scanner, {"acme": {}})
    call = scanner.calls[0]
    assert (call["spf"], call["dkim"], call["dmarc"], call["hostname"]) == (
        None, None, None, None)


async def test_scanner_down_per_tenant_fail_open() -> None:
    scanner = FakeScanner(SpamScanError("timeout after 5s"))
    verdicts, results = await run_tenants(scanner, {"acme": {},
                                                    "globex": {"antispam_fail_open": True}})
    assert len(scanner.calls) == 1
    assert verdicts["acme"].action is Action.TEMPFAIL
    assert verdicts["acme"].reply == SCANNER_UNAVAILABLE
    assert verdicts["globex"].action is Action.CONTINUE
    assert verdicts["globex"].add_headers == (("X-Spam-Status", "unscanned"),)
    assert {e.outcome for e in results.for_filter("antispam")} == {Outcome.ERROR}


async def test_unexpected_errors_reach_the_pipeline() -> None:
    # Anything but SpamScanError is a bug: the pipeline turns it into on_error (TEMPFAIL).
    with pytest.raises(RuntimeError):
        await run_tenants(FakeScanner(RuntimeError("bug")), {"acme": {}})
    assert AntispamCheck.on_error is Action.TEMPFAIL


async def test_no_scanner_configured() -> None:
    verdicts, results = await run_tenants(None, {"acme": {}})
    assert verdicts["acme"].action is Action.CONTINUE
    assert results.for_filter("antispam")[0].outcome is Outcome.SKIP


async def test_blocked_sender_rejected_for_that_tenant_only() -> None:
    scanner = FakeScanner(result(1.0))
    verdicts, _ = await run_tenants(scanner, {
        "acme": {"spam_block_senders": ["@example.com"]}, "globex": {}})
    assert verdicts["acme"].action is Action.REJECT
    assert verdicts["acme"].reply == SENDER_BLOCKED
    assert verdicts["globex"].action is Action.CONTINUE
    assert len(scanner.calls) == 1  # for globex


async def test_blocked_sender_alone_needs_no_scan() -> None:
    scanner = FakeScanner(result(1.0))
    verdicts, _ = await run_tenants(scanner, {"acme": {"spam_block_senders": [
        "alice@example.com"]}})
    assert verdicts["acme"].action is Action.REJECT and scanner.calls == []


async def test_allowed_authenticated_sender_is_never_spam() -> None:
    spf = SpfResult(result="pass", domain="example.com", identity="mailfrom",
                    sender="alice@example.com", client_ip="192.0.2.10", helo="mail.example.com")
    for outcome in (result(40.0), SpamScanError("connection refused")):
        results = Results(facts={auth.SPF: finished(spf)})
        verdicts, _ = await run_tenants(FakeScanner(outcome), {
            "acme": {"spam_allow_senders": ["@example.com"]}}, results=results)
        assert verdicts["acme"].action is Action.CONTINUE
        assert "X-Spam-Flag" not in headers(verdicts["acme"])
        assert "allowed by @example.com" in results.for_filter("antispam")[0].detail


async def test_unauthenticated_allow_is_ignored() -> None:
    verdicts, results = await run_tenants(FakeScanner(result(40.0)), {
        "acme": {"spam_allow_senders": ["@example.com"]}})
    assert verdicts["acme"].action is Action.REJECT
    assert "matched unauthenticated" in results.for_filter("antispam")[0].detail


async def test_header_from_checked_against_lists() -> None:
    verdicts, _ = await run_tenants(FakeScanner(result(0.0)), {
        "acme": {"spam_block_senders": ["alice@example.com"]}}, sender="bounces@esp.example")
    assert verdicts["acme"].action is Action.REJECT


async def test_pipeline_timeout_is_above_a_sane_client_timeout() -> None:
    assert AntispamCheck.timeout >= 30
    assert AntispamCheck.stages == frozenset({Stage.MESSAGE})


def test_not_scanned_result() -> None:
    skipped = SpamResult.not_scanned("too large")
    assert skipped.skipped and skipped.reason == "too large" and math.isinf(
        skipped.required_score)

