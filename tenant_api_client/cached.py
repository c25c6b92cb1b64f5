"""The TenantDirectory the gateway uses in production: the HTTP client behind the cache.

Each call type has its own `AsyncCache` and policy (how long an answer lives without
Cache-Control, how long it may be served past expiry while the API fails); all share
one circuit breaker and one set of counters. What a provider can expect, per call:

    call             fresh for            stale while the API fails   "not found"
    recipient        max-age (≤ 1 h)      recipient_stale (1 h)       negative_ttl, never stale
    domain, tenant   max-age (≤ 1 h)      policy_stale (24 h)         negative_ttl, never stale
    dkim keys        max-age (≤ 1 h)      policy_stale (24 h)         -
    limits, senders  max-age (≤ 10 min)   limits_stale (1 h)          negative_ttl
    authentication   auth_ttl (60 s)      never                       never cached

So a known recipient keeps flowing through an outage, an unknown one is deferred
(451 4.4.3, from `Unavailable`) rather than refused, and a login is never accepted on
old information. Successful logins are cached under an HMAC of the credentials with a
per-process secret; passwords are never kept.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any, TypeVar

from tenant_api_client.cache import (
    AsyncCache,
    CachePolicy,
    CacheStats,
    CircuitBreaker,
    Fetched,
    NotModified,
    RateLimitedLog,
    credential_key,
)
from tenant_api_client.client import Answer, TenantApiClient
from tenant_api_client.errors import Unavailable
from tenant_api_client.models import (
    Account,
    AuthRequest,
    DkimKeys,
    DomainInfo,
    Event,
    Limits,
    Recipient,
    Tenant,
    Unknown,
)

log = logging.getLogger(__name__)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    size: int = 100_000
    recipient_stale: float = 3600.0
    policy_stale: float = 86400.0
    limits_stale: float = 3600.0
    negative_ttl: float = 60.0
    auth_ttl: float = 60.0
    breaker_failures: int = 5
    breaker_reset: float = 10.0


def _fetched(answer: Answer[Any], *, ttl: float | None = None) -> Fetched[Any] | NotModified:
    if answer.not_modified:
        return NotModified(ttl=answer.ttl, etag=answer.etag)
    if ttl is None:
        ttl = 0.0 if answer.no_store else answer.ttl
    return Fetched(answer.value, ttl=ttl, negative=answer.negative, etag=answer.etag)


class CachedTenantDirectory:
    def __init__(self, client: TenantApiClient, settings: CacheSettings | None = None) -> None:
        s = settings or CacheSettings()
        self.client = client
        self.settings = s
        self.stats = CacheStats()
        self.breaker = CircuitBreaker(s.breaker_failures, s.breaker_reset)
        small = max(1, s.size // 10)

        def cache(name: str, default: float, max_ttl: float, stale: float,
                  size: int) -> AsyncCache[Any, Any]:
            policy = CachePolicy(default_ttl=default, max_ttl=max_ttl,
                                 negative_ttl=s.negative_ttl, stale_if_error=stale,
                                 max_entries=size)
            return AsyncCache(name, policy, breaker=self.breaker, stats=self.stats)

        self.recipients = cache("recipient", 300, 3600, s.recipient_stale, s.size)
        self.domains = cache("domain", 300, 3600, s.policy_stale, small)
        self.tenants = cache("tenant", 300, 3600, s.policy_stale, small)
        self.dkim = cache("dkim", 300, 3600, s.policy_stale, small)
        self.limits = cache("limits", 60, 600, s.limits_stale, s.size)
        self.senders = cache("sender", 60, 600, s.limits_stale, s.size)
        self.auth: AsyncCache[str, Account | None] = AsyncCache(
            "auth", CachePolicy(default_ttl=s.auth_ttl, max_ttl=max(s.auth_ttl, 1.0),
                                negative_ttl=0.0, stale_if_error=0.0, max_entries=small),
            breaker=self.breaker, stats=self.stats)
        self._secret = secrets.token_bytes(32)
        self._event_log = RateLimitedLog(60.0, logger=log)

    async def lookup_recipient(self, local: str, domain: str) -> Recipient | Unknown:
        key = f"{local}@{domain}"

        async def fetch(etag: str | None) -> Fetched[Any] | NotModified:
            return _fetched(await self.client.recipient(key, etag))

        found: Recipient | Unknown = await self.recipients.get(key, fetch)
        return found

    async def tenant(self, tenant_id: str) -> Tenant | None:
        async def fetch(etag: str | None) -> Fetched[Any] | NotModified:
            return _fetched(await self.client.tenant(tenant_id, etag))

        found: Tenant | None = await self.tenants.get(tenant_id, fetch)
        return found

    async def domain(self, domain: str) -> DomainInfo | None:
        async def fetch(etag: str | None) -> Fetched[Any] | NotModified:
            return _fetched(await self.client.domain(domain, etag))

        found: DomainInfo | None = await self.domains.get(domain, fetch)
        return found

    async def dkim_keys(self, domain: str) -> DkimKeys:
        async def fetch(etag: str | None) -> Fetched[Any] | NotModified:
            return _fetched(await self.client.dkim_keys(domain, etag))

        found: DkimKeys | None = await self.dkim.get(domain, fetch)
        return found or DkimKeys(domain=domain)

    async def authenticate(self, username: str, password: str, *, mechanism: str,
                           client_ip: str) -> Account | None:
        key = credential_key(self._secret, username, password, mechanism, client_ip)
        request = AuthRequest(username=username, password=password,
                              mechanism="LOGIN" if mechanism.upper() == "LOGIN" else "PLAIN",
                              client_ip=client_ip)

        async def fetch(etag: str | None) -> Fetched[Any] | NotModified:
            answer = await self.client.authenticate(request)
            # A refusal is never cached (every failed attempt must reach the API, which
            # counts them); a success only for auth_ttl, whatever the HTTP headers say.
            return Fetched(answer.value, ttl=0.0 if answer.negative else self.settings.auth_ttl)

        account: Account | None = await self.auth.get(key, fetch)
        return account

    async def sender_allowed(self, username: str, sender: str) -> bool:
        async def fetch(etag: str | None) -> Fetched[Any] | NotModified:
            return _fetched(await self.client.sender_allowed(username, sender, etag))

        permission = await self.senders.get((username.lower(), sender.lower()), fetch)
        return bool(permission is not None and permission.allowed)

    async def account_limits(self, username: str) -> Limits:
        async def fetch(etag: str | None) -> Fetched[Any] | NotModified:
            return _fetched(await self.client.account_limits(username, etag))

        found: Limits | None = await self.limits.get(("account", username.lower()), fetch)
        return found or Limits()

    async def tenant_limits(self, tenant_id: str) -> Limits:
        async def fetch(etag: str | None) -> Fetched[Any] | NotModified:
            return _fetched(await self.client.tenant_limits(tenant_id, etag))

        found: Limits | None = await self.limits.get(("tenant", tenant_id), fetch)
        return found or Limits()

    async def report(self, event: Event) -> None:
        """Best effort: an event that cannot be delivered is logged, never raised."""
        try:
            await self.client.report(event)
        except Unavailable as exc:
            self._event_log.log(("event", event.type), logging.WARNING,
                                "tenant API: event %s for tenant %s not delivered: %s",
                                event.type, event.tenant, exc)

    def ready(self) -> bool:
        return self.breaker.state != "open"

    async def aclose(self) -> None:
        for cache in (self.recipients, self.domains, self.tenants, self.dkim, self.limits,
                      self.senders, self.auth):
            await cache.aclose()
        await self.client.aclose()
