"""A thin, typed client of the provider's tenant REST API (docs/tenant-api.yaml).

One method per endpoint, no caching (that is `cached.py`'s job). Each answer comes
back as an `Answer`: the decoded model plus what the cache needs — the TTL from
`Cache-Control: max-age`, `no-store`, the ETag, and whether it was a negative answer
(404 for a recipient) or a 304 revalidation. Every failure is mapped here, at the
edge, into the small error tree of errors.py:

* connection refused/reset, timeout, 5xx, 429, 401/403 (our token is wrong: an
  operator problem, but never the SMTP client's) → `Unavailable`;
* a body that does not decode into the contract's model → `InvalidResponse`.

GETs are idempotent and retried (with jitter, within the call's timeout) on
connection errors and 502/503/504; POST /v1/auth is never retried, since a slow
answer is better given up on than repeated; events are retried like GETs (the
provider de-duplicates them by content if it must).
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from tenant_api_client.errors import InvalidResponse, Unavailable
from tenant_api_client.models import (
    Account,
    ApiError,
    AuthRequest,
    DkimKeys,
    DomainInfo,
    Event,
    Limits,
    Recipient,
    SenderPermission,
    Tenant,
    Unknown,
)

V = TypeVar("V")
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*(\d+)", re.IGNORECASE)
_NO_STORE = re.compile(r"(?:^|,)\s*(no-store|no-cache)\b", re.IGNORECASE)
RETRY_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds per call type: lookups sit on the SMTP path and must be quick."""

    lookup: float = 2.0
    auth: float = 5.0
    event: float = 5.0
    connect: float = 1.0


@dataclass(frozen=True, slots=True)
class Answer(Generic[V]):
    value: V
    ttl: float | None = None  # from max-age; None: no Cache-Control given
    no_store: bool = False
    etag: str | None = None
    negative: bool = False
    not_modified: bool = False  # 304: keep the cached value, renew its TTL


def cache_directives(headers: httpx.Headers) -> tuple[float | None, bool]:
    value = headers.get("cache-control", "")
    match = _MAX_AGE.search(value)
    return (float(match.group(1)) if match else None), bool(_NO_STORE.search(value))


def _error_code(response: httpx.Response) -> str:
    """The contract's error code of a 4xx/5xx body ("" when there is none)."""
    try:
        return msgspec.json.decode(response.content, type=ApiError).error
    except msgspec.DecodeError:
        return ""


