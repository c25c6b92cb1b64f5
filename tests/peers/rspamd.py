"""A private Rspamd for integration tests, with its own instant-NXDOMAIN DNS responder.

Theory of operation
-------------------
:class:`Rspamd` runs its own Rspamd 3.4 (``rspamd -f``, the main process in the
foreground as our child), never the system's. It reads Debian's stock configuration
(``/etc/rspamd/rspamd.conf`` and everything it includes) read-only; everything this
instance changes is an override in its own work directory, passed in with ``--var``::

    <workdir>/                   mode 0711: Rspamd's workers (user _rspamd) pass through
        local/local.d/           $LOCAL_CONFDIR: merged into the stock sections
            options.inc            dns { nameserver = [our responder] ... }, hs_cache_dir
            http_headers.conf      enabled = true (SPF/DKIM/DMARC results from request
                                   headers, as mailedge sends them: filters/rspamd.py)
        local/override.d/        replace the stock sections
            worker-normal.inc      bind_socket = "127.0.0.1:<port>"; count = <workers>
            worker-controller.inc  bind_socket = "127.0.0.1:<port>"; secure_ip = 127.0.0.1
            worker-proxy.inc       count = 0 (no milter proxy)
            fuzzy_check.conf       enabled = false (its servers are on the internet)
            logging.inc            a file in log/, level info
        db/   run/   log/        $DBDIR, $RUNDIR, $LOGDIR, owned by _rspamd when we are root
        rspamd.out               the main process's stdout/stderr

Workers: one ``normal`` worker (``count``, the scanner: ``/checkv2``, ``/ping``) and one
``controller`` (web UI and stats API, reachable without password from 127.0.0.1), each on
a free port of 127.0.0.1. The milter proxy and the fuzzy storage are off. There is no
Redis: greylist, ratelimit, replies, history and Bayes disable themselves (Bayes logs
"error adding cache redis"; that is expected).

DNS: Rspamd sends many queries per message (RBLs, SPF, DMARC, ASN, HELO and From host
checks); with an unreachable resolver each message waits for the timeouts (0.76 s measured),
so tests point it at :class:`NxdomainResponder`, a tiny UDP responder answering every query
NXDOMAIN at once. It runs as a child process of its own (``python -c``, no imports beyond
the standard library) rather than a thread in the test process, so its CPU time never shows
up in client-side CPU measurements and it never competes with the tests for the GIL. Its
socket is bound by us (port chosen by the kernel) and handed to the child, so there is no
race for the port. ``nameservers=[(host, port)]`` points Rspamd elsewhere instead, e.g. at
an :class:`~tests.peers.dns.AuthoritativeDNS` with zones a test needs.

Start-up time is dominated by compiling the Hyperscan databases of its regexps: 7 s with an
empty cache, 0.6-0.8 s with a warm one. The compiled databases go to ``cache_dir`` (Rspamd's
``hs_cache_dir``), by default ``var/rspamd-hs-cache/`` in the repository (gitignored), shared
by every instance and every test run; the rest of $DBDIR stays private to the instance
(control socket, history, rrd). Rspamd keys the files by a hash of the regexps and the
platform, writes them atomically and recompiles what it cannot load, so a stale or foreign
cache costs time, never correctness. ``cache_dir=None`` keeps the databases in the private
$DBDIR (a cold start every time).

Privileges: run as root, Rspamd's main process stays root and its workers drop to
``_rspamd`` (``-u _rspamd -g _rspamd``), so db/, run/, log/ and the cache directory are
chowned to that user and the work directory is 0711; run as another user, Rspamd runs as
that user and nothing is chowned.

Lifecycle: :meth:`Rspamd.start` writes the overrides, starts the responder and Rspamd in a
new session, and returns once the normal and the controller worker answer ``/ping`` with
``pong``; a main process that exits, or a start that takes longer than
``startup_timeout``, ends the wait with the log in the exception. A port taken by someone
else between choosing and binding it ("Address already in use") makes start retry with new
ports. :meth:`Rspamd.stop` sends SIGTERM to the main process (after SIGCONT if frozen), which
stops its workers; any process of its session left after the grace period gets SIGKILL
(the session id is the PID we started, so nothing else is touched). :meth:`Rspamd.freeze`
SIGSTOPs the instance: connections are still accepted by the kernel but never answered (a
hung scanner). An ``atexit`` hook stops instances a dying test run left behind.
:meth:`Rspamd.close` also removes a work directory it created.

What Rspamd 3.4 (Debian 12) does, observed with this configuration
------------------------------------------------------------------
* ``/checkv2`` answers HTTP/1.1 with ``Connection: close`` whatever the request asks: the
  normal worker serves one request per connection (keep-alive is not possible).
* GTUBE (``XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X`` in a text
  part) settles the message before scoring: ``is_skipped: true``, ``action: reject``,
  ``score`` = the reject threshold (15), one symbol ``GTUBE`` scored 0, and
  ``messages.smtp_message: "Gtube pattern"``.
* Without a ``Hostname`` request header (the client's verified reverse DNS name) hfilter
  adds HFILTER_HOSTNAME_UNKNOWN (2.5) and once_received looks up the PTR itself
  (RDNS_NONE, 1.0, with this NXDOMAIN responder).
* With ``http_headers`` enabled, request headers ``SPF: {"result": "pass"}``,
  ``DKIM: {"results": [{"result": "pass", "domain": "d"}]}`` and ``DMARC: {"result":
  "pass"}`` replace Rspamd's own checks: R_SPF_ALLOW, R_DKIM_ALLOW (+ DKIM_TRACE) and
  DMARC_POLICY_ALLOW appear with the option "http header". With the module enabled
  Rspamd never runs those checks itself, even for a request without the headers (then
  no R_SPF_*/R_DKIM_*/DMARC_* symbol at all; docs/filters.md).
* Several ``Rcpt`` headers are several envelope recipients (logged as ``rcpts:``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import grp
import http.client
import inspect
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .ports import free_port
from .process import proc_stat, session_members, signal_session, stop_session

__all__ = [
    "DEFAULT_CACHE_DIR",
    "GTUBE",
    "NxdomainResponder",
    "Rspamd",
    "RspamdError",
    "RspamdNotInstalled",
    "nxdomain_reply",
]

HOST = "127.0.0.1"
STOCK_CONFIG = Path("/etc/rspamd/rspamd.conf")
REPO_ROOT = Path(__file__).resolve().parents[2]
#: Where compiled Hyperscan databases are kept between test runs (gitignored).
DEFAULT_CACHE_DIR = REPO_ROOT / "var" / "rspamd-hs-cache"
#: The GTUBE pattern Rspamd 3.4 always honours with action "reject" (the A/Y/Z variants
#: for other actions need ``enable_test_patterns``).
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
RSPAMD_USER = "_rspamd"

_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/bin", "/usr/bin", "/usr/local/sbin", "/usr/sbin"]
)
_INSTALL_HINT = "install it with `make peers` (scripts/install-debian-peers.sh)"
_PORT_IN_USE = ("already in use", "cannot bind", "cannot listen")


class RspamdError(RuntimeError):
    """The private Rspamd could not be configured, started or stopped."""


class RspamdNotInstalled(RspamdError):
    """Rspamd (or its stock configuration) is not installed on this machine."""


class _PortInUse(RspamdError):
    """A worker's port was taken between choosing it and Rspamd binding it."""


