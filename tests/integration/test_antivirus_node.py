"""Antivirus through a whole node: SMTP in, a real clamd, the reply and where copies go.

Node configuration these tests rely on::

    [antivirus]
    clamd = "unix:/path/clamd.sock"   # or "host:port"; absent: no scanner (Services.clamav None)
    max_scan_size = 26214400          # bytes; larger messages are delivered unscanned
    timeout = 10.0                    # seconds per scan, below the filter's 60 s

and the filter ``antivirus`` in ``[pipeline] message``. Tenants: acme keeps the default
policy (``virus_action = "reject"``, fail closed); globex quarantines viruses and
accepts mail unscanned while its scanner is down (``antivirus_fail_open``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import zipfile
from typing import Any

import pytest

from tests.peers.clamd import EICAR, TEST_VIRUS_MARKER, Clamd
from tests.peers.fixtures_clamd import *  # noqa: F403 - clamd, clamd_factory
from tests.support.node import NodeHarness
from tests.support.smtp import RawSMTP, dot_stuff, message

pytestmark = pytest.mark.integration

TENANTS = """
[tenant.acme]
domains = ["example.test"]
mailboxes = ["alice@example.test", "postmaster@example.test"]

[tenant.globex]
domains = ["example.org"]
mailboxes = ["carol@example.org"]
[tenant.globex.policy]
virus_action = "quarantine"
antivirus_fail_open = true
"""

HEADER = b"X-Mailedge-Virus-Scan:"


def zipped_eicar_message(subject: str = "invoice") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("invoice.com", EICAR)
    encoded = base64.encodebytes(buffer.getvalue()).decode().replace("\n", "\r\n")
    body = ("--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
            "--b1\r\nContent-Type: application/zip; name=\"invoice.zip\"\r\n"
            "Content-Transfer-Encoding: base64\r\n"
            "Content-Disposition: attachment; filename=\"invoice.zip\"\r\n\r\n"
            f"{encoded}\r\n--b1--\r\n")
    return message(subject, body=body, extra_headers=(
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n"))


async def node_with(node_factory: Any, clamd: Clamd, **antivirus: Any) -> NodeHarness:
    settings = {"clamd": clamd.unix_endpoint, "max_scan_size": 10 * 1024 * 1024,
                "timeout": 2.0, **antivirus}
    harness: NodeHarness = await node_factory(
        tenants=TENANTS,
        overrides={"pipeline": {"message": ["size_limit", "antivirus"]},
                   "antivirus": settings})
    return harness


async def send(harness: NodeHarness, recipients: list[str], data: bytes) -> tuple[int, str]:
    client, _ = await RawSMTP.connect(harness.port)
    try:
        reply = await client.transaction("sender@remote.example", recipients, dot_stuff(data))
    finally:
        await client.close()
    return reply.code, reply.status


def quarantined(harness: NodeHarness, tenant: str) -> list[bytes]:
    assert harness.node is not None
    quarantine = harness.node.quarantine
    return [quarantine.load(tenant, entry)[1] for entry in quarantine.ids(tenant)]


async def test_virus_rejected_for_a_rejecting_tenant(node_factory: Any, clamd: Clamd) -> None:
    harness = await node_with(node_factory, clamd)
    code, status = await send(harness, ["alice@example.test"], zipped_eicar_message())
    assert (code, status) == (554, "5.7.1")
    assert harness.node is not None and not harness.node.queue.entries
    assert quarantined(harness, "acme") == []
    assert harness.maildir_messages("alice@example.test") == []


async def test_virus_quarantined_for_a_quarantining_tenant(node_factory: Any,
                                                           clamd: Clamd) -> None:
    harness = await node_with(node_factory, clamd)
    data = message("marker", body="hello " + TEST_VIRUS_MARKER.decode() + "\r\n")
    code, _ = await send(harness, ["carol@example.org"], data)
    assert code == 250
    await harness.wait_empty()
    assert harness.maildir_messages("carol@example.org") == []
    [held] = quarantined(harness, "globex")
    assert b"X-Mailedge-Quarantine-Reason: antivirus" in held
    assert b"Mailedge.Test.Marker" in held  # the operator sees which signature


async def test_one_scan_for_two_tenants_and_no_delivery(node_factory: Any,
                                                         clamd: Clamd) -> None:
    """acme rejects, globex quarantines: not every tenant rejects, so 250, and acme's
    copy goes to acme's quarantine (never a bounce)."""
    harness = await node_with(node_factory, clamd)
    code, _ = await send(harness, ["alice@example.test", "carol@example.org"],
                         zipped_eicar_message())
    assert code == 250
    await harness.wait_empty()
    assert harness.maildir_messages("alice@example.test") == []
    assert harness.maildir_messages("carol@example.org") == []
    assert len(quarantined(harness, "acme")) == 1
    assert len(quarantined(harness, "globex")) == 1
    assert len(clamd.wait_scans(1)) == 1