class TenantApiClient:
    def __init__(self, base_url: str, token: str, *, timeouts: Timeouts | None = None,
                 retries: int = 2, transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int = 50) -> None:
        self.timeouts = timeouts or Timeouts()
        self.retries = retries
        self.requests = 0  # HTTP requests sent, for metrics and tests
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json",
                     "User-Agent": "mailedge"},
            timeout=httpx.Timeout(self.timeouts.lookup, connect=self.timeouts.connect),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- transport ------------------------------------------------------------------

    async def _request(self, method: str, path: str, *, budget: float, retry: bool,
                       json: bytes | None = None, etag: str | None = None) -> httpx.Response:
        headers = {"Content-Type": "application/json"} if json is not None else {}
        if etag:
            headers["If-None-Match"] = etag
        attempts = 1 + (self.retries if retry else 0)
        deadline = asyncio.get_running_loop().time() + budget
        last: str = ""
        for attempt in range(attempts):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                self.requests += 1
                response = await self._http.request(
                    method, path, content=json, headers=headers,
                    timeout=httpx.Timeout(remaining, connect=min(remaining,
                                                                 self.timeouts.connect)))
            except httpx.TimeoutException:
                raise Unavailable(f"{method} {path}: timed out") from None
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code not in RETRY_STATUSES or attempt == attempts - 1:
                    return response
                last = f"HTTP {response.status_code}"
            if attempt < attempts - 1:
                # Jitter so that many nodes retrying after a blip do not arrive together.
                await asyncio.sleep(min(random.uniform(0.02, 0.1) * 2 ** attempt,
                                        max(0.0, deadline - asyncio.get_running_loop().time())))
        raise Unavailable(f"{method} {path}: {last or 'timed out'}")

    def _check(self, response: httpx.Response, path: str, ok: tuple[int, ...]) -> None:
        if response.status_code in ok:
            return
        if response.status_code in (401, 403):
            raise Unavailable(f"{path}: HTTP {response.status_code}: the API refused our "
                              "token ([tenants] token)")
        raise Unavailable(f"{path}: HTTP {response.status_code}")

    def _decode(self, response: httpx.Response, model: type[V], path: str) -> V:
        try:
            return msgspec.json.decode(response.content, type=model)
        except msgspec.DecodeError as exc:
            raise InvalidResponse(f"{path}: {exc}") from None

    def _answer(self, response: httpx.Response, value: V, *, negative: bool = False,
                not_modified: bool = False) -> Answer[V]:
        ttl, no_store = cache_directives(response.headers)
        return Answer(value, ttl=ttl, no_store=no_store, etag=response.headers.get("etag"),
                      negative=negative, not_modified=not_modified)

    async def _get(self, path: str, model: type[Any], *, etag: str | None,
                   missing: type | None = None) -> Answer[Any]:
        """GET a model; 404 is a negative answer (decoded as `missing` when given)."""
        response = await self._request("GET", path, budget=self.timeouts.lookup, retry=True,
                                        etag=etag)
        if response.status_code == 304 and etag:
            return self._answer(response, None, not_modified=True)
        if response.status_code == 404 and missing is None:
            return self._answer(response, None, negative=True)
        self._check(response, path, (200, 404))
        if response.status_code == 404:
            assert missing is not None
            return self._answer(response, self._decode(response, missing, path),
                                negative=True)
        return self._answer(response, self._decode(response, model, path))

    # -- endpoints ------------------------------------------------------------------

    async def recipient(self, address: str, etag: str | None = None
                        ) -> Answer[Recipient | Unknown | None]:
        path = f"/v1/recipients/{quote(address, safe='@')}"
        return await self._get(path, Recipient, etag=etag, missing=Unknown)

    async def tenant(self, tenant_id: str, etag: str | None = None) -> Answer[Tenant | None]:
        return await self._get(f"/v1/tenants/{quote(tenant_id, safe='')}", Tenant, etag=etag)

    async def domain(self, domain: str, etag: str | None = None) -> Answer[DomainInfo | None]:
        return await self._get(f"/v1/domains/{quote(domain, safe='')}", DomainInfo, etag=etag)

    async def dkim_keys(self, domain: str, etag: str | None = None
                        ) -> Answer[DkimKeys | None]:
        return await self._get(f"/v1/domains/{quote(domain, safe='')}/dkim", DkimKeys,
                               etag=etag)

    async def sender_allowed(self, username: str, sender: str, etag: str | None = None
                             ) -> Answer[SenderPermission | None]:
        path = (f"/v1/accounts/{quote(username, safe='@')}/senders/"
                f"{quote(sender, safe='@')}")
        return await self._get(path, SenderPermission, etag=etag)

    async def account_limits(self, username: str, etag: str | None = None
                             ) -> Answer[Limits | None]:
        return await self._get(f"/v1/accounts/{quote(username, safe='@')}/limits", Limits,
                               etag=etag)

    async def tenant_limits(self, tenant_id: str, etag: str | None = None
                            ) -> Answer[Limits | None]:
        return await self._get(f"/v1/tenants/{quote(tenant_id, safe='')}/limits", Limits,
                               etag=etag)

    async def authenticate(self, request: AuthRequest) -> Answer[Account | None]:
        path = "/v1/auth"
        response = await self._request("POST", path, budget=self.timeouts.auth, retry=False,
                                        json=msgspec.json.encode(request))
        if response.status_code == 401 and _error_code(response) == "invalid_credentials":
            return self._answer(response, None, negative=True)
        self._check(response, path, (200,))
        return self._answer(response, self._decode(response, Account, path))

    async def report(self, event: Event) -> None:
        path = "/v1/events"
        response = await self._request("POST", path, budget=self.timeouts.event, retry=True,
                                        json=msgspec.json.encode(event))
        self._check(response, path, (200, 202))

    async def health(self) -> bool:
        try:
            response = await self._request("GET", "/v1/health", budget=self.timeouts.lookup,
                                            retry=False)
        except Unavailable:
            return False
        return response.status_code == 200
