"""A private authoritative DNS server (NSD) serving zones that the tests generate.

Theory of operation
-------------------
:class:`AuthoritativeDNS` runs its own NSD (``nsd -d -c CONF``), never the system's, on
127.0.0.1 (and ``::1`` with ``ipv6=True``) on one free port for UDP and TCP. Everything
the instance owns lives in one directory::

    <workdir>/
        nsd.conf        generated: listeners, no privilege drop, no chroot, no database,
                        no rate limiting, a remote-control UNIX socket, one zone: block
                        per zone
        zones/<origin>.zone
                        one zone file per zone, rewritten by :meth:`AuthoritativeDNS.reload`
        nsd.log         NSD's log (``logfile:``); nsd.out: its stdout/stderr
        nsd.pid, control.sock, zone.list, xfrd.state, xfr/

Zones are built in Python: ``dns.zone("example.test")`` returns a :class:`Zone` (created on
first use) whose ``add(owner, type, rdata, ttl=None)`` calls chain. Owners are relative
to the zone (``"@"``, ``"mx"``, ``"_dmarc"``) or absolute with a final dot; rdata is zone
file syntax (relative names in it are relative to the zone). Every zone gets an SOA
(serial bumped on every change; refresh/retry/expire irrelevant; SOA TTL and minimum =
``negative_ttl``, 5 s by default, so NXDOMAIN/NODATA are cached for 5 s) and an NS record
pointing at ``localhost.`` (outside the zone, so no glue and no extra A record appears in
the zone). Records without a TTL get the zone's ``ttl`` (60 s by default).

TXT rdata: a value given without quotes is one text (spaces included) and is split into
character-strings of at most 255 octets; a quoted value is parsed as zone-file
character-strings and any string over 255 octets is split likewise; ``txt(owner, value)``
does the same for ``str`` or ``bytes`` values (non-printable octets are written as
``\\DDD``).

Lifecycle: :meth:`start` writes the files, checks them (``nsd-checkconf``,
``nsd-checkzone``), starts NSD as our child in a new session and returns once every zone
answers its SOA with the current serial over UDP and TCP (a server with no zones: once it
answers a probe, with REFUSED); it polls the TCP port first, because a refused connection
shows at once what an unanswered UDP query shows only after its timeout. Startup takes
about 0.1 s. A port taken by someone else between choosing and binding it makes NSD exit
with "Address already in use"; start then retries on a new port.

:meth:`reload` rewrites what changed, runs ``nsd-control reconfig`` when zones were added
or removed and ``nsd-control reload <zone>`` for each changed zone (a forced read,
independent of file mtimes), then waits again for the serials, so the next query sees the
new data; it takes a few tens of milliseconds. :meth:`stop` sends SIGTERM to the NSD we
started (after SIGCONT if it was frozen), reaps it, and SIGKILLs any process of its
session that is left (NSD forks a server and an xfrd process; the session id is the PID we
started, so nothing else is touched). An ``atexit`` hook stops instances a dying test run
left running. :meth:`close` also removes a work directory it created.

Failure modes tests can produce
-------------------------------
* Server down: :meth:`stop` (and :meth:`start` again, same port). A query then times out
  (nothing listens; a stub resolver's unconnected UDP socket does not see ICMP errors).
* Server hung: :meth:`freeze` (SIGSTOP to the instance's processes) until :meth:`thaw`:
  queries time out while the port stays bound.
* SERVFAIL: :meth:`servfail_zone` configures a zone whose zone file does not parse; NSD
  answers SERVFAIL for every name in it.
* REFUSED: any name outside every configured zone (NSD is not a recursive server).
* Referral: a delegation (``zone.add("sub", "NS", "ns.elsewhere.")``) makes NSD answer
  names below it with a non-authoritative referral (no answer, NS in authority).
* CNAMEs are followed within one zone by NSD itself (the answer holds the chain and the
  target's records); NSD does not chase a CNAME into another zone.

NSD 4.6 (Debian 12) was used to write this; it needs no systemd and runs as root with
``username: ""`` (no privilege drop).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from .ports import free_port, port_is_open
from .process import proc_stat, session_members, signal_session, stop_session

__all__ = [
    "AuthoritativeDNS",
    "DnsServerError",
    "DnsServerNotInstalled",
    "Record",
    "Zone",
    "split_txt",
]

HOST = "127.0.0.1"
HOST6 = "::1"
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)
_INSTALL_HINT = "install it with `make peers` (scripts/install-debian-peers.sh)"
_MAX_STRING = 255
_ORIGIN = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                     r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")

_CONFIG_TEMPLATE = """\
# Generated by tests/peers/dns.py for one private test instance (NSD 4).
server:
{listeners}
    port: {port}
    do-ip4: yes
    do-ip6: {do_ip6}
    reuseport: no
    username: ""
    chroot: ""
    zonesdir: "{zonesdir}"
    pidfile: "{workdir}/nsd.pid"
    database: ""
    zonelistfile: "{workdir}/zone.list"
    xfrdfile: "{workdir}/xfrd.state"
    xfrdir: "{workdir}/xfr"
    logfile: "{workdir}/nsd.log"
    server-count: 1
    verbosity: 1
    hide-version: yes
    identity: "mailedge-test"
    rrl-ratelimit: 0
    round-robin: no
    refuse-any: yes
    zonefiles-write: 0

