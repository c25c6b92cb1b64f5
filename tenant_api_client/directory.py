"""The `TenantDirectory` interface the gateway talks to.

Two implementations exist behind it: the embedded file directory (`filedir.py`,
`[tenants] file`) and, from a later issue, the cached HTTP client of the provider's
tenant API. The gateway holds only this Protocol.
"""

from __future__ import annotations

from typing import Protocol

from tenant_api_client.models import Recipient, Tenant, Unknown


class TenantDirectory(Protocol):
    async def lookup_recipient(self, local: str, domain: str) -> Recipient | Unknown:
        """Who is `local@domain` (both already normalised for lookups)?

        Raises `Unavailable` when the directory cannot answer now.
        """
        ...

    async def tenant(self, tenant_id: str) -> Tenant | None:
        """The tenant with its domains and policy; raises `Unavailable`."""
        ...

    def ready(self) -> bool:
        """True when the directory can answer (for the node's /ready)."""
        ...

    async def aclose(self) -> None: ...
