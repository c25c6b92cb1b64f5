"""mailedge's asynchronous LMTP client (RFC 2033), with per-recipient replies.

Layers, bottom up (the httpcore shape):

* `lmtp.replies`  -- the `Reply` value and an incremental reply parser
* `lmtp.dotstuff` -- the DATA payload: CRLF normalisation and dot-stuffing
* `lmtp.protocol` -- the client dialogue as a sans-IO state machine (bytes in, events out)
* `lmtp.client`   -- `LmtpConnection`, the asyncio driver with per-phase timeouts
* `lmtp.pool`     -- `Endpoint`, `LmtpPool` (reuse + concurrency cap), `LmtpPools`
* `lmtp.errors`   -- the exception tree and what each error means for recipients

Typical use::

    async with LmtpPool("unix:/run/dovecot/lmtp", lhlo_name="gw1.example") as pool:
        replies = await pool.send("alice@example.org", ["bob@example.net"], message)
        # one Reply per recipient: replies[0].is_positive means delivered

The package uses the standard library only and imports nothing from the gateway.
"""

from .client import DEFAULT_LHLO_NAME, DEFAULT_TIMEOUTS, LmtpConnection, LmtpTimeouts
from .dotstuff import (
    CrlfBytes,
    DotFreeCrlfBytes,
    crlf_only,
    decode_data,
    encode_data,
    normalise_line_endings,
    normalise_message,
)
from .errors import (
    ConnectError,
    ConnectionLost,
    ExtensionNotSupported,
    LmtpError,
    LmtpProtocolError,
    LmtpTimeout,
    LocalProtocolError,
    RemoteProtocolError,
    ServerUnavailable,
)
from .pool import DEFAULT_LMTP_PORT, Endpoint, LmtpPool, LmtpPools
from .protocol import (
    NEED_DATA,
    ClientProtocol,
    ConnectionClosed,
    Event,
    Greeting,
    NeedData,
    SendPayload,
    SessionReady,
    State,
    TransactionDone,
)
from .replies import Reply, ReplyParser

__all__ = [
    "DEFAULT_LHLO_NAME",
    "DEFAULT_LMTP_PORT",
    "DEFAULT_TIMEOUTS",
    "NEED_DATA",
    "ClientProtocol",
    "ConnectError",
    "ConnectionClosed",
    "ConnectionLost",
    "CrlfBytes",
    "DotFreeCrlfBytes",
    "Endpoint",
    "Event",
    "ExtensionNotSupported",
    "Greeting",
    "LmtpConnection",
    "LmtpError",
    "LmtpPool",
    "LmtpPools",
    "LmtpProtocolError",
    "LmtpTimeout",
    "LmtpTimeouts",
    "LocalProtocolError",
    "NeedData",
    "RemoteProtocolError",
    "Reply",
    "ReplyParser",
    "SendPayload",
    "ServerUnavailable",
    "SessionReady",
    "State",
    "TransactionDone",
    "crlf_only",
    "decode_data",
    "encode_data",
    "normalise_line_endings",
    "normalise_message",
]