remote-control:
    control-enable: yes
    control-interface: "{workdir}/control.sock"
{zones}"""

_ZONE_BLOCK = """
zone:
    name: "{origin}"
    zonefile: "{origin}.zone"
"""


class DnsServerError(RuntimeError):
    """The private NSD instance could not be configured, started, reloaded or stopped."""


class DnsServerNotInstalled(DnsServerError):
    """NSD is not installed on this machine."""


class _PortInUse(DnsServerError):
    """The port was taken between choosing it and NSD binding it."""


@dataclass(frozen=True)
class _Binaries:
    nsd: str
    control: str
    checkconf: str
    checkzone: str


@functools.cache
def _binaries() -> _Binaries:
    found = {name: shutil.which(name, path=_SEARCH_PATH)
             for name in ("nsd", "nsd-control", "nsd-checkconf", "nsd-checkzone")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise DnsServerNotInstalled(f"{', '.join(missing)} not found (nsd): {_INSTALL_HINT}")
    return _Binaries(
        nsd=str(found["nsd"]), control=str(found["nsd-control"]),
        checkconf=str(found["nsd-checkconf"]), checkzone=str(found["nsd-checkzone"]),
    )


# -- TXT character-strings -----------------------------------------------------------


def _escape(chunk: bytes) -> str:
    out = []
    for byte in chunk:
        if byte in (0x22, 0x5C):  # " and \
            out.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def split_txt(value: str | bytes) -> list[bytes]:
    """Split a TXT value into character-strings of at most 255 octets (UTF-8 for str)."""
    data = value.encode() if isinstance(value, str) else bytes(value)
    if not data:
        return [b""]
    return [data[i:i + _MAX_STRING] for i in range(0, len(data), _MAX_STRING)]


def _parse_strings(rdata: str) -> list[bytes]:
    """Zone-file character-strings (quoted or not, with \\X and \\DDD escapes) as bytes."""
    strings: list[bytes] = []
    i, n = 0, len(rdata)
    while i < n:
        if rdata[i].isspace():
            i += 1
            continue
        quoted = rdata[i] == '"'
        if quoted:
            i += 1
        current = bytearray()
        while i < n:
            ch = rdata[i]
            if quoted and ch == '"':
                i += 1
                break
            if not quoted and ch.isspace():
                break
            if ch == "\\" and i + 1 < n:
                if rdata[i + 1:i + 4].isdigit() and len(rdata[i + 1:i + 4]) == 3:
                    current.append(int(rdata[i + 1:i + 4]))
                    i += 4
                    continue
                current += rdata[i + 1].encode()
                i += 2
                continue
            current += ch.encode()
            i += 1
        else:
            if quoted:
                raise ValueError(f"unterminated quoted string in TXT rdata {rdata!r}")
        strings.append(bytes(current))
    return strings


def _txt_rdata(rdata: str | bytes) -> str:
    """TXT rdata in zone-file form with every character-string at most 255 octets."""
    if isinstance(rdata, bytes) or not rdata.lstrip().startswith('"'):
        chunks = split_txt(rdata)
    else:
        chunks = [part for string in _parse_strings(rdata) for part in split_txt(string)]
    return " ".join(_escape(chunk) for chunk in chunks)


# -- zones ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One resource record: ``owner`` absolute (final dot), ``rdata`` in zone-file syntax."""

    owner: str
    rtype: str
    rdata: str
    ttl: int | None = None

    def line(self) -> str:
        ttl = "" if self.ttl is None else f"{self.ttl} "
        return f"{self.owner} {ttl}IN {self.rtype} {self.rdata}"


