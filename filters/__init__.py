"""The checks that run inside the SMTP session, one module per check.

`REGISTRY` maps the names used in `[pipeline]` to filter classes; the gateway's
composition root instantiates the ones the configuration names.
"""

from __future__ import annotations

from filters.authentication import ArcCheck, DkimCheck, DmarcCheck, SpfCheck
from filters.base import (
    CONTINUE,
    Action,
    Context,
    Filter,
    Outcome,
    Reply,
    ResultEntry,
    Results,
    Stage,
    Verdict,
)
from filters.size_limit import TenantSizeLimit

REGISTRY: dict[str, type[Filter]] = {
    TenantSizeLimit.name: TenantSizeLimit,
    SpfCheck.name: SpfCheck,
    DkimCheck.name: DkimCheck,
    ArcCheck.name: ArcCheck,
    DmarcCheck.name: DmarcCheck,
}

__all__ = [
    "CONTINUE",
    "REGISTRY",
    "Action",
    "Context",
    "Filter",
    "Outcome",
    "Reply",
    "ResultEntry",
    "Results",
    "Stage",
    "Verdict",
]
