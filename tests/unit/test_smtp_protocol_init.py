"""GatewaySMTP sets up the state aiosmtpd's SMTP.__init__ would, without running it.

aiosmtpd's constructor looks for hooks and AUTH methods by name and formats a log line
on every connection; GatewaySMTP dispatches commands itself and skips all that, but
aiosmtpd's plumbing it keeps (connection_made/lost, STARTTLS, PROXY) reads the
attributes that constructor sets. If an aiosmtpd upgrade adds or changes one, this
fails and says which.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP

from gateway.config import InboundSettings
from gateway.metrics import Metrics
from gateway.smtp_handler import GatewaySMTP, _NoHooks

# Objects made per instance (compared by type, not value) and the hook and AUTH tables
# GatewaySMTP leaves empty on purpose (it dispatches commands itself).
BY_TYPE = {"_loop", "loop", "_strong_reader", "_stream_reader_wr", "_closed",
           "_drain_waiters", "_client_connected_cb", "event_handler", "_auth_callback"}
OURS_EMPTY = {"_auth_methods", "_smtp_methods"}


class Reference(AioSMTP):
    line_length_limit = GatewaySMTP.line_length_limit  # our stream buffer, on purpose


def both(tls: ssl.SSLContext | None) -> tuple[dict[str, Any], dict[str, Any]]:
    settings = InboundSettings()
    ours = GatewaySMTP(None, settings, Metrics(), tls, asyncio.Semaphore(1),  # type: ignore[arg-type]
                       lambda _: 0, set())
    theirs = Reference(_NoHooks(), data_size_limit=settings.max_message_size,
                       enable_SMTPUTF8=True, decode_data=False,
                       hostname=settings.hostname, ident="ESMTP mailedge", tls_context=tls,
                       timeout=settings.command_timeout, auth_require_tls=True,
                       loop=asyncio.get_running_loop())
    return vars(ours), vars(theirs)


@pytest.mark.parametrize("with_tls", [False, True])
async def test_every_attribute_aiosmtpd_sets_is_set_alike(with_tls: bool) -> None:
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH) if with_tls else None
    if tls is not None:
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    ours, theirs = both(tls)
    missing = set(theirs) - set(ours)
    assert not missing, f"aiosmtpd sets attributes GatewaySMTP does not: {sorted(missing)}"
    for name, value in theirs.items():
        if name in BY_TYPE:
            assert type(ours[name]) is type(value), name
        elif name in OURS_EMPTY:
            assert ours[name] == {}, name
        else:
            assert ours[name] == value, (name, ours[name], value)
    assert ours["_strong_reader"]._limit == theirs["_strong_reader"]._limit