@dataclass(frozen=True)
class _Binaries:
    rspamd: str
    rspamadm: str


@functools.cache
def _binaries() -> _Binaries:
    found = {name: shutil.which(name, path=_SEARCH_PATH) for name in ("rspamd", "rspamadm")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise RspamdNotInstalled(f"{', '.join(missing)} not found (rspamd): {_INSTALL_HINT}")
    if not STOCK_CONFIG.is_file():
        raise RspamdNotInstalled(f"{STOCK_CONFIG} is missing: {_INSTALL_HINT}")
    return _Binaries(rspamd=str(found["rspamd"]), rspamadm=str(found["rspamadm"]))


# -- the instant-NXDOMAIN responder ---------------------------------------------------


def nxdomain_reply(query: bytes) -> bytes | None:
    """The reply to one DNS query over UDP: NXDOMAIN for every standard query.

    Pure and self-contained (its source is what the responder process runs): the reply
    echoes the ID, the RD flag and the question, and sets QR, RA and RCODE 3. Another
    opcode gets NOTIMP, a query whose question cannot be parsed FORMERR (header only), a
    response or a runt (under 12 octets) no reply. EDNS is not spoken: the OPT record of
    the query is not echoed, which RFC 6891 §7 allows.
    """
    if len(query) < 12 or query[2] & 0x80:
        return None
    opcode = (query[2] >> 3) & 0x0F
    rd = query[2] & 0x01
    header_flags = 0x80 | (opcode << 3) | rd  # QR, opcode, RD
    if opcode != 0:
        return query[:2] + bytes([header_flags, 0x80 | 4]) + bytes(8)  # NOTIMP
    qdcount = int.from_bytes(query[4:6], "big")
    end = 12
    while end < len(query) and query[end] != 0:
        if query[end] & 0xC0:  # no compression pointers in a question we sent ourselves
            end = len(query)
            break
        end += 1 + query[end]
    end += 5  # the root label, QTYPE, QCLASS
    if qdcount != 1 or end > len(query):
        return query[:2] + bytes([header_flags, 0x80 | 1]) + bytes(8)  # FORMERR
    return (query[:2] + bytes([header_flags, 0x80 | 3])  # RA, NXDOMAIN
            + b"\x00\x01\x00\x00\x00\x00\x00\x00" + query[12:end])


_RESPONDER_MAIN = """
import socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
while True:
    try:
        query, peer = sock.recvfrom(4096)
    except InterruptedError:
        continue
    reply = nxdomain_reply(query)
    if reply is not None:
        try:
            sock.sendto(reply, peer)
        except OSError:
            pass
"""


class NxdomainResponder:
    """A UDP DNS responder on 127.0.0.1 that answers every query NXDOMAIN at once.

    The socket is bound here (the kernel picks the port, so nothing can take it first)
    and inherited by a child ``python -c`` process that runs :func:`nxdomain_reply`; the
    child is in its own session and is stopped by :meth:`stop` (and at exit).
    """

    def __init__(self, host: str = HOST) -> None:
        self._host = host
        self._port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self._host, self._port

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> NxdomainResponder:
        if self.running:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((self._host, self._port))  # the same port again after a stop
        except OSError:
            sock.bind((self._host, 0))
        self._port = sock.getsockname()[1]
        code = inspect.getsource(nxdomain_reply) + textwrap.dedent(_RESPONDER_MAIN)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", code, str(sock.fileno())],
                pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            sock.close()  # the child has its own copy
        _responders.add(self)
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        _responders.discard(self)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=5)

    def __repr__(self) -> str:
        return f"<NxdomainResponder {self._host}:{self._port} running={self.running}>"


