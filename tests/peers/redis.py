"""A private Redis server (and optionally a Sentinel) for integration tests.

Theory of operation
-------------------
:class:`RedisServer` runs its own ``redis-server`` as our child, never the system's::

    redis-server --port N --bind 127.0.0.1 --save '' --appendonly no --dir <workdir>
                 --daemonize no --logfile <workdir>/redis.log [--cluster-enabled yes ...]

Nothing is persisted (no RDB snapshots, no AOF), so a restart starts empty, as after a
real crash of a cache-only Redis. Everything the instance owns lives in one temporary
directory (``redis.log``, ``redis.out`` for what it prints before logging is up,
``nodes.conf`` in cluster mode, ``sentinel.conf`` for a sentinel).

:meth:`RedisServer.start` returns once the server answers ``PING`` with ``PONG`` (about
10 ms); in cluster mode it then assigns all 16384 slots to this one node (``CLUSTER
ADDSLOTSRANGE``; the cluster bus gets a free port of its own, ``--cluster-port``) and
waits for ``cluster_state:ok`` (about 2 s: Redis holds a new master back that long): a
one-node cluster still refuses multi-key commands across slots (``CROSSSLOT``), which is
what a client's hash tags must get right. A port taken by someone else between choosing
and binding it makes Redis exit with "Address already in use"; start then retries on a
new port (only when the port was chosen automatically).

Failure modes for outage tests:

* :meth:`kill` - SIGKILL, reaped at once: connections are reset, new ones refused (a
  crash). :meth:`start` again brings it back on the same port, empty.
* :meth:`stop` - SIGTERM (a clean shutdown; SIGKILL after a grace period).
* :meth:`freeze` / :meth:`thaw` - SIGSTOP / SIGCONT: the port stays bound and accepts
  connections (the kernel completes the handshake) but nothing is answered, so clients
  time out (a hung server).

Processes are stopped by the PID we started (``Popen``), never by name. An ``atexit``
hook stops instances that a dying test run left running. :meth:`close` also removes the
work directory when this object created it. :meth:`command` speaks RESP over a fresh
socket for setup and inspection (``server.command("TTL", "key")``), so the helper needs
no client library.

:class:`RedisSentinel` is the same for a Sentinel (``redis-server sentinel.conf
--sentinel``) that monitors one :class:`RedisServer` as ``service`` (quorum 1).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from .ports import free_port
from .process import terminate

__all__ = [
    "RedisError",
    "RedisNotInstalled",
    "RedisReplyError",
    "RedisSentinel",
    "RedisServer",
]

HOST = "127.0.0.1"
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/bin", "/usr/bin", "/usr/local/sbin", "/usr/sbin"]
)
_INSTALL_HINT = "install it with `make peers` (scripts/install-debian-peers.sh)"
_ALL_SLOTS = 16384

Reply = int | str | bytes | None | list[Any]


class RedisError(RuntimeError):
    """The private Redis instance could not be started, stopped or spoken to."""


class RedisNotInstalled(RedisError):
    """redis-server is not installed on this machine."""


class RedisReplyError(RedisError):
    """Redis answered a :meth:`RedisServer.command` with an error reply."""


class _PortInUse(RedisError):
    """The port was taken between choosing it and Redis binding it."""


@functools.cache
def _redis_server() -> str:
    path = shutil.which("redis-server", path=_SEARCH_PATH)
    if path is None:
        raise RedisNotInstalled(f"redis-server not found (redis-server): {_INSTALL_HINT}")
    return path


# -- RESP -----------------------------------------------------------------------------


def _encode(args: tuple[object, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(reader: IO[bytes]) -> Reply:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise OSError(f"connection closed in a reply ({line!r})")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RedisReplyError(body.decode(errors="replace"))
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data = reader.read(size + 2)
        if len(data) != size + 2:
            raise OSError("connection closed in a bulk string")
        return data[:-2]
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise OSError(f"not a RESP2 reply: {line!r}")


def resp_command(host: str, port: int, *args: object, timeout: float = 2.0) -> Reply:
    """Send one command on a new connection and return its reply (bulk strings as bytes)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(_encode(args))
        reader = sock.makefile("rb")
        try:
            return _read_reply(reader)
        finally:
            reader.close()


