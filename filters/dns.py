"""The one async DNS layer every lookup in mailedge goes through (SPF, DKIM, DMARC, ARC,
DNSBLs, MX).

Interface (what the checks may rely on):

* `await resolver.query(name, rdtype)` returns a `DnsResult`:
  - `records`: the answer in a simple text form — TXT: one string per record, its
    character-strings concatenated (RFC 7208 §3.3, RFC 6376 §3.6.2.2); A/AAAA: the
    addresses; MX: "preference exchange" with the exchange lowercased and without the
    final dot; PTR/CNAME/NS: names without the final dot;
  - `nxdomain`: the name does not exist (NXDOMAIN);
  - empty `records` and not `nxdomain`: the name exists but has no such records
    (NODATA / "no answer");
  - `ttl`: seconds the answer may be cached.
* A failure to get an answer — SERVFAIL, REFUSED, timeout, no nameserver reachable —
  raises `DnsTemporaryError` (an SPF/DKIM/DMARC temperror; never a permanent verdict).
* A name that cannot be queried at all (empty label, over 253 octets) raises
  `DnsNameError` (a permerror for the caller).

`AsyncResolver` implements it over dnspython's asyncio resolver with a cache that
honours TTLs (capped), negative caching of NXDOMAIN/NODATA (RFC 2308, from the SOA
minimum, capped), single-flight per (name, type), per-query timeouts, and the
nameservers from `[dns] nameservers` (host:port) or the system's resolv.conf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class DnsError(Exception):
    """Base of the DNS layer's errors."""


class DnsTemporaryError(DnsError):
    """No answer now (SERVFAIL, REFUSED, timeout, unreachable): try again later."""


class DnsNameError(DnsError):
    """The name cannot be looked up at all (malformed)."""


@dataclass(frozen=True, slots=True)
class DnsResult:
    name: str
    rdtype: str
    records: tuple[str, ...] = ()
    ttl: int = 0
    nxdomain: bool = False

    @property
    def exists(self) -> bool:
        return not self.nxdomain


class Resolver(Protocol):
    async def query(self, name: str, rdtype: str) -> DnsResult:
        """Look `name` up; raises DnsTemporaryError or DnsNameError."""
        ...