# -- processes --------------------------------------------------------------------------


def _ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """Does ``GET /ping`` on host:port answer ``pong``?"""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/ping")
        response = conn.getresponse()
        return response.status == 200 and response.read().strip() == b"pong"
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _traversable_by_others(path: Path) -> bool:
    """Can an unprivileged user reach ``path`` (o+x on it and every ancestor)?"""
    for part in (path, *path.parents):
        with contextlib.suppress(FileNotFoundError):
            if not part.stat().st_mode & 0o001:
                return False
    return True


_running: set[Rspamd] = set()
_responders: set[NxdomainResponder] = set()


@atexit.register
def _stop_all_at_exit() -> None:  # a test run that dies between start and teardown
    for instance in list(_running):
        with contextlib.suppress(Exception):
            instance.stop()
    for responder in list(_responders):
        with contextlib.suppress(Exception):
            responder.stop()


class Rspamd:
    """One private Rspamd on 127.0.0.1: a normal worker (:attr:`url`) and a controller.

    ``workdir`` defaults to a new temporary directory, removed by :meth:`close`.
    ``nameservers`` (host, port) replaces the built-in :class:`NxdomainResponder`.
    ``local`` and ``override`` add files to ``local.d/`` and ``override.d/`` (name ->
    UCL text), e.g. ``{"actions.conf": "reject = 20;"}``; they are written after ours, so
    a test can replace any of them.
    ``unix_socket=True`` makes the normal worker listen on :attr:`socket_path` too
    (:attr:`unix_url`).
    ``port`` is the normal worker's port (default: a free one), for a caller that must
    know it before the start (a proxy upstream, a second ``bind_socket``); it is kept when
    a start retries after "Address already in use" (only the controller moves), so a
    taken port fails the start.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        cache_dir: Path | str | None = DEFAULT_CACHE_DIR,
        nameservers: Sequence[tuple[str, int]] | None = None,
        dns_timeout: float = 0.2,
        workers: int = 1,
        log_level: str = "info",
        local: Mapping[str, str] | None = None,
        override: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
        port: int | None = None,
        unix_socket: bool = False,
    ) -> None:
        self._owns_workdir = workdir is None
        base = Path(workdir) if workdir is not None else Path(
            tempfile.mkdtemp(prefix="mailedge-rspamd-"))
        self._workdir = base.resolve()
        self._cache_dir = Path(cache_dir).resolve() if cache_dir is not None else None
        self._nameservers = tuple(nameservers) if nameservers is not None else None
        self._dns_timeout = dns_timeout
        self._workers = workers
        self._unix_socket = unix_socket
        self._log_level = log_level
        self._local = dict(local or {})
        self._override = dict(override or {})
        self._startup_timeout = startup_timeout
        self._fixed_port = port is not None
        self._port = port if port is not None else free_port(HOST)
        self._controller_port = free_port(HOST)
        self._responder: NxdomainResponder | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_start = 0
        self._frozen = False
        self.startup_seconds: float | None = None  # of the last successful start

    # ----------------------------------------------------------------- properties

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        """The normal worker's port (``/checkv2``)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the normal worker, as ``RspamdClient`` takes it."""
        return f"http://{HOST}:{self._port}"

    @property
    def socket_path(self) -> Path:
        """The normal worker's UNIX socket (listening only with ``unix_socket=True``)."""
        return self.workdir / "run" / "normal.sock"

    @property
    def unix_url(self) -> str:
        """``unix:`` URL of the normal worker's UNIX socket, as ``RspamdClient`` takes it."""
        if not self._unix_socket:
            raise RspamdError("this Rspamd was started without unix_socket=True")
        return f"unix:{self.socket_path}"

    @property
    def controller_port(self) -> int:
        return self._controller_port

    @property
    def controller_url(self) -> str:
        return f"http://{HOST}:{self._controller_port}"

    @property
    def nameservers(self) -> tuple[tuple[str, int], ...]:
        """Where Rspamd sends its DNS queries."""
        if self._nameservers is not None:
            return self._nameservers
        return (self._responder.address,) if self._responder is not None else ()

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def cache_dir(self) -> Path:
        """Where the compiled Hyperscan databases are (the private $DBDIR without cache)."""
        return self._cache_dir if self._cache_dir is not None else self._workdir / "db"

    @property
    def log_path(self) -> Path:
        return self._workdir / "log" / "rspamd.log"

    @property
    def pid(self) -> int | None:
        """PID of the main process."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def processes(self) -> list[int]:
        """PIDs of the live processes of this instance (main, workers, hs_helper)."""
        if self._proc is None:
            return []
        return sorted(session_members(self._proc.pid, self._proc_start))

    def log_text(self) -> str:
        parts = []
        for path in (self._workdir / "rspamd.out", self.log_path):
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def count_log(self, needle: str) -> int:
        """Lines of the log containing ``needle`` (e.g. a Queue-Id: one per scan)."""
        return sum(needle in line for line in self.log_text().splitlines())

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> Rspamd:
        """Start Rspamd; return once both workers answer ``/ping``."""
        if self._proc is not None:
            raise RspamdError("this Rspamd instance is already running")
        binaries = _binaries()
        if self._nameservers is None:
            if self._responder is None:
                self._responder = NxdomainResponder()
            self._responder.start()
        for attempt in range(3):
            self._write_config()
            try:
                self._launch(binaries)
            except _PortInUse:
                if attempt == 2:
                    raise
                if not self._fixed_port:
                    self._port = free_port(HOST)
                self._controller_port = free_port(HOST)
            else:
                return self
        raise AssertionError("unreachable")

    def stop(self, grace: float = 5.0) -> None:
        """Stop Rspamd (and the responder); return once none of its processes is left.

        The ports are kept, so :meth:`start` brings the same server back."""
        try:
            self._stop_rspamd(grace)
        finally:
            if self._responder is not None:
                self._responder.stop()

    def freeze(self) -> None:
        """SIGSTOP every Rspamd process: connections are accepted by the kernel but never
        answered, as with a hung scanner. :meth:`thaw` undoes it."""
        if self._proc is None:
            raise RspamdError("not running")
        signal_session(self._proc.pid, self._proc_start, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        if self._proc is None:
            return
        signal_session(self._proc.pid, self._proc_start, signal.SIGCONT)
        self._frozen = False

    def configtest(self) -> str:
        """``rspamadm configtest`` on the generated configuration (its output)."""
        self._write_config()
        result = subprocess.run(
            [_binaries().rspamadm, *self._vars(), "configtest", "-c", str(STOCK_CONFIG)],
            capture_output=True, text=True, check=False, timeout=120,
        )
        if result.returncode != 0:
            raise RspamdError(f"rspamadm configtest failed:\n{result.stdout}{result.stderr}")
        return result.stdout + result.stderr

    def close(self) -> None:
        """Stop the server and remove its work directory (if this object made it)."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Rspamd:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self._proc is not None else "stopped"
        return f"<Rspamd {self.url} {state}>"

    # ----------------------------------------------------------------- internals

    def _vars(self) -> list[str]:
        w = self._workdir
        return [f"--var=LOCAL_CONFDIR={w / 'local'}", f"--var=DBDIR={w / 'db'}",
                f"--var=RUNDIR={w / 'run'}", f"--var=LOGDIR={w / 'log'}"]

    def _owner(self) -> tuple[int, int] | None:
        """(uid, gid) the workers run as when we are root; None otherwise."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(RSPAMD_USER).pw_uid, grp.getgrnam(RSPAMD_USER).gr_gid
        except KeyError:
            raise RspamdNotInstalled(f"user {RSPAMD_USER} does not exist: "
                                     f"{_INSTALL_HINT}") from None

    def _prepare_cache_dir(self, owner: tuple[int, int] | None) -> Path | None:
        if self._cache_dir is None:
            return None
        cache = self._cache_dir
        if owner is not None and not _traversable_by_others(cache.parent):
            # The workers could not reach it: a cache of our own in the system temp dir.
            cache = Path(tempfile.gettempdir()) / "mailedge-rspamd-hs-cache"
        cache.mkdir(mode=0o755, parents=True, exist_ok=True)
        if owner is not None:
            for path in (cache, *cache.iterdir()):
                with contextlib.suppress(FileNotFoundError):
                    if (path.stat().st_uid, path.stat().st_gid) != owner:
                        os.chown(path, *owner)
        return cache

    def _write_config(self) -> None:
        w = self._workdir
        owner = self._owner()
        w.mkdir(parents=True, exist_ok=True)
        w.chmod(0o711)
        for sub in ("local", "local/local.d", "local/override.d", "db", "run", "log"):
            (w / sub).mkdir(mode=0o755, exist_ok=True)
            if owner is not None and sub in ("db", "run", "log"):
                os.chown(w / sub, *owner)
        cache = self._prepare_cache_dir(owner)
        servers = ", ".join(f'"{host}:{port}"' for host, port in self.nameservers)
        options = (f"dns {{\n    nameserver = [{servers}];\n"
                   f"    timeout = {self._dns_timeout}s;\n    retransmits = 1;\n}}\n")
        if cache is not None:
            options += f'hs_cache_dir = "{cache}/";\n'
        local = {
            "options.inc": options,
            "http_headers.conf": "enabled = true;\n",
            **self._local,
        }
        override = {
            "worker-normal.inc": f'bind_socket = "{HOST}:{self._port}";\n'
                                 + (f'bind_socket = "{self.socket_path} mode=0666";\n'
                                    if self._unix_socket else "")
                                 + f"count = {self._workers};\n",
            "worker-controller.inc": f'bind_socket = "{HOST}:{self._controller_port}";\n'
                                     f'count = 1;\nsecure_ip = "{HOST}";\n',
            "worker-proxy.inc": "count = 0;\n",
            "fuzzy_check.conf": "enabled = false;\n",
            "logging.inc": f'type = "file";\nfilename = "{self.log_path}";\n'
                           f'level = "{self._log_level}";\n',
            **self._override,
        }
        for directory, files in (("local.d", local), ("override.d", override)):
            target = w / "local" / directory
            for stale in target.iterdir():
                if stale.name not in files:
                    stale.unlink()
            for name, text in files.items():
                path = target / name
                path.write_text("# generated by tests/peers/rspamd.py\n" + text)
                path.chmod(0o644)

    def _launch(self, binaries: _Binaries) -> None:
        owner = self._owner()
        command = [binaries.rspamd, "-f", "-c", str(STOCK_CONFIG), *self._vars()]
        if owner is not None:
            command[2:2] = ["-u", RSPAMD_USER, "-g", RSPAMD_USER]
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started = time.monotonic()
        with open(self._workdir / "rspamd.out", "ab") as out:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=self._workdir,
                                    start_new_session=True)
        stat = proc_stat(proc.pid)
        self._proc = proc
        self._proc_start = stat[3] if stat is not None else 0
        _running.add(self)
        try:
            self._wait_ready(started + self._startup_timeout, log_offset)
        except RspamdError as exc:
            new_log = self._log_since(log_offset).lower()
            self._stop_rspamd(grace=2.0)
            if any(marker in new_log for marker in _PORT_IN_USE):
                raise _PortInUse(str(exc)) from None
            raise
        self.startup_seconds = time.monotonic() - started

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _wait_ready(self, deadline: float, log_offset: int) -> None:
        proc = self._proc
        assert proc is not None
        pending = [self._port, self._controller_port]
        while pending:
            if proc.poll() is not None:
                raise RspamdError(f"rspamd exited with status {proc.returncode}:\n"
                                  f"{self.log_text()[-8000:]}")
            if _ping(HOST, pending[0]):
                pending.pop(0)
                continue
            new_log = self._log_since(log_offset).lower()
            if any(marker in new_log for marker in _PORT_IN_USE):
                raise RspamdError(f"a worker could not bind its port:\n{new_log[-4000:]}")
            if time.monotonic() >= deadline:
                raise RspamdError(f"rspamd did not answer /ping on {HOST}:{pending[0]} within "
                                  f"{self._startup_timeout:g}s:\n{self.log_text()[-8000:]}")
            time.sleep(0.05)

    def _stop_rspamd(self, grace: float) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            survivors = stop_session(proc, self._proc_start, grace)
        finally:
            self._proc = None
            self._frozen = False
            _running.discard(self)
        if survivors:
            raise RspamdError(f"rspamd processes survived SIGKILL: {survivors}")
