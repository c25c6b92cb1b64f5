"""The `TenantDirectory` interface the gateway talks to.

Two implementations exist behind it: the embedded file directory (`filedir.py`,
`[tenants] file`) and the provider's tenant REST API through the caching client
(`cached.py` over `client.py`, `[tenants] api_url`). The gateway holds only this
Protocol; the contract tests (tests/contract/) run one suite against both.

Every method raises `Unavailable` when the directory cannot answer now; "not found"
is an ordinary answer (None, Unknown, False), never an exception.
"""

from __future__ import annotations

from typing import Protocol

from tenant_api_client.models import (
    Account,
    DkimKeys,
    DomainInfo,
    Event,
    Limits,
    Recipient,
    Tenant,
    Unknown,
)


class TenantDirectory(Protocol):
    async def lookup_recipient(self, local: str, domain: str) -> Recipient | Unknown:
        """Who is `local@domain` (both already normalised for lookups)?"""
        ...

    async def tenant(self, tenant_id: str) -> Tenant | None:
        """The tenant with its domains and default policy."""
        ...

    async def domain(self, domain: str) -> DomainInfo | None:
        """A hosted domain's tenant and effective policy; None when not hosted."""
        ...

    async def authenticate(self, username: str, password: str, *, mechanism: str,
                           client_ip: str) -> Account | None:
        """SASL credentials → the account, or None when they are wrong."""
        ...

    async def sender_allowed(self, username: str, sender: str) -> bool:
        """May this login use `sender` as its envelope or From address?"""
        ...

    async def dkim_keys(self, domain: str) -> DkimKeys:
        """The keys that sign mail of `domain` (empty when it signs nothing)."""
        ...

    async def account_limits(self, username: str) -> Limits:
        ...

    async def tenant_limits(self, tenant_id: str) -> Limits:
        ...

    async def report(self, event: Event) -> None:
        """Tell the provider about something that needs action (best effort)."""
        ...

    def ready(self) -> bool:
        """True when the directory can answer (for the node's /ready)."""
        ...

    async def aclose(self) -> None: ...
