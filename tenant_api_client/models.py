"""Typed answers of the tenant directory (msgspec structs: strict and cheap to decode).

The gateway sees only these, whichever directory produced them: the embedded file
(`filedir.py`) or the provider's tenant REST API (`client.py` behind `cached.py`). The
JSON the API speaks is exactly these structs (docs/tenant-api.yaml is the contract;
a test keeps the two in step). Addresses are lookup keys: lowercase A-label domain,
NFC case-folded local part without subaddress.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

RecipientKind = Literal["mailbox", "alias", "forward", "catch_all"]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
Score = Annotated[float, msgspec.Meta(ge=-1000, le=1000)]
DkimAlgorithm = Literal["rsa-sha256", "ed25519-sha256"]


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """What a tenant decided about its mail; a domain may override it.

    Unknown fields are ignored so an API can add settings before the gateway knows them.
    """

    # Content scanning (MESSAGE stage)
    spam_tag_score: Score = 5.0  # add X-Spam headers, deliver to Junk
    spam_quarantine_score: Score | None = 10.0
    spam_reject_score: Score | None = 15.0
    virus_action: Literal["reject", "quarantine"] = "reject"
    antivirus_fail_open: bool = False  # scanner down: accept unscanned instead of 451
    antispam_fail_open: bool = False
    # Sender authentication
    dmarc_enforcement: Literal["enforce", "quarantine_only", "monitor"] = "enforce"
    spf_fail_reject: bool = False  # SPF fail without a DMARC pass: 550 5.7.23
    # Sealers whose valid ARC chain overrides a DMARC failure of forwarded mail.
    arc_trusted_sealers: tuple[str, ...] = ()
    # Senders that skip spam scoring decisions / are always refused (addresses, or
    # "@domain" for a whole domain).
    spam_allow_senders: tuple[str, ...] = ()
    spam_block_senders: tuple[str, ...] = ()
    # Connection level
    greylisting: bool = False
    require_fcrdns: bool = False  # clients without forward-confirmed rDNS: 450 4.7.25
    reject_unknown_sender_domain: bool = True  # sender_domain at RCPT: 550 5.1.8 / 5.7.27
    # The tenant's own allow and deny lists (addresses, networks; "@domain" senders).
    allow_ips: tuple[str, ...] = ()
    deny_ips: tuple[str, ...] = ()
    allow_senders: tuple[str, ...] = ()
    deny_senders: tuple[str, ...] = ()
    # Forwarding
    srs_domain: str | None = None
    # Storage
    archive_retention_days: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_message_size: PositiveInt | None = None
    quarantine_retention_days: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # Copies this tenant refuses in a transaction accepted for another tenant.
    rejected_copies: Literal["quarantine", "discard"] = "quarantine"

    def as_mapping(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__struct_fields__}


# Kept for the name the gateway used before domain policies existed.
TenantPolicy = Policy


class Tenant(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str = ""
    domains: tuple[str, ...] = ()
    policy: Policy = Policy()


class DomainInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A hosted domain: its tenant and its effective policy (tenant's, with overrides)."""

    domain: str
    tenant: str
    policy: Policy = Policy()


class Autoreply(msgspec.Struct, frozen=True, kw_only=True):
    """A vacation message (RFC 3834); sent at most once per sender per interval."""

    subject: str
    body: str
    interval_days: PositiveInt = 7
    start: str | None = None  # ISO 8601 date, inclusive
    end: str | None = None


class Recipient(msgspec.Struct, frozen=True, kw_only=True):
    """A known recipient: what it is, where it lives, whether it can take mail now."""

    address: str  # the lookup key, also the mailbox address storage knows
    tenant: str
    kind: RecipientKind = "mailbox"
    storage: str | None = None  # LMTP endpoint; None: the node's default storage
    disabled: bool = False
    over_quota: bool = False
    # alias: other recipients (local or remote); forward: remote addresses (SRS applies)
    targets: tuple[str, ...] = ()
    keep_copy: bool = False  # forward: also deliver to this mailbox
    autoreply: Autoreply | None = None
    # The mailbox's own spam allow/block lists (addresses or "@domain"), added to the
    # tenant's for mail to this mailbox.
    spam_allow_senders: tuple[str, ...] = ()
    spam_block_senders: tuple[str, ...] = ()


class Unknown(msgspec.Struct, frozen=True, kw_only=True):
    """No such recipient. `tenant` is set when the domain is hosted here.

    Required (though it may be null) so that an unrelated 404 body — a wrong base URL,
    a proxy's error page — never decodes as "domain not hosted" and turns into a 550.
    """

    tenant: str | None

    @property
    def domain_hosted(self) -> bool:
        return self.tenant is not None


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Sending limits of an account or a tenant (None: no limit at this level)."""

    messages_per_hour: PositiveInt | None = None
    recipients_per_hour: PositiveInt | None = None
    recipients_per_message: PositiveInt | None = None
    max_message_size: PositiveInt | None = None


class Account(msgspec.Struct, frozen=True, kw_only=True):
    """An authenticated submission account (SMTP AUTH)."""

    username: str
    tenant: str
    # Addresses this login may use as sender: full addresses, or "@domain" for any
    # address of that domain.
    allowed_senders: tuple[str, ...] = ()
    limits_class: str = "default"
    limits: Limits = Limits()
    contained: bool = False  # suspended for abuse: may log in, may not send

    def may_send_as(self, sender: str) -> bool:
        sender = sender.lower()
        domain = sender.rpartition("@")[2]
        return any(allowed == sender or allowed == f"@{domain}"
                   for allowed in (a.lower() for a in self.allowed_senders))


class DkimKey(msgspec.Struct, frozen=True, kw_only=True):
    selector: str
    algorithm: DkimAlgorithm = "rsa-sha256"
    private_key: str  # PEM (PKCS#8)
    # Several keys may be active at once (RSA + Ed25519, or old + new while rotating).
    active: bool = True


class DkimKeys(msgspec.Struct, frozen=True, kw_only=True):
    domain: str
    keys: tuple[DkimKey, ...] = ()


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Something the gateway reports for the provider to act on."""

    type: Literal["account_contained", "delivery_failure_rate"]
    tenant: str
    account: str | None = None
    reason: str = ""
    at: float = 0.0  # unix time
    details: dict[str, str | int | float] = {}


class ApiError(msgspec.Struct, frozen=True, kw_only=True):
    """The body of every 4xx/5xx answer of the API."""

    error: str
    detail: str = ""


class AuthRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The body of POST /v1/auth."""

    username: str
    password: str
    mechanism: Literal["PLAIN", "LOGIN"] = "PLAIN"
    client_ip: str = ""


class SenderPermission(msgspec.Struct, frozen=True, kw_only=True):
    allowed: bool


class Health(msgspec.Struct, frozen=True, kw_only=True):
    status: str = "ok"
