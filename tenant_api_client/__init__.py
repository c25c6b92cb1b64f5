"""Typed access to the provider's tenant directory (embedded file today, REST API next).

The rest of the code base sees only `TenantDirectory`, the models and the errors.
"""

from tenant_api_client.directory import TenantDirectory
from tenant_api_client.errors import DirectoryError, InvalidData, InvalidResponse, Unavailable
from tenant_api_client.filedir import FileDirectory
from tenant_api_client.models import Recipient, Tenant, TenantPolicy, Unknown

__all__ = [
    "DirectoryError",
    "FileDirectory",
    "InvalidData",
    "InvalidResponse",
    "Recipient",
    "Tenant",
    "TenantDirectory",
    "TenantPolicy",
    "Unavailable",
    "Unknown",
]
