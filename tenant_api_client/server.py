"""The reference tenant API server: the whole contract, served from a tenants file.

`mailedge tenant-api --data config/tenants.toml --listen 127.0.0.1:8081 --token T`

It answers every endpoint of docs/tenant-api.yaml from the same file the embedded
directory reads (through `FileDirectory`, so both give the same answers), with
bearer-token auth, Cache-Control and ETags, and clear 4xx bodies for bad requests.
It is what the demo and the tests use, and a provider's starting point for their own.

For tests it has one hook, `fault`: "slow" (answers after `slow_seconds`), "500"
(every call fails), "malformed" (200 with a body that is not JSON); None is normal.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import unicodedata
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, get_args, get_type_hints

import msgspec
from aiohttp import web

from tenant_api_client.filedir import FileDirectory, normalise_domain, normalise_local
from tenant_api_client.models import (
    ApiError,
    AuthRequest,
    Event,
    Health,
    SenderPermission,
    Unknown,
)

log = logging.getLogger(__name__)

POSITIVE_MAX_AGE = 300  # seconds a found answer may be cached
NEGATIVE_MAX_AGE = 60  # seconds a "no such thing" may be cached: a new mailbox works soon
POLICY_MAX_AGE = 600
SUBADDRESS_SEPARATOR = "+"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(value: Any, status: int = 200, max_age: int | None = None) -> web.Response:
    body = msgspec.json.encode(value)
    headers = {"Content-Type": "application/json"}
    if max_age is not None:
        headers["Cache-Control"] = f"max-age={max_age}"
        headers["ETag"] = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    else:
        headers["Cache-Control"] = "no-store"
    return web.Response(body=body, status=status, headers=headers)


def _error(status: int, error: str, detail: str = "") -> web.Response:
    # "Not found" is an answer like any other: cacheable for a minute (the contract).
    response = _json(ApiError(error=error, detail=detail), status,
                     NEGATIVE_MAX_AGE if status == 404 else None)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="mailedge-tenant-api"'
    return response


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match compares weakly (RFC 9110 13.1.2): `*`, or any listed tag, W/ or not."""
    if if_none_match is None:
        return False
    if if_none_match.strip() == "*":
        return True
    ours = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == ours for tag in if_none_match.split(","))


KNOWN_EVENT_TYPES: tuple[str, ...] = get_args(get_type_hints(Event)["type"])


def _unknown_event_type(raw: bytes) -> str | None:
    """The type of an event body that is valid but for a type this server does not know."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    if not isinstance(body, dict):
        return None
    kind = body.get("type")
    if not isinstance(kind, str) or kind in KNOWN_EVENT_TYPES:
        return None
    try:  # the rest of the body must still be an Event
        msgspec.convert({**body, "type": KNOWN_EVENT_TYPES[0]}, Event)
    except msgspec.ValidationError:
        return None
    return kind


class BadRequest(Exception):
    pass


def lookup_key(address: str) -> tuple[str, str]:
    """Normalise an address the way the gateway does (the server must agree)."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c in address for c in "\r\n\0"):
        raise BadRequest(f"{address!r} is not an address")
    try:
        domain = normalise_domain(domain)
    except UnicodeError:
        raise BadRequest(f"{domain!r} is not a valid domain") from None
    local = normalise_local(unicodedata.normalize("NFC", local))
    if SUBADDRESS_SEPARATOR in local[1:]:
        local = local[:local.index(SUBADDRESS_SEPARATOR, 1)]
    return local, domain


