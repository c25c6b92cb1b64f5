"""Typed answers of the tenant directory (msgspec structs: cheap to decode strictly).

The gateway sees only these, whichever directory (file or HTTP API) produced them.
Addresses in them are lookup keys: lowercase A-label domain, NFC case-folded local
part without subaddress.
"""

from __future__ import annotations

from typing import Any

import msgspec


class TenantPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """What a tenant decided about its own mail. Later issues add scanner policy."""

    max_message_size: int | None = None
    # Where copies that this tenant's checks refused go after the transaction was
    # accepted for another tenant: "quarantine" (default) or "discard".
    rejected_copies: str = "quarantine"

    def as_mapping(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__struct_fields__}


class Tenant(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str = ""
    domains: tuple[str, ...] = ()
    policy: TenantPolicy = TenantPolicy()


class Recipient(msgspec.Struct, frozen=True, kw_only=True):
    """A known recipient: where it lives and whether it can take mail now."""

    address: str  # the mailbox's lookup key, used for delivery
    tenant: str
    kind: str = "mailbox"
    storage: str | None = None  # LMTP endpoint; None: the node's default storage
    disabled: bool = False
    over_quota: bool = False


class Unknown(msgspec.Struct, frozen=True, kw_only=True):
    """No such recipient. `tenant` is set when the domain is hosted here."""

    tenant: str | None = None

    @property
    def domain_hosted(self) -> bool:
        return self.tenant is not None
