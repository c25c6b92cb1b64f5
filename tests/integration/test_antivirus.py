"""Antivirus against a real clamd (tests/peers/clamd.py): the INSTREAM client finds what
clamd's MIME decoding and archive support find, and the antivirus filter turns one scan
into each tenant's verdict.

clamd runs with the test database only: EICAR (hash and body signatures) and the marker
``MAILEDGE-TEST-VIRUS-7f3a``. Messages are built here as the wire carries them (CRLF,
base64 attachments, a zip built with zipfile). The gateway-level tests (SMTP in, 554 /
quarantine / 451 out) are in test_antivirus_node.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import quopri
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any

import pytest

from filters.antivirus import FACT, SCAN_HEADER, VIRUS_REJECT, AntivirusCheck
from filters.base import Action, Outcome, Results, Stage, Verdict
from filters.clamav import ClamdClient, ScanResult, ScanVerdict
from gateway.pipeline import FilterContext
from tests.peers.clamd import (
    EICAR,
    EICAR_SIGNATURES,
    TEST_VIRUS_MARKER,
    TEST_VIRUS_SIGNATURE,
    Clamd,
)
from tests.peers.fixtures_clamd import *  # noqa: F403 - clamd, clamd_factory

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


# -- messages -------------------------------------------------------------------------------


def headers(subject: str, extra: str = "") -> bytes:
    return (f"Received: from client.example ([192.0.2.1]) by mx.test.example; "
            f"Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            f"From: <sender@remote.example>\r\nTo: <alice@example.test>\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@remote.example>\r\n"
            f"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n{extra}").encode()


def plain(body: bytes, subject: str = "plain") -> bytes:
    return headers(subject, "Content-Type: text/plain; charset=us-ascii\r\n") + b"\r\n" + body \
        + b"\r\n"


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def with_attachment(payload: bytes, filename: str, *, content_type: str =
                    "application/octet-stream", encoding: str = "base64",
                    subject: str = "attachment") -> bytes:
    if encoding == "base64":
        encoded = b64(payload)
    elif encoding == "quoted-printable":
        encoded = quopri.encodestring(payload).replace(b"\n", b"\r\n")
    else:
        raise ValueError(encoding)
    boundary = b"=_mailedge_test_boundary"
    return (headers(subject, "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
                             f'boundary="{boundary.decode()}"\r\n')
            + b"\r\nThis is a multi-part message in MIME format.\r\n"
            + b"--" + boundary + b"\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            + b"Please see the attachment.\r\n"
            + b"--" + boundary + b"\r\n"
            + f'Content-Type: {content_type}; name="{filename}"\r\n'
              f"Content-Transfer-Encoding: {encoding}\r\n"
              f'Content-Disposition: attachment; filename="{filename}"\r\n\r\n'.encode()
            + encoded + b"\r\n--" + boundary + b"--\r\n")


def zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def scanner(clamd: Clamd, *, tcp: bool = False, timeout: float = 5.0,
            max_stream: int = 64 * MiB) -> ClamdClient:
    return ClamdClient(clamd.tcp_endpoint if tcp else clamd.unix_endpoint, timeout=timeout,
                       max_stream=max_stream)


# -- what clamd finds -----------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_eicar_raw(clamd: Clamd, tcp: bool) -> None:
    result = await scanner(clamd, tcp=tcp).scan(EICAR)
    assert result.infected and result.signature in EICAR_SIGNATURES


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_eicar_in_plain_body(clamd: Clamd, tcp: bool) -> None:
    result = await scanner(clamd, tcp=tcp).scan(plain(b"Hello,\r\n" + EICAR + b"\r\nBye.\r\n"))
    assert result.infected and result.signature in EICAR_SIGNATURES, result


async def test_eicar_base64_attachment(clamd: Clamd) -> None:
    message = with_attachment(EICAR, "eicar.com")
    assert EICAR not in message  # only clamd's MIME decoding can find it
    result = await scanner(clamd).scan(message)
    assert result.infected and result.signature in EICAR_SIGNATURES, result


async def test_eicar_in_zip_attachment(clamd: Clamd) -> None:
    archive = zipped({"readme.txt": b"nothing to see\r\n", "docs/eicar.com": EICAR})
    message = with_attachment(archive, "invoice.zip", content_type="application/zip")
    result = await scanner(clamd).scan(message)
    assert result.infected and result.signature in EICAR_SIGNATURES, result


async def test_eicar_in_zip_in_zip(clamd: Clamd) -> None:
    inner = zipped({"eicar.com": EICAR})
    message = with_attachment(zipped({"inner.zip": inner}), "outer.zip",
                              content_type="application/zip")
    result = await scanner(clamd).scan(message)
    assert result.infected and result.signature in EICAR_SIGNATURES, result


@pytest.mark.parametrize("build", [
    pytest.param(lambda: plain(b"marker: " + TEST_VIRUS_MARKER + b" end"), id="body"),
    pytest.param(lambda: with_attachment(b"x" * 5000 + TEST_VIRUS_MARKER, "data.bin"),
                 id="base64"),
    pytest.param(lambda: with_attachment(b"\xe9t\xe9 " * 40 + TEST_VIRUS_MARKER, "note.txt",
                                         content_type="text/plain",
                                         encoding="quoted-printable"), id="quoted-printable"),
    pytest.param(lambda: with_attachment(zipped({"a.txt": TEST_VIRUS_MARKER}), "a.zip",
                                         content_type="application/zip"), id="zip"),
])
async def test_custom_signature(clamd: Clamd, build: Any) -> None:
    result = await scanner(clamd).scan(build())
    assert result == ScanResult(ScanVerdict.INFECTED, TEST_VIRUS_SIGNATURE,
                                f"clamd: stream: {TEST_VIRUS_SIGNATURE} FOUND")


async def test_extra_signatures(clamd_factory: Any) -> None:
    clamd = clamd_factory(extra_signatures={"Mailedge.Test.Other": b"another-bad-thing"})
    result = await scanner(clamd).scan(plain(b"here is another-bad-thing"))
    assert result.signature == "Mailedge.Test.Other.UNOFFICIAL"


@pytest.mark.parametrize("build", [
    pytest.param(lambda: plain(b"Hello, nothing here.\r\n"), id="plain"),
    pytest.param(lambda: with_attachment(zipped({"report.txt": b"quarterly numbers\r\n" * 50}),
                                         "report.zip", content_type="application/zip"),
                 id="zip"),
    pytest.param(lambda: with_attachment(bytes(range(256)) * 4000, "blob.bin"), id="1MB"),
    pytest.param(lambda: b"", id="empty"),
])
async def test_clean_message(clamd: Clamd, build: Any) -> None:
    result = await scanner(clamd).scan(build())
    assert result.clean, result


# -- limits ---------------------------------------------------------------------------------


async def test_over_stream_max_length_is_too_large(clamd_factory: Any) -> None:
    clamd = clamd_factory(stream_max_length=256 * 1024)
    client = scanner(clamd)  # max_stream above clamd's limit: clamd says so
    small = plain(b"x" * 1000)
    assert (await client.scan(small)).clean
    for size in (256 * 1024 + 1, 3 * MiB, 20 * MiB):
        result = await client.scan(b"y" * size)
        assert result.verdict is ScanVerdict.TOO_LARGE, (size, result)
    assert (await client.scan(b"y" * (256 * 1024))).clean  # the limit itself is scanned


async def test_over_max_stream_is_not_sent(clamd: Clamd) -> None:
    client = scanner(clamd, max_stream=100_000)
    result = await client.scan(with_attachment(EICAR + b"\0" * 200_000, "big.bin"))
    assert result.verdict is ScanVerdict.TOO_LARGE and "not sent" in result.detail
    assert clamd.wait_scans(0) == []


# -- scanner trouble ------------------------------------------------------------------------


async def test_ping(clamd: Clamd) -> None:
    assert await scanner(clamd).ping()
    assert await scanner(clamd, tcp=True).ping()


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_scanner_down_then_back(clamd: Clamd, tcp: bool) -> None:
    client = scanner(clamd, tcp=tcp, timeout=1.0)
    clamd.stop()
    result = await client.scan(EICAR)
    assert result.verdict is ScanVerdict.ERROR
    assert not await client.ping()
    clamd.start()
    result = await client.scan(EICAR)  # no state in the client: the next scan just works
    assert result.infected


async def test_scanner_hung_times_out(clamd: Clamd) -> None:
    client = scanner(clamd, timeout=0.3)
    clamd.freeze()
    try:
        started = time.monotonic()
        result = await client.scan(plain(b"hello"))
        assert result.verdict is ScanVerdict.ERROR and "no answer" in result.detail
        assert time.monotonic() - started < 1.5
    finally:
        clamd.thaw()
    assert (await client.scan(plain(b"hello"))).clean


async def test_concurrent_scans(clamd: Clamd) -> None:
    client = scanner(clamd)
    messages = [plain(f"message {i}".encode() + (EICAR if i % 3 == 0 else b""), f"m{i}")
                for i in range(60)]
    results = await asyncio.gather(*(client.scan(m) for m in messages))
    assert [r.infected for r in results] == [i % 3 == 0 for i in range(60)]


# -- the filter with the real scanner -------------------------------------------------------


@dataclass(frozen=True)
class Session:
    session_id: str = "S1"
    client_ip: str = "192.0.2.1"
    client_port: int = 40000
    helo: str | None = "client.example"
    tls: bool = False


@dataclass(frozen=True)
class Envelope:
    sender: str = "sender@remote.example"
    recipients: tuple[Any, ...] = ()
    current_recipient: Any = None
    size: int = 0


@dataclass(frozen=True)
class Tenant:
    id: str
    policy: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def header_bytes(self) -> bytes:
        return self.data[: self.data.find(b"\r\n\r\n") + 4]

    def content(self) -> bytes:
        return self.data


@dataclass(frozen=True)
class Services:
    clamav: ClamdClient | None


async def run_tenants(client: ClamdClient, data: bytes, policies: dict[str, dict[str, Any]]
                      ) -> tuple[dict[str, Verdict], Results]:
    """The filter for each tenant concurrently, as gateway/inbound.py runs the MESSAGE
    stage: one results record for the transaction, one context per tenant."""
    results = Results()
    message = Message(data)
    check = AntivirusCheck()

    async def one(tenant: str, policy: dict[str, Any]) -> Verdict:
        ctx = FilterContext(Stage.MESSAGE, Session(), Envelope(), Tenant(tenant, policy),
                            message, Services(client), results)
        ctx.current_filter = check.name
        async with asyncio.timeout(check.timeout):
            return await check.check(ctx)

    verdicts = await asyncio.gather(*(one(t, p) for t, p in policies.items()))
    return dict(zip(policies, verdicts, strict=True)), results


async def test_one_scan_three_tenant_decisions(clamd: Clamd) -> None:
    message = with_attachment(zipped({"eicar.com": EICAR}), "x.zip",
                              content_type="application/zip")
    verdicts, results = await run_tenants(scanner(clamd), message, {
        "acme": {"virus_action": "reject"},
        "globex": {"virus_action": "quarantine"},
        "initech": {},
    })
    assert verdicts["acme"].action is Action.REJECT and verdicts["acme"].reply == VIRUS_REJECT
    assert verdicts["globex"].action is Action.QUARANTINE
    assert verdicts["initech"].action is Action.REJECT
    assert all("Mailedge.Test.EICAR" in v.reason for v in verdicts.values())
    assert [(e.tenant, e.outcome) for e in results.entries] == [
        ("acme", Outcome.FAIL), ("globex", Outcome.FAIL), ("initech", Outcome.FAIL)]
    assert results.facts[FACT].result().signature in EICAR_SIGNATURES
    assert len(clamd.wait_scans(1)) == 1  # scanned once for all three


async def test_clean_message_passes_every_tenant(clamd: Clamd) -> None:
    verdicts, results = await run_tenants(scanner(clamd), plain(b"hi"), {
        "acme": {}, "globex": {"antivirus_fail_open": True}})
    assert all(v.action is Action.CONTINUE and not v.add_headers for v in verdicts.values())
    assert {e.outcome for e in results.entries} == {Outcome.PASS}
    assert clamd.wait_scans(1) == ["OK"]


async def test_scanner_down_defers_unless_fail_open(clamd: Clamd) -> None:
    client = scanner(clamd, timeout=1.0)
    clamd.stop()
    verdicts, results = await run_tenants(client, plain(b"hi"), {
        "acme": {}, "globex": {"antivirus_fail_open": True}})
    assert verdicts["acme"].action is Action.TEMPFAIL
    assert verdicts["acme"].reply is not None and verdicts["acme"].reply.code == 451
    assert verdicts["globex"].action is Action.CONTINUE
    assert verdicts["globex"].add_headers == ((SCAN_HEADER, "unscanned (scanner unavailable)"),)
    assert {e.outcome for e in results.entries} == {Outcome.ERROR}


async def test_hung_scanner_is_an_error_not_a_filter_timeout(clamd: Clamd) -> None:
    client = scanner(clamd, timeout=0.3)
    clamd.freeze()
    try:
        verdicts, results = await run_tenants(client, plain(b"hi"), {
            "globex": {"antivirus_fail_open": True}})
    finally:
        clamd.thaw()
    assert verdicts["globex"].action is Action.CONTINUE
    assert verdicts["globex"].add_headers
    assert "no answer" in results.entries[0].detail


async def test_too_large_is_delivered_unscanned_never_deferred(clamd_factory: Any) -> None:
    clamd = clamd_factory(stream_max_length=64 * 1024)
    data = with_attachment(EICAR + b"\0" * 100_000, "big.bin")
    verdicts, results = await run_tenants(scanner(clamd), data, {
        "acme": {}, "globex": {"virus_action": "quarantine"}})
    for verdict in verdicts.values():
        assert verdict.action is Action.CONTINUE
        assert verdict.add_headers == ((SCAN_HEADER, "unscanned (too large to scan)"),)
    assert {e.outcome for e in results.entries} == {Outcome.SKIP}