class ReferenceServer:
    def __init__(self, data: Path, token: str) -> None:
        self.directory = FileDirectory(data, reload_interval=1.0)
        self.token = token
        self.requests = 0  # every request that reached a handler, for tests and logs
        self.fault: str | None = None
        self.slow_seconds = 5.0
        # Cache-Control max-age of found / not-found / policy answers (tests shorten them).
        self.positive_max_age = POSITIVE_MAX_AGE
        self.negative_max_age = NEGATIVE_MAX_AGE
        self.policy_max_age = POLICY_MAX_AGE
        self.app = web.Application(middlewares=[self._middleware])
        self.app.add_routes([
            web.get("/v1/health", self.health),
            web.get("/v1/recipients/{address}", self.recipient),
            web.get("/v1/tenants/{tenant_id}", self.tenant),
            web.get("/v1/tenants/{tenant_id}/limits", self.tenant_limits),
            web.get("/v1/domains/{domain}", self.domain),
            web.get("/v1/domains/{domain}/dkim", self.dkim),
            web.post("/v1/auth", self.auth),
            web.get("/v1/accounts/{username}/senders/{sender}", self.sender),
            web.get("/v1/accounts/{username}/limits", self.account_limits),
            web.post("/v1/events", self.events),
        ])
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])  # the real port when 0 was asked
        log.info("tenant API reference server on %s:%d", host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests += 1
        if self.fault == "slow":
            await asyncio.sleep(self.slow_seconds)
        elif self.fault == "500":
            return _error(500, "unavailable", "fault injected")
        elif self.fault == "malformed":
            return web.Response(body=b'{"address": ', content_type="application/json")
        if request.path != "/v1/health":
            supplied = request.headers.get("Authorization", "")
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(supplied.encode(), expected.encode()):
                return _error(401, "invalid_token", "a valid bearer token is required")
        try:
            response = await handler(request)
        except BadRequest as exc:
            return _error(400, "bad_request", str(exc))
        except web.HTTPException as exc:
            if exc.status == 404:
                return _error(404, "not_found", "no such resource")
            if exc.status == 405:
                return _error(405, "method_not_allowed")
            if exc.status >= 400:  # e.g. 413: every 4xx and 5xx carries an ApiError body
                return _error(exc.status, "bad_request" if exc.status < 500 else "unavailable",
                              exc.reason)
            raise
        except Exception:
            log.exception("tenant API: %s %s failed", request.method, request.path)
            return _error(500, "unavailable", "internal error")
        etag = response.headers.get("ETag")
        if etag and response.status == 200 and _etag_matches(
                request.headers.get("If-None-Match"), etag):
            return web.Response(status=304, headers={"ETag": etag,
                                                     "Cache-Control": response.headers[
                                                         "Cache-Control"]})
        return response

    # -- handlers -------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return _json(Health())

    async def recipient(self, request: web.Request) -> web.Response:
        local, domain = lookup_key(request.match_info["address"])
        found = await self.directory.lookup_recipient(local, domain)
        if isinstance(found, Unknown):
            return _json(found, 404, self.negative_max_age)
        return _json(found, 200, self.positive_max_age)

    async def tenant(self, request: web.Request) -> web.Response:
        found = await self.directory.tenant(request.match_info["tenant_id"])
        if found is None:
            return _error(404, "not_found", "no such tenant")
        return _json(found, 200, self.policy_max_age)

    async def tenant_limits(self, request: web.Request) -> web.Response:
        tenant_id = request.match_info["tenant_id"]
        if await self.directory.tenant(tenant_id) is None:
            return _error(404, "not_found", "no such tenant")
        return _json(await self.directory.tenant_limits(tenant_id), 200, self.policy_max_age)

    def _domain(self, request: web.Request) -> str:
        try:
            return normalise_domain(request.match_info["domain"])
        except UnicodeError:
            raise BadRequest("not a valid domain") from None

    async def domain(self, request: web.Request) -> web.Response:
        found = await self.directory.domain(self._domain(request))
        if found is None:
            return _error(404, "not_found", "domain not hosted")
        return _json(found, 200, self.policy_max_age)

    async def dkim(self, request: web.Request) -> web.Response:
        domain = self._domain(request)
        if await self.directory.domain(domain) is None:
            return _error(404, "not_found", "domain not hosted")
        return _json(await self.directory.dkim_keys(domain), 200, self.policy_max_age)

    async def _body(self, request: web.Request, model: type[Any]) -> Any:
        try:
            return msgspec.json.decode(await request.read(), type=model)
        except msgspec.DecodeError as exc:
            raise BadRequest(f"body does not match {model.__name__}: {exc}") from None

    async def auth(self, request: web.Request) -> web.Response:
        body: AuthRequest = await self._body(request, AuthRequest)
        account = await self.directory.authenticate(body.username, body.password,
                                                    mechanism=body.mechanism,
                                                    client_ip=body.client_ip)
        if account is None:
            return _error(401, "invalid_credentials")
        return _json(account)

    async def sender(self, request: web.Request) -> web.Response:
        username = request.match_info["username"]
        if self.directory.account(username) is None:
            return _error(404, "not_found", "no such account")
        allowed = await self.directory.sender_allowed(username, request.match_info["sender"])
        return _json(SenderPermission(allowed=allowed), 200, self.positive_max_age)

    async def account_limits(self, request: web.Request) -> web.Response:
        username = request.match_info["username"]
        if self.directory.account(username) is None:
            return _error(404, "not_found", "no such account")
        return _json(await self.directory.account_limits(username), 200, self.policy_max_age)

    async def events(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            event = msgspec.json.decode(raw, type=Event)
        except msgspec.DecodeError as exc:
            # The contract: a type this server does not know is accepted and ignored, so
            # the gateway can add types. Anything else wrong with the body is still a 400.
            unknown = _unknown_event_type(raw)
            if unknown is None:
                raise BadRequest(f"body does not match Event: {exc}") from None
            log.info("tenant event of unknown type %r ignored", unknown)
        else:
            await self.directory.report(event)
        return web.json_response({"accepted": True}, status=202)


async def serve(data: Path, host: str, port: int, token: str) -> None:
    """Run the reference server until cancelled (the CLI's `tenant-api`)."""
    server = ReferenceServer(data, token)
    await server.start(host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