def _origin(name: str) -> str:
    origin = name.strip().rstrip(".").lower()
    if not _ORIGIN.match(origin):
        raise ValueError(f"not a zone name this helper supports: {name!r}")
    return origin


class Zone:
    """The records of one zone; built by chained :meth:`add` calls, served after
    :meth:`AuthoritativeDNS.reload` (or :meth:`AuthoritativeDNS.start`)."""

    def __init__(self, origin: str, *, ttl: int, negative_ttl: int) -> None:
        self._origin = _origin(origin)
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._records: list[Record] = []
        self.serial = 0

    @property
    def origin(self) -> str:
        """The zone's name, lowercase, without the final dot."""
        return self._origin

    @property
    def records(self) -> tuple[Record, ...]:
        return tuple(self._records)

    def fqdn(self, owner: str) -> str:
        """``"mx"`` -> ``"mx.example.test."``; ``"@"`` -> the origin; absolute unchanged."""
        owner = owner.strip()
        if owner in ("@", ""):
            return self._origin + "."
        if owner.endswith("."):
            return owner.lower()
        return f"{owner}.{self._origin}.".lower()

    def add(self, owner: str, rtype: str, rdata: str | bytes, *, ttl: int | None = None) -> Zone:
        """Add a record; TXT values are split into 255-octet strings (see the module)."""
        rtype = rtype.strip().upper()
        if rtype == "SOA":
            raise ValueError("the SOA is generated; set negative_ttl on the zone instead")
        if rtype == "TXT":
            text = _txt_rdata(rdata)
        elif isinstance(rdata, bytes):
            raise TypeError("bytes rdata is for TXT only")
        else:
            text = rdata.strip()
        if "\n" in text:
            raise ValueError("rdata must be one line")
        self._records.append(Record(self.fqdn(owner), rtype, text, ttl))
        return self

    def txt(self, owner: str, value: str | bytes, *, ttl: int | None = None) -> Zone:
        """Add a TXT record whose strings concatenate to ``value`` (split at 255 octets)."""
        self._records.append(
            Record(self.fqdn(owner), "TXT", " ".join(_escape(c) for c in split_txt(value)), ttl)
        )
        return self

    def set(self, owner: str, rtype: str, *rdatas: str | bytes, ttl: int | None = None) -> Zone:
        """Replace every ``rtype`` record of ``owner`` by ``rdatas`` (none: remove them)."""
        self.remove(owner, rtype)
        for rdata in rdatas:
            self.add(owner, rtype, rdata, ttl=ttl)
        return self

    def remove(self, owner: str, rtype: str | None = None) -> Zone:
        """Remove the records of ``owner`` (only those of ``rtype`` when given)."""
        fqdn = self.fqdn(owner)
        kind = rtype.strip().upper() if rtype else None
        self._records = [r for r in self._records
                         if not (r.owner == fqdn and (kind is None or r.rtype == kind))]
        return self

    def clear(self) -> Zone:
        """Remove every record (the SOA and NS stay)."""
        self._records.clear()
        return self

    def render(self, serial: int) -> str:
        """The zone file for ``serial``."""
        origin = self._origin + "."
        lines = [
            "; generated by tests/peers/dns.py",
            f"$ORIGIN {origin}",
            f"$TTL {self.ttl}",
            f"{origin} {self.negative_ttl} IN SOA ns.{origin} hostmaster.{origin} "
            f"{serial} 3600 600 86400 {self.negative_ttl}",
            f"{origin} {self.ttl} IN NS localhost.",
            *(record.line() for record in self._records),
        ]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return f"<Zone {self._origin} {len(self._records)} records serial={self.serial}>"


# -- processes -----------------------------------------------------------------------


