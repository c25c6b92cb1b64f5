"""RspamdClient and AntispamCheck against a real Rspamd 3.4 (tests/peers/rspamd.py).

The session's Rspamd answers DNS with instant NXDOMAIN, so network checks find nothing:
a plain message from 192.0.2.10 still collects a few points (HELO and From host do not
resolve: ~2.7 with a verified hostname, ~6 without). GTUBE is settled by Rspamd before
scoring (forced reject).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from filters.antispam import ANTISPAM, AntispamCheck, decide
from filters.base import Action, Results, Stage
from filters.rspamd import RspamdClient, SpamResult, SpamScanError
from gateway.pipeline import FilterContext
from tests.peers.rspamd import GTUBE, Rspamd
from tests.unit.test_rspamd import (
    FakeEnvelope,
    FakeMessage,
    FakeRecipient,
    FakeSession,
    FakeTenant,
)

# Until tests/conftest.py star-imports tests.peers.fixtures_rspamd:
pytest_plugins = ["tests.peers.fixtures_rspamd"]

pytestmark = pytest.mark.integration

DEFAULT_POLICY = {"spam_tag_score": 5.0, "spam_quarantine_score": 10.0,
                  "spam_reject_score": 15.0, "antispam_fail_open": False}


def message(body: str, subject: str = "Lunch", msgid: str | None = None) -> bytes:
    msgid = msgid or f"{uuid.uuid4().hex}@example.com"
    return (f"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.net>\r\n"
            f"Subject: {subject}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{msgid}>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}").encode()


CLEAN = message("Hi Bob,\r\n\r\nlunch tomorrow at noon? The usual place.\r\n\r\nAlice\r\n")
SPAM = message(f"Buy now!\r\n\r\n{GTUBE}\r\n", subject="You won")


async def check(client: RspamdClient, data: bytes, **kwargs: Any) -> SpamResult:
    args: dict[str, Any] = {"ip": "192.0.2.10", "helo": "mail.example.com",
                            "sender": "alice@example.com", "recipients": ["bob@example.net"],
                            "hostname": "mail.example.com"}
    args.update(kwargs)
    return await client.check(data, **args)


async def test_gtube_is_rejected(rspamd_client: RspamdClient) -> None:
    result = await check(rspamd_client, SPAM)
    assert result.action == "reject" and result.forced
    assert result.score >= result.required_score
    assert "GTUBE" in result.symbols
    verdict = decide(result, DEFAULT_POLICY)
    assert verdict.action is Action.REJECT and str(verdict.reply) == (
        "550 5.7.1 Message rejected as spam")


async def test_scans_over_rspamds_unix_socket(rspamd: Rspamd) -> None:
    """`rspamd_url = "unix:/path"`: the same answers as over TCP."""
    client = RspamdClient(rspamd.unix_url, timeout=10, max_size=1 << 20)
    try:
        spam = await check(client, SPAM)
        clean = await check(client, CLEAN)
        again = await check(client, SPAM)
    finally:
        await client.aclose()
    assert spam.action == "reject" and "GTUBE" in spam.symbols
    assert clean.action == "no action" and "GTUBE" not in clean.symbols
    assert again.action == "reject"


async def test_clean_message_scores_low(rspamd_client: RspamdClient) -> None:
    result = await check(rspamd_client, CLEAN, spf="pass",
                         dkim=[("pass", "example.com")], dmarc="pass")
    assert not result.forced and not result.skipped
    assert result.score < 5.0, result.top_symbols()
    assert result.action == "no action"
    assert result.message_id is not None and result.message_id.endswith("@example.com")
    verdict = decide(result, DEFAULT_POLICY)
    assert verdict.action is Action.CONTINUE
    assert dict(verdict.add_headers) == {"X-Spam-Score": f"{result.score:.2f}"}


async def test_authentication_results_replace_rspamds_checks(
        rspamd_client: RspamdClient) -> None:
    passed = await check(rspamd_client, CLEAN, spf="pass", dkim=[("pass", "example.com")],
                         dmarc="pass")
    assert {"R_SPF_ALLOW", "R_DKIM_ALLOW", "DMARC_POLICY_ALLOW"} <= set(passed.symbols)
    failed = await check(rspamd_client, CLEAN, spf="fail", dkim=[("fail", "example.com")],
                         dmarc="reject")
    assert {"R_SPF_FAIL", "R_DKIM_REJECT", "DMARC_POLICY_REJECT"} <= set(failed.symbols)
    assert failed.score > passed.score
    # Without them, Rspamd checks itself (and with NXDOMAIN everywhere finds nothing).
    own = await check(rspamd_client, CLEAN)
    assert "R_SPF_ALLOW" not in own.symbols and "DMARC_POLICY_ALLOW" not in own.symbols


async def test_missing_hostname_costs_points(rspamd_client: RspamdClient) -> None:
    known = await check(rspamd_client, CLEAN)
    unknown = await check(rspamd_client, CLEAN, hostname=None)
    assert "HFILTER_HOSTNAME_UNKNOWN" in unknown.symbols
    assert "HFILTER_HOSTNAME_UNKNOWN" not in known.symbols


async def test_every_recipient_reaches_rspamd(rspamd: Rspamd,
                                              rspamd_client: RspamdClient) -> None:
    queue_id = f"rcpt-{uuid.uuid4().hex[:12]}"
    await check(rspamd_client, CLEAN, queue_id=queue_id,
                recipients=["bob@example.net", "carol@example.org", "dave@example.net"])
    [line] = [line for line in rspamd.log_text().splitlines()
              if f"qid: <{queue_id}>" in line and "rspamd_task_write_log" in line]
    assert "rcpts: <bob@example.net,carol@example.org,dave@example.net>" in line


async def test_internationalised_addresses_do_not_break_headers(
        rspamd_client: RspamdClient) -> None:
    result = await check(rspamd_client, CLEAN, sender="jörg@exämple.com",
                         recipients=["bøb@example.net", "bob@exämple.net"])
    assert "BROKEN_HEADERS" not in result.symbols, result.top_symbols()


async def test_too_large_is_not_sent(rspamd: Rspamd) -> None:
    queue_id = f"big-{uuid.uuid4().hex[:12]}"
    async with RspamdClient(rspamd.url, timeout=5, max_size=len(CLEAN) - 1) as client:
        result = await check(client, CLEAN, queue_id=queue_id)
    assert result.skipped
    assert rspamd.count_log(queue_id) == 0


async def test_hung_scanner_times_out(rspamd: Rspamd) -> None:
    async with RspamdClient(rspamd.url, timeout=0.5, max_size=1 << 20) as client:
        rspamd.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(SpamScanError, match="timeout"):
                await check(client, CLEAN)
            assert time.monotonic() - started < 2
        finally:
            rspamd.thaw()
        assert (await check(client, CLEAN)).score < 5  # and recovers


async def test_stopped_scanner_is_refused_fast(rspamd_factory: Any) -> None:
    private: Rspamd = rspamd_factory()
    assert private.startup_seconds is not None
    print(f"\nprivate rspamd started in {private.startup_seconds:.2f}s "
          f"(hyperscan cache {private.cache_dir})")
    async with RspamdClient(private.url, timeout=5, max_size=1 << 20) as client:
        assert (await check(client, CLEAN)).score < 5
        private.stop()
        started = time.monotonic()
        with pytest.raises(SpamScanError):
            await check(client, CLEAN)
        assert time.monotonic() - started < 1
        private.start()
        assert (await check(client, CLEAN)).score < 5


def ctx_for(results: Results, tenant: str, policy: dict[str, Any], client: RspamdClient,
            session_id: str) -> FilterContext:
    recipients = [FakeRecipient(f"user@{tenant}.example", f"user@{tenant}.example", tenant)]
    ctx = FilterContext(Stage.MESSAGE, FakeSession(session_id=session_id),
                        FakeEnvelope("alice@example.com", recipients),
                        FakeTenant(tenant, {**DEFAULT_POLICY, **policy}),
                        FakeMessage(SPAM), SimpleNamespace(rspamd=client, dns=None,
                                                           hostname="mx.test.example"),
                        results)
    ctx.current_filter = AntispamCheck.name
    return ctx


async def test_filter_scans_once_for_several_tenants(rspamd: Rspamd,
                                                     rspamd_client: RspamdClient) -> None:
    session_id = f"S-{uuid.uuid4().hex[:12]}"
    results = Results()
    check_ = AntispamCheck()
    policies = {"acme": {}, "globex": {"spam_reject_score": None},
                "initech": {"spam_reject_score": None, "spam_quarantine_score": None}}
    verdicts = await asyncio.gather(*(
        check_.check(ctx_for(results, t, p, rspamd_client, session_id))
        for t, p in policies.items()))
    assert [v.action for v in verdicts] == [Action.REJECT, Action.QUARANTINE, Action.CONTINUE]
    assert ("X-Spam-Flag", "YES") in verdicts[2].add_headers
    assert results.facts[ANTISPAM].result().forced
    assert rspamd.count_log(f"qid: <{session_id}>") == 1  # one scan for three tenants