async def test_clean_message_delivered_without_marks(node_factory: Any, clamd: Clamd) -> None:
    harness = await node_with(node_factory, clamd)
    code, _ = await send(harness, ["alice@example.test", "carol@example.org"],
                         message("clean", body="Nothing to see.\r\n"))
    assert code == 250
    await harness.wait_empty()
    for address in ("alice@example.test", "carol@example.org"):
        [delivered] = harness.maildir_messages(address)
        assert HEADER not in delivered
    assert clamd.wait_scans(1) == ["OK"]


async def test_scanner_down_defers_a_fail_closed_tenant(node_factory: Any,
                                                        clamd: Clamd) -> None:
    harness = await node_with(node_factory, clamd)
    clamd.stop()
    code, status = await send(harness, ["alice@example.test"], message("down"))
    assert (code, status) == (451, "4.3.2")
    # one fail-closed tenant in the transaction defers the whole message
    code, status = await send(harness, ["alice@example.test", "carol@example.org"],
                              message("down2"))
    assert (code, status) == (451, "4.3.2")
    assert harness.node is not None and not harness.node.queue.entries
    clamd.start()
    code, _ = await send(harness, ["alice@example.test"], message("back"))
    assert code == 250


async def test_scanner_down_fail_open_delivers_marked(node_factory: Any, clamd: Clamd) -> None:
    harness = await node_with(node_factory, clamd)
    clamd.stop()
    code, _ = await send(harness, ["carol@example.org"], message("unscanned"))
    assert code == 250
    await harness.wait_empty()
    [delivered] = harness.maildir_messages("carol@example.org")
    assert b"X-Mailedge-Virus-Scan: unscanned (scanner unavailable)\r\n" in delivered


async def test_hung_scanner_defers_within_the_timeout(node_factory: Any, clamd: Clamd) -> None:
    harness = await node_with(node_factory, clamd, timeout=0.5)
    clamd.freeze()
    try:
        started = asyncio.get_running_loop().time()
        code, status = await send(harness, ["alice@example.test"], message("hung"))
        assert (code, status) == (451, "4.3.2")
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        clamd.thaw()


async def test_too_large_to_scan_is_delivered_unscanned(node_factory: Any,
                                                        clamd: Clamd) -> None:
    harness = await node_with(node_factory, clamd, max_scan_size=20_000)
    big = message("big", body=("x" * 70 + "\r\n") * 400 + EICAR.decode() + "\r\n")
    code, _ = await send(harness, ["alice@example.test"], big)
    assert code == 250  # never 4xx for ever, never 5xx for what was not scanned
    await harness.wait_empty()
    [delivered] = harness.maildir_messages("alice@example.test")
    assert b"X-Mailedge-Virus-Scan: unscanned (too large to scan)\r\n" in delivered
    assert clamd.wait_scans(0) == []  # not sent to clamd at all


async def test_clamd_stream_limit_is_delivered_unscanned(node_factory: Any,
                                                         clamd_factory: Any) -> None:
    """max_scan_size above clamd's StreamMaxLength: clamd's size-limit reply, same result."""
    clamd = clamd_factory(stream_max_length=16 * 1024)
    harness = await node_with(node_factory, clamd, max_scan_size=1024 * 1024)
    big = message("big2", body=("y" * 70 + "\r\n") * 1000)
    code, _ = await send(harness, ["alice@example.test"], big)
    assert code == 250
    await harness.wait_empty()
    [delivered] = harness.maildir_messages("alice@example.test")
    assert b"X-Mailedge-Virus-Scan: unscanned (too large to scan)\r\n" in delivered

