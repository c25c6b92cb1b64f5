"""RedisStore: the cluster-wide StateStore, over redis-py's asyncio client.

Theory of operation
-------------------
Every node of the cluster talks to the same Redis, so rate limits, greylisting,
reputation and the rest count once for the whole cluster. Each :class:`RedisStore`
method is one round trip and atomic on the server: a single command (``GET``, ``SET PX
[NX]``, ``DEL``) or one Lua script run with ``EVALSHA``. The scripts' SHA1 digests are
computed locally at import; a script is sent in full (``EVAL``, which also caches it on
the server) only when the server answers ``NOSCRIPT`` - the first use after a server
start, restart or failover - so a check costs one ``EVALSHA`` in the steady state.

Keys. A caller key ``k`` becomes ``<namespace><kind>:{k}``, one kind per data type, as
in :mod:`gateway.state_memory` (which documents the layout and mirrors it)::

    mailedge:c:{rl:ip:192.0.2.1}    counter, string (INCRBY)
    mailedge:w:{rl:ip:192.0.2.1}    sliding window, hash {w: window ms, b: bucket index,
                                    c: current bucket count, p: previous bucket count}
    mailedge:s:{grey:seen}          expiring set, sorted set member -> expiry (ms, server)
    mailedge:v:{autoreply:x}        value, string (SET PX)

The braces are a Redis Cluster hash tag: the four kinds of one caller key map to one hash
slot (a caller key that is empty or contains a brace gets a digest of itself as its tag
instead, ``mailedge:c:{~1f3a...}odd{key}``), so ``delete`` (one ``DEL`` of four keys) is
legal on a cluster and each script only touches keys of one slot. No key is ever written
without a TTL: counters get theirs when created (``PEXPIRE`` when ``PTTL`` shows none, in
the same script), windows two window lengths after each hit, sets as long as their
longest-living member, values with ``SET PX``. A Redis with ``maxmemory-policy
volatile-lru`` (or ``allkeys-lru``) can therefore evict any of them under memory pressure.

Time. Windows and set members use the Redis server's clock (``TIME`` inside the scripts,
allowed since Redis 5 replicates scripts by their effects), so nodes whose clocks
disagree still agree on buckets and expiry. Counters and values rely on Redis's own key
expiry. Redis 5 or later is required (7.0 is what Debian 12 ships and what is tested).

The sliding window is the two-bucket approximation of
:func:`gateway.state_memory.weighted_count`, in the same integer milliseconds, so a
:class:`~gateway.state_memory.MemoryStore` and a RedisStore give the same answers for
the same history.

Timeouts and errors. ``timeout`` (0.2 s by default) bounds every operation end to end -
waiting for a pooled connection, connecting, the command and its reply - with
``asyncio.timeout`` around the call plus socket timeouts of the same length. redis-py's
retries are cut down to one immediate retry on a *connection* error, never on a timeout:
a timed-out ``INCRBY`` may have been applied, and retrying it would count twice, while
a connection error is what a pooled connection that died with an earlier server
process gives on its first use (the server never saw the command); the retry runs on a
fresh connection within the same overall timeout. :class:`gateway.state.FallbackStore`
decides what an error means. Every failure - timeout, refused or reset connection, an
error reply such as ``OOM``, ``READONLY``, ``LOADING``, ``MASTERDOWN`` or
``CLUSTERDOWN`` - raises :class:`StateUnavailable` with the redis-py exception as its
cause; invalid arguments (a non-positive ttl) raise ``ValueError`` before anything is
sent. ``degraded`` is always False: a RedisStore never substitutes local state, it raises.

URLs (:func:`RedisStore.from_url` dispatches on the scheme):

* ``redis://[[user]:password@]host[:port][/db][?option=value...]`` - plain TCP;
  ``rediss://`` the same over TLS (``?ssl_ca_certs=/path``, ``?ssl_cert_reqs=none``...),
  ``unix:///run/redis/redis.sock[?db=N]`` a UNIX socket. A blocking connection pool of
  ``max_connections`` connections is shared by all operations; a caller that finds it
  exhausted waits at most ``timeout``.
* ``redis+sentinel://[[user]:password@]host[:port][,host2[:port2]...]/service[/db]
  [?sentinel_username=..&sentinel_password=..]`` - Redis Sentinel (default port 26379):
  the master of ``service`` is asked from the sentinels and re-asked after a failover;
  user and password in front are the data nodes' credentials, the ``sentinel_*`` options
  the sentinels' own. ``rediss+sentinel://`` connects to the data nodes over TLS.
* ``redis+cluster://[[user]:password@]host[:port][,host2[:port2]...][?...]`` - Redis
  Cluster (the hosts are seeds; the slot map is discovered and followed through
  ``MOVED``/``ASK``); ``rediss+cluster://`` over TLS. ``max_connections`` applies per
  node there.

Cost (redis-py 8.1 with hiredis, loopback, one operation at a time): 50-90 µs client
CPU per operation, EVALSHA or plain command alike (45-65 µs under uvloop), about 10 000
operations per second per event loop; the server spends 10-20 µs per script. The
in-memory store takes about 1 µs. tests/integration/test_state_redis.py keeps a loose
bound on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import (
    ConnectionError,
    NoScriptError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from .state_memory import check_ttl, check_window, to_ms

__all__ = ["SCRIPTS", "RedisStore", "StateUnavailable", "redis_key"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Client = aioredis.Redis | RedisCluster

#: Errors that mean "the shared store did not answer properly".
_FAILURES: Final = (RedisError, RedisClusterException, OSError, TimeoutError)


class StateUnavailable(Exception):
    """The shared store failed or timed out; ``__cause__`` holds the underlying error.

    ``timeout`` tells a timeout (no answer in time) from an error answer or a refused
    or reset connection.
    """

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


def _unavailable(what: str, exc: BaseException) -> StateUnavailable:
    return StateUnavailable(f"{what}: {type(exc).__name__}: {exc}".rstrip(": "),
                            timeout=isinstance(exc, (TimeoutError, RedisTimeoutError)))


# -- Lua ------------------------------------------------------------------------------
#
# Every script computes the server time in ms as NOW, and is given one key. Numbers
# stay below 2^53, so Lua's doubles are exact; results are integers.

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] counter; ARGV: amount, ttl ms.  -> new value
_INCR = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v
"""