# -- processes ------------------------------------------------------------------------

_running: weakref.WeakSet[_RedisProcess] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:  # a test run that dies between start and teardown
    for instance in list(_running):
        with contextlib.suppress(Exception):
            instance.stop(grace=0.5)


class _RedisProcess:
    """One redis-server process (server or sentinel) on 127.0.0.1:port."""

    _prefix = "mailedge-redis-"

    def __init__(self, *, port: int | None = None, workdir: Path | None = None,
                 startup_timeout: float = 10.0) -> None:
        self._auto_port = port is None
        self._port = port if port is not None else free_port(HOST)
        self._owns_workdir = workdir is None
        self._workdir = Path(workdir or tempfile.mkdtemp(prefix=self._prefix)).resolve()
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._frozen = False
        self.starts = 0
        """How many times :meth:`start` launched the process."""

    # ----------------------------------------------------------------- properties

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def log_path(self) -> Path:
        return self._workdir / "redis.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """What the server logged so far (for assertion messages)."""
        parts = []
        for path in (self._workdir / "redis.out", self.log_path):
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def command(self, *args: object, timeout: float = 2.0) -> Reply:
        """One command on a fresh connection; bulk replies as bytes, errors raised."""
        return resp_command(HOST, self._port, *args, timeout=timeout)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start (or start again, on the same port) and return once PING answers."""
        if self.running:
            raise RedisError(f"{self!r} is already running")
        binary = _redis_server()
        self._workdir.mkdir(parents=True, exist_ok=True)
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            try:
                self._launch(binary)
            except _PortInUse:
                if attempt == attempts - 1:
                    raise
                self._port = free_port(HOST)
            else:
                return

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM (SIGKILL after ``grace`` seconds) and reap; nothing if not running."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None and self._frozen:
                proc.send_signal(signal.SIGCONT)
            terminate(proc, grace)
        finally:
            self._proc = None
            self._frozen = False
            _running.discard(self)

    def kill(self) -> None:
        """SIGKILL and reap: a crash. Clients see reset and refused connections."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
        finally:
            self._proc = None
            self._frozen = False
            _running.discard(self)

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but nothing is answered."""
        if self._proc is None:
            raise RedisError("not running")
        self._proc.send_signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """SIGCONT: undo :meth:`freeze`; what arrived meanwhile is answered late."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)
        self._frozen = False

    def close(self) -> None:
        """Stop and remove the work directory (if this object created it)."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self._proc is not None else "stopped"
        return f"<{type(self).__name__} {HOST}:{self._port} {state}>"

    # ----------------------------------------------------------------- internals

    def _argv(self, binary: str) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """Called after PING answered; True when the instance is fully usable."""
        return True

    def _launch(self, binary: str) -> None:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self._workdir / "redis.out", "ab") as out:
            proc = subprocess.Popen(
                self._argv(binary), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, cwd=self._workdir, start_new_session=True,
            )
        self._proc = proc
        self.starts += 1
        _running.add(self)
        deadline = time.monotonic() + self._startup_timeout
        last = "no answer yet"
        while True:
            if proc.poll() is not None:
                text = self._log_since(log_offset)
                self.stop()
                message = (f"redis-server on {HOST}:{self._port} exited with status "
                           f"{proc.returncode}:\n{text}")
                if self._auto_port and "Address already in use" in text:
                    raise _PortInUse(message)
                raise RedisError(message)
            try:
                if self.command("PING", timeout=0.5) == "PONG" and self._ready():
                    return
                last = "not ready"
            except (OSError, RedisReplyError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                self.stop()
                raise RedisError(f"redis-server on {HOST}:{self._port} not ready in "
                                 f"{self._startup_timeout}s ({last}):\n"
                                 f"{self._log_since(log_offset)}")
            time.sleep(0.005)

    def _log_since(self, offset: int) -> str:
        text = ""
        with contextlib.suppress(FileNotFoundError):
            text += (self._workdir / "redis.out").read_text(errors="replace")
        with contextlib.suppress(FileNotFoundError), open(self.log_path, "rb") as fh:
            fh.seek(offset)
            text += fh.read().decode(errors="replace")
        return text


class RedisServer(_RedisProcess):
    """A private redis-server on 127.0.0.1 with no persistence.

    ``cluster=True`` starts it as a one-node Redis Cluster owning every slot (use
    :attr:`cluster_url`). ``extra_args`` are appended to the command line
    (``["--maxmemory", "10mb"]``).
    """

    def __init__(self, *, port: int | None = None, cluster: bool = False,
                 extra_args: tuple[str, ...] | list[str] = (), workdir: Path | None = None,
                 startup_timeout: float = 10.0) -> None:
        super().__init__(port=port, workdir=workdir, startup_timeout=startup_timeout)
        self.cluster = cluster
        self._bus_port: int | None = None
        self._extra_args = list(extra_args)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{HOST}:{self._port}/0"

    @property
    def cluster_url(self) -> str:
        """``redis+cluster://127.0.0.1:PORT`` (cluster mode only)."""
        if not self.cluster:
            raise RedisError("not started in cluster mode")
        return f"redis+cluster://{HOST}:{self._port}"

    def flushall(self) -> None:
        self.command("FLUSHALL")

    def scan_keys(self, pattern: str = "*") -> list[str]:
        """Every key matching ``pattern`` (SCAN), decoded."""
        found: list[str] = []
        cursor: Reply = b"0"
        while True:
            reply = self.command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            assert isinstance(reply, list)
            cursor, batch = reply
            found.extend(k.decode() for k in batch)
            if cursor == b"0":
                return sorted(found)

    def _argv(self, binary: str) -> list[str]:
        argv = [
            binary, "--port", str(self._port), "--bind", HOST, "--save", "",
            "--appendonly", "no", "--dir", str(self._workdir), "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]
        if self.cluster:
            # The bus port is chosen too: the default (port + 10000) may be taken or
            # above 65535, which makes Redis refuse to start.
            if self._bus_port is None or self._auto_port:
                self._bus_port = free_port(HOST)
            argv += ["--cluster-enabled", "yes", "--cluster-port", str(self._bus_port),
                     "--cluster-config-file", str(self._workdir / "nodes.conf")]
        return argv + self._extra_args

    def _ready(self) -> bool:
        if not self.cluster:
            return True
        info = self.command("CLUSTER", "INFO")
        assert isinstance(info, bytes)
        if b"cluster_state:ok" in info:
            return True
        if b"cluster_slots_assigned:0\r" in info:
            self.command("CLUSTER", "ADDSLOTSRANGE", 0, _ALL_SLOTS - 1)
        return False


class RedisSentinel(_RedisProcess):
    """A private Redis Sentinel monitoring ``master`` as ``service`` (quorum 1)."""

    _prefix = "mailedge-sentinel-"

    def __init__(self, master: RedisServer, *, service: str = "mymaster",
                 port: int | None = None, workdir: Path | None = None,
                 startup_timeout: float = 10.0) -> None:
        super().__init__(port=port, workdir=workdir, startup_timeout=startup_timeout)
        self.master = master
        self.service = service

    def url(self, *, db: int = 0) -> str:
        """``redis+sentinel://127.0.0.1:PORT/service/db``."""
        return f"redis+sentinel://{HOST}:{self._port}/{self.service}/{db}"

    def _argv(self, binary: str) -> list[str]:
        conf = self._workdir / "sentinel.conf"
        if not conf.exists() or self.starts == 0:
            conf.write_text(
                f"port {self._port}\nbind {HOST}\ndir {self._workdir}\n"
                f"logfile {self.log_path}\ndaemonize no\n"
                f"sentinel monitor {self.service} {self.master.host} {self.master.port} 1\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
            )
        return [binary, str(conf), "--sentinel"]

    def _ready(self) -> bool:
        reply = self.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return isinstance(reply, list) and len(reply) == 2
