"""The checks that run inside the SMTP session, one module per check.

`REGISTRY` maps the names used in `[pipeline]` to filter classes; the gateway's
composition root instantiates the ones the configuration names.
"""

from __future__ import annotations

from filters.access_lists import AccessLists
from filters.antispam import AntispamCheck
from filters.antivirus import AntivirusCheck
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
from filters.dnsbl import DnsblCheck
from filters.greylist import Greylist
from filters.limits import ConnectionLimits
from filters.rdns import RdnsCheck
from filters.reputation import ReputationCheck
from filters.sender_domain import SenderDomainCheck
from filters.size_limit import TenantSizeLimit

REGISTRY: dict[str, type[Filter]] = {
    f.name: f for f in (
        TenantSizeLimit, SpfCheck, DkimCheck, ArcCheck, DmarcCheck, AntivirusCheck,
        AntispamCheck, DnsblCheck, RdnsCheck, SenderDomainCheck, AccessLists,
        ConnectionLimits, ReputationCheck, Greylist)
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