def _free_dns_port(hosts: Iterable[str]) -> int:
    """A port free for TCP (from :func:`free_port`) and for UDP on every one of ``hosts``."""
    for _ in range(32):
        port = free_port(HOST)
        try:
            for host in hosts:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    with socket.socket(family, kind) as sock:
                        sock.bind((host, port))
        except OSError:
            continue
        return port
    raise DnsServerError("found no port free for both UDP and TCP")


_running: set[AuthoritativeDNS] = set()


@atexit.register
def _stop_all_at_exit() -> None:  # a test run that dies between start and teardown
    for instance in list(_running):
        with contextlib.suppress(Exception):
            instance.stop()


class AuthoritativeDNS:
    """One private NSD instance serving generated zones on 127.0.0.1:<port>.

    ``workdir`` defaults to a new temporary directory, removed by :meth:`close`. ``ttl``
    and ``negative_ttl`` are the defaults of zones made by :meth:`zone`.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        port: int | None = None,
        ipv6: bool = False,
        ttl: int = 60,
        negative_ttl: int = 5,
        startup_timeout: float = 10.0,
    ) -> None:
        self._owns_workdir = workdir is None
        base = Path(workdir) if workdir is not None else Path(
            tempfile.mkdtemp(prefix="mailedge-nsd-")
        )
        self._workdir = base.resolve()
        self._ipv6 = ipv6
        self._auto_port = port is None
        self._port = port if port is not None else _free_dns_port(self.hosts)
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._startup_timeout = startup_timeout
        self._zones: dict[str, Zone] = {}
        self._servfail: set[str] = set()
        self._written: dict[str, str] = {}  # origin -> zone file text last written
        self._configured: set[str] = set()  # zones in the nsd.conf NSD has read
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_start = 0
        self._frozen = False

    # ----------------------------------------------------------------- properties

    @property
    def host(self) -> str:
        return HOST

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every address NSD listens on (UDP and TCP, same port)."""
        return (HOST, HOST6) if self._ipv6 else (HOST,)

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self._port

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        """(address, port) pairs, as :class:`filters.dns.AsyncResolver` takes them."""
        return [(host, self._port) for host in self.hosts]

    @property
    def workdir(self) -> Path:
        return self._workdir

    @property
    def config_path(self) -> Path:
        return self._workdir / "nsd.conf"

    @property
    def log_path(self) -> Path:
        return self._workdir / "nsd.log"

    @property
    def zones_dir(self) -> Path:
        return self._workdir / "zones"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def processes(self) -> list[int]:
        """PIDs of the live processes of this instance."""
        if self._proc is None:
            return []
        return sorted(session_members(self._proc.pid, self._proc_start))

    def log_text(self) -> str:
        parts = []
        for path in (self._workdir / "nsd.out", self.log_path):
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    # ---------------------------------------------------------------------- zones

    def zone(self, origin: str, *, ttl: int | None = None,
             negative_ttl: int | None = None) -> Zone:
        """The zone ``origin``, created (empty: SOA and NS only) on first use."""
        key = _origin(origin)
        if key in self._servfail:
            raise ValueError(f"{key} is a SERVFAIL zone")
        zone = self._zones.get(key)
        if zone is None:
            zone = Zone(key, ttl=self._ttl if ttl is None else ttl,
                        negative_ttl=self._negative_ttl if negative_ttl is None
                        else negative_ttl)
            self._zones[key] = zone
        else:
            if ttl is not None:
                zone.ttl = ttl
            if negative_ttl is not None:
                zone.negative_ttl = negative_ttl
        return zone

    @property
    def zones(self) -> dict[str, Zone]:
        return dict(self._zones)

    def remove_zone(self, origin: str) -> None:
        """Stop serving ``origin`` after the next :meth:`reload` (its names: REFUSED)."""
        key = _origin(origin)
        self._zones.pop(key, None)
        self._servfail.discard(key)

    def servfail_zone(self, origin: str) -> None:
        """Configure ``origin`` with a zone file NSD cannot load: every name in it
        gets SERVFAIL (after the next :meth:`reload`)."""
        key = _origin(origin)
        if key in self._zones:
            raise ValueError(f"{key} already has records")
        self._servfail.add(key)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> AuthoritativeDNS:
        """Start NSD; return once every zone answers with its current serial."""
        if self._proc is not None:
            raise DnsServerError("this NSD instance is already running")
        binaries = _binaries()
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            self._write_all(binaries)
            try:
                self._launch(binaries)
            except _PortInUse:
                if attempt == attempts - 1:
                    raise
                self._port = _free_dns_port(self.hosts)
            else:
                return self
        raise AssertionError("unreachable")

    def reload(self) -> None:
        """Serve the zones as they are now; return once NSD answers with the new data.

        Starts the server if it is not running."""
        if self._proc is None:
            self.start()
            return
        binaries = _binaries()
        if self._frozen:
            self.thaw()
        changed = self._write_all(binaries)
        wanted = set(self._zones) | self._servfail
        if wanted != self._configured:
            self._control(binaries, "reconfig")
            self._configured = wanted
        for origin in sorted(changed & set(self._zones)):
            self._control(binaries, "reload", origin)
        self._wait_ready(time.monotonic() + self._startup_timeout)

    def stop(self, grace: float = 2.0) -> None:
        """Stop NSD; return once none of its processes is left. The port is kept, so
        :meth:`start` brings the same server back."""
        proc = self._proc
        if proc is None:
            return
        try:
            survivors = stop_session(proc, self._proc_start, grace)
        finally:
            self._proc = None
            self._frozen = False
            self._configured = set()
            _running.discard(self)
        if survivors:
            raise DnsServerError(f"NSD processes survived SIGKILL: {survivors}")

    def freeze(self) -> None:
        """SIGSTOP every process of the instance: queries go unanswered (time out)."""
        if self._proc is None:
            raise DnsServerError("not running")
        signal_session(self._proc.pid, self._proc_start, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """Undo :meth:`freeze`; queries that arrived meanwhile are answered late."""
        if self._proc is None:
            return
        signal_session(self._proc.pid, self._proc_start, signal.SIGCONT)
        self._frozen = False

    def close(self) -> None:
        """Stop the server and remove its work directory (if this object made it)."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> AuthoritativeDNS:
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
        return f"<AuthoritativeDNS {HOST}:{self._port} {state} zones={sorted(self._zones)}>"

    # ----------------------------------------------------------------- internals

    def _write_all(self, binaries: _Binaries) -> set[str]:
        """Write nsd.conf and every changed zone file (checked); return changed origins."""
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.zones_dir.mkdir(exist_ok=True)
        (self._workdir / "xfr").mkdir(exist_ok=True)
        changed: set[str] = set()
        for origin, zone in self._zones.items():
            body = zone.render(0)
            if self._written.get(origin) == body and (self.zones_dir /
                                                       f"{origin}.zone").exists():
                continue
            zone.serial += 1
            path = self.zones_dir / f"{origin}.zone"
            path.write_text(zone.render(zone.serial))
            self._check_zone(binaries, origin, path)
            self._written[origin] = body
            changed.add(origin)
        for origin in self._servfail:
            path = self.zones_dir / f"{origin}.zone"
            path.write_text("; deliberately broken by tests/peers/dns.py: NSD answers SERVFAIL\n"
                            "this is not a zone file\n")
            self._written.pop(origin, None)
        for stale in set(self._written) - set(self._zones):
            del self._written[stale]
        listeners = "\n".join(f"    ip-address: {host}" for host in self.hosts)
        zones = "".join(_ZONE_BLOCK.format(origin=o)
                        for o in sorted(set(self._zones) | self._servfail))
        self.config_path.write_text(_CONFIG_TEMPLATE.format(
            listeners=listeners, port=self._port, do_ip6="yes" if self._ipv6 else "no",
            zonesdir=self.zones_dir, workdir=self._workdir, zones=zones,
        ))
        result = subprocess.run([binaries.checkconf, str(self.config_path)],
                                capture_output=True, text=True, check=False, timeout=30)
        if result.returncode != 0:
            raise DnsServerError(f"nsd-checkconf rejected {self.config_path}:\n"
                                 f"{result.stdout}{result.stderr}\n"
                                 f"--- generated ---\n{self.config_path.read_text()}")
        return changed

    @staticmethod
    def _check_zone(binaries: _Binaries, origin: str, path: Path) -> None:
        result = subprocess.run([binaries.checkzone, origin, str(path)],
                                capture_output=True, text=True, check=False, timeout=30)
        if result.returncode != 0:
            raise DnsServerError(f"nsd-checkzone rejected zone {origin}:\n"
                                 f"{result.stdout}{result.stderr}\n"
                                 f"--- generated ---\n{path.read_text()}")

    def _control(self, binaries: _Binaries, *command: str) -> None:
        result = subprocess.run(
            [binaries.control, "-c", str(self.config_path), *command],
            capture_output=True, text=True, check=False, timeout=30,
        )
        if result.returncode != 0 or "error" in result.stdout.lower():
            raise DnsServerError(f"nsd-control {' '.join(command)} failed: "
                                 f"{result.stdout}{result.stderr}\n{self.log_text()}")

    def _launch(self, binaries: _Binaries) -> None:
        for stale in ("nsd.pid", "control.sock"):
            with contextlib.suppress(FileNotFoundError):
                (self._workdir / stale).unlink()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self._workdir / "nsd.out", "ab") as out:
            proc = subprocess.Popen(
                [binaries.nsd, "-d", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self._workdir, start_new_session=True,
            )
        stat = proc_stat(proc.pid)
        self._proc = proc
        self._proc_start = stat[3] if stat is not None else 0
        self._configured = set(self._zones) | self._servfail
        _running.add(self)
        try:
            self._wait_ready(time.monotonic() + self._startup_timeout)
        except DnsServerError as exc:
            new_log = self._log_since(log_offset)
            self.stop()
            if self._auto_port and "already in use" in new_log:
                raise _PortInUse(str(exc)) from None
            raise

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _wait_ready(self, deadline: float) -> None:
        """Until every zone answers its current serial (SERVFAIL zones: SERVFAIL) over
        UDP and TCP, on every listener."""
        proc = self._proc
        assert proc is not None
        pending: list[tuple[str, str, int | None]] = [
            (host, origin, zone.serial) for host in self.hosts
            for origin, zone in self._zones.items()
        ] + [(host, origin, None) for host in self.hosts for origin in self._servfail]
        if not pending:
            pending = [(host, "probe.invalid", -1) for host in self.hosts]
        last = "no answer yet"
        while pending:
            if proc.poll() is not None:
                raise DnsServerError(f"nsd exited with status {proc.returncode}:\n"
                                     f"{self.log_text()}")
            host, origin, serial = pending[0]
            try:
                # TCP first: a refused connection shows at once that NSD has not bound
                # yet, where a UDP query would wait for its whole timeout.
                ok = port_is_open(host, self._port, timeout=0.25)
                if ok:
                    ok, last = self._probe(host, origin, serial)
                else:
                    last = f"{host}:{self._port} refuses TCP connections"
            except (OSError, dns.exception.DNSException) as exc:
                ok, last = False, f"{type(exc).__name__}: {exc}"
            if ok:
                pending.pop(0)
                continue
            if time.monotonic() >= deadline:
                raise DnsServerError(f"NSD on {host}:{self._port} did not serve {origin} "
                                     f"(serial {serial}) in time; last: {last}\n"
                                     f"{self.log_text()}")
            time.sleep(0.01)

    def _probe(self, host: str, origin: str, serial: int | None) -> tuple[bool, str]:
        query = dns.message.make_query(origin + ".", dns.rdatatype.SOA)
        for send in (dns.query.udp, dns.query.tcp):
            response = send(query, host, port=self._port, timeout=0.25)
            rcode = response.rcode()
            if serial == -1:  # no zones: any answer shows the server is up
                continue
            if serial is None:
                if rcode != dns.rcode.SERVFAIL:
                    return False, f"{origin}: {dns.rcode.to_text(rcode)}, want SERVFAIL"
                continue
            got = [rr.serial for rrset in response.answer
                   if rrset.rdtype == dns.rdatatype.SOA for rr in rrset]
            if rcode != dns.rcode.NOERROR or got != [serial]:
                return False, f"{origin}: {dns.rcode.to_text(rcode)} serial {got}, want {serial}"
        return True, "ok"