# Window state -> cur, prev for bucket n (the same as MemoryStore._buckets).
_WINDOW_READ = """
local w = tonumber(ARGV[1])
local n = math.floor(now / w)
local e = now - n * w
local s = redis.call('HMGET', KEYS[1], 'w', 'b', 'c', 'p')
local cur, prev = 0, 0
if tonumber(s[1]) == w then
  local b = tonumber(s[2])
  if b == n then
    cur = tonumber(s[3]); prev = tonumber(s[4])
  elseif b == n - 1 then
    prev = tonumber(s[3])
  end
end
"""

# KEYS[1] window hash; ARGV: window ms, amount.  -> weighted count
_HIT = _NOW + _WINDOW_READ + """
cur = cur + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'w', w, 'b', n, 'c', cur, 'p', prev)
redis.call('PEXPIRE', KEYS[1], 2 * w)
return cur + prev - math.floor(prev * e / w)
"""

# KEYS[1] window hash; ARGV: window ms.  -> weighted count
_WINDOW_COUNT = _NOW + _WINDOW_READ + """
return cur + prev - math.floor(prev * e / w)
"""

# KEYS[1] zset; ARGV: member, ttl ms.  Prunes expired members; the key lives as long as
# its longest-living member.
_SET_ADD = _NOW + """
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

# KEYS[1] zset; ARGV: member.  -> 1 if present and not expired
_SET_CONTAINS = _NOW + """
local exp = redis.call('ZSCORE', KEYS[1], ARGV[1])
if exp and tonumber(exp) > now then return 1 end
return 0
"""


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    source: str
    sha: str


def _script(name: str, source: str) -> _Script:
    return _Script(name, source, hashlib.sha1(source.encode()).hexdigest())


#: The Lua scripts by name (their ``sha`` is what EVALSHA sends).
SCRIPTS: Final = {s.name: s for s in (
    _script("incr", _INCR),
    _script("hit", _HIT),
    _script("window_count", _WINDOW_COUNT),
    _script("set_add", _SET_ADD),
    _script("set_contains", _SET_CONTAINS),
)}
_S_INCR, _S_HIT, _S_WINDOW = SCRIPTS["incr"], SCRIPTS["hit"], SCRIPTS["window_count"]
_S_SET_ADD, _S_SET_CONTAINS = SCRIPTS["set_add"], SCRIPTS["set_contains"]


def redis_key(namespace: str, kind: str, key: str) -> str:
    """The Redis key of caller key ``key`` of ``kind`` (c, w, s, v).

    ``ns:kind:{key}``; a key that is empty or has a brace of its own would not make a
    usable hash tag, so it gets ``ns:kind:{~<digest>}key`` (the digest only picks the
    slot; the key itself still follows, so distinct keys stay distinct).
    """
    if key and "{" not in key and "}" not in key:
        return f"{namespace}{kind}:{{{key}}}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return f"{namespace}{kind}:{{~{digest}}}{key}"


# -- URLs -----------------------------------------------------------------------------


def _hosts(netloc: str, default_port: int) -> tuple[str | None, str | None,
                                                     list[tuple[str, int]]]:
    """(username, password, [(host, port)...]) of ``user:pw@h1:p1,h2:p2``."""
    username = password = None
    auth, sep, hostlist = netloc.rpartition("@")
    if sep:
        user, colon, pw = auth.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port = rest.lstrip(":")
        else:
            host, _, port = item.partition(":")
        hosts.append((unquote(host), int(port) if port else default_port))
    if not hosts:
        raise ValueError("a sentinel or cluster URL needs at least one host")
    return username, password, hosts


def _retry() -> Retry:
    """One immediate retry, on connection errors only (see the module docstring)."""
    return Retry(NoBackoff(), 1, supported_errors=(ConnectionError,))


def _redact(url: str) -> str:
    """``url`` with the password (if any) replaced by ``***``."""
    parts = urlsplit(url)
    auth, sep, hosts = parts.netloc.rpartition("@")
    if not sep or ":" not in auth:
        return url
    user = auth.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hosts}").geturl()


def _query(query: str) -> dict[str, str]:
    return {name: values[-1] for name, values in parse_qs(query).items()}


# -- the store ------------------------------------------------------------------------


class RedisStore:
    """:class:`~filters.state.StateStore` in Redis (or Sentinel-managed Redis, or Cluster).

    ``url`` as described in the module docstring. ``namespace`` prefixes every key (no
    braces in it). ``timeout`` bounds each operation; ``max_connections`` is the pool size.
    Any other keyword goes to redis-py's connection (``ssl_ca_certs``, ``client_name``...).
    """

    def __init__(self, url: str, *, namespace: str = "mailedge:", timeout: float = 0.2,
                 max_connections: int = 64, **redis_options: Any) -> None:
        if "{" in namespace or "}" in namespace:
            raise ValueError("the namespace must not contain braces (Cluster hash tags)")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError("timeout must be positive")
        self.url = _redact(url)
        """The URL with any password replaced by ``***`` (for logs)."""
        self.namespace = namespace
        self.timeout = timeout
        self._sentinel: Sentinel | None = None
        self.client: Client = self._connect(url, max_connections, redis_options)
        self.noscript_loads = 0
        """Scripts sent in full after a NOSCRIPT answer (first use, server restart)."""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisStore:
        """The same as the constructor; reads better at the composition root."""
        return cls(url, **options)

    def _connect(self, url: str, max_connections: int, options: dict[str, Any]) -> Client:
        common: dict[str, Any] = {
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
            "retry": _retry(),
            "decode_responses": True,
            "client_name": "mailedge",
            **options,
        }
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in ("redis", "rediss", "unix"):
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=self.timeout, **common)
            return aioredis.Redis.from_pool(pool)
        if scheme in ("redis+sentinel", "rediss+sentinel"):
            username, password, hosts = _hosts(parts.netloc, 26379)
            path = [unquote(p) for p in parts.path.split("/") if p]
            if not path:
                raise ValueError("a sentinel URL names the service: "
                                 "redis+sentinel://host:26379/mymaster")
            query = _query(parts.query)
            sentinel_kwargs = {
                "socket_timeout": self.timeout,
                "socket_connect_timeout": self.timeout,
                "retry": _retry(),
                "username": query.pop("sentinel_username", None),
                "password": query.pop("sentinel_password", None),
            }
            db = int(query.pop("db", path[1] if len(path) > 1 else 0))
            if query:
                raise ValueError(f"unknown sentinel URL options: {sorted(query)}")
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                hosts, sentinel_kwargs=sentinel_kwargs)
            client: aioredis.Redis = self._sentinel.master_for(
                path[0], username=username, password=password, db=db,
                ssl=scheme.startswith("rediss"), max_connections=max_connections, **common)
            return client
        if scheme in ("redis+cluster", "rediss+cluster"):
            username, password, hosts = _hosts(parts.netloc, 6379)
            # Query options typed as redis-py types them for redis:// URLs.
            query_options = dict(parse_url(f"redis://seed/?{parts.query}"))
            query_options.pop("host", None)
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in hosts],
                username=username, password=password, ssl=scheme.startswith("rediss"),
                max_connections=max_connections,
                **{**common, **query_options})
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}: use redis://, "
                         f"rediss://, unix://, redis+sentinel:// or redis+cluster://")

    # ------------------------------------------------------------------ StateStore

    async def incr(self, key: str, amount: int = 1, *, ttl: float) -> int:
        ms = to_ms(check_ttl(ttl))
        return int(await self._eval(_S_INCR, self._key("c", key), int(amount), ms))

    async def get_counter(self, key: str) -> int:
        value = await self._call(self.client.get, self._key("c", key))
        return 0 if value is None else int(value)

    async def hit(self, key: str, *, window: float, amount: int = 1) -> int:
        ms = to_ms(check_window(window))
        return int(await self._eval(_S_HIT, self._key("w", key), ms, int(amount)))

    async def window_count(self, key: str, *, window: float) -> int:
        ms = to_ms(check_window(window))
        return int(await self._eval(_S_WINDOW, self._key("w", key), ms))

    async def set_add(self, key: str, member: str, *, ttl: float) -> None:
        ms = to_ms(check_ttl(ttl))
        await self._eval(_S_SET_ADD, self._key("s", key), member, ms)

    async def set_contains(self, key: str, member: str) -> bool:
        return bool(await self._eval(_S_SET_CONTAINS, self._key("s", key), member))

    async def put(self, key: str, value: str, *, ttl: float, only_if_absent: bool = False
                  ) -> bool:
        ms = to_ms(check_ttl(ttl))
        result = await self._call(self.client.set, self._key("v", key), value, px=ms,
                                  nx=only_if_absent)
        return bool(result)

    async def fetch(self, key: str) -> str | None:
        value = await self._call(self.client.get, self._key("v", key))
        return None if value is None else str(value)

    async def delete(self, key: str) -> None:
        await self._call(self.client.delete,
                         *(self._key(kind, key) for kind in ("c", "w", "s", "v")))

    @property
    def degraded(self) -> bool:
        """Always False: a RedisStore raises StateUnavailable instead of substituting."""
        return False

    async def aclose(self) -> None:
        """Close the pool's connections (and the sentinels' ones)."""
        try:
            await self.client.aclose()
        finally:
            if self._sentinel is not None:
                await self._sentinel.aclose()

    # ------------------------------------------------------------------ extras

    async def ping(self) -> bool:
        """One PING within the timeout: True, or StateUnavailable."""
        return bool(await self._call(self.client.ping))

    def redis_key(self, kind: str, key: str) -> str:
        """The Redis key that holds ``key`` of ``kind`` (c, w, s, v) - for operators."""
        return self._key(kind, key)

    # ------------------------------------------------------------------ internals

    def _key(self, kind: str, key: str) -> str:
        if key and "{" not in key and "}" not in key:  # = redis_key(), inlined: hot path
            return f"{self.namespace}{kind}:{{{key}}}"
        return redis_key(self.namespace, kind, key)

    async def _call(self, method: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
                    ) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await method(*args, **kwargs)
        except _FAILURES as exc:
            raise _unavailable("redis", exc) from exc

    async def _eval(self, script: _Script, key: str, *args: str | int) -> Any:
        client = self.client
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    return await client.evalsha(script.sha, 1, key, *args)
                except NoScriptError:
                    self.noscript_loads += 1
                    return await client.eval(script.source, 1, key, *args)
        except _FAILURES as exc:
            raise _unavailable(f"redis {script.name}", exc) from exc

    def __repr__(self) -> str:
        return f"<RedisStore {self.url!r} namespace={self.namespace!r}>"
