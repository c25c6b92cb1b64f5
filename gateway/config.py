"""Node configuration: TOML in, typed frozen settings out, validated whole.

Every key the node reads is declared here with its default, and `load_config` reads
the file once at start-up. Validation never stops at the first problem: it collects
every error with its dotted key and the line of the file it came from, so
`mailedge check-config` can print them all, and `mailedge run` refuses to start with
any of them. Unknown keys are errors too (a misspelt key silently ignored is how
production outages start).

`config/mailedge.toml` documents every key; `tests/unit/test_config.py` checks that
the example file and this module agree.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from filters.access_lists import AccessSettings, AccessSettingsError, build_access_settings
from filters.dnsbl import DnsblSettings, DnsblSettingsError, build_dnsbl_settings
from filters.greylist import GreylistSettings
from filters.limits import LimitSettings
from filters.reputation import ReputationSettings
from filters.rspamd import url_problem as rspamd_url_problem

T = TypeVar("T")

NODE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")

STAGE_NAMES = ("connect", "helo", "mail", "rcpt", "message")


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.key}: {self.message}"


class ConfigError(Exception):
    """The configuration has one or more problems; `problems` lists them all."""

    def __init__(self, path: Path, problems: list[ConfigProblem]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s)")

    def render(self) -> str:
        return "\n".join(f"{self.path}: {p}" for p in self.problems)


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class NodeSettings:
    name: str = "mailedge"
    spool_dir: Path = Path("var/spool")
    log_level: str = "info"
    # Worker processes; 0 means automatic: one per core when [state] redis_url is set
    # (limits, greylisting and reputation then agree across workers), else one.
    workers: int = 0


@dataclass(frozen=True, slots=True)
class InboundSettings:
    listen: tuple[HostPort, ...] = (HostPort("127.0.0.1", 2525),)
    hostname: str = "localhost"
    max_message_size: int = 36_700_160  # 35 MiB, a common hosting default
    max_recipients: int = 1000  # RFC 5321 §4.5.3.1.8 asks for at least 100
    max_connections: int = 2000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    proxy_protocol_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    command_timeout: float = 300.0  # RFC 5321 §4.5.3.2.7: server timeout 5 minutes
    min_data_rate: int = 1024  # bytes/s averaged over DATA after the grace below
    data_rate_grace: float = 30.0
    max_transaction_time: float = 1800.0
    max_session_time: float = 3600.0
    max_concurrent_data: int = 200  # DATA phases buffered in memory at once
    smuggling: str = "reject"  # "reject" bare CR/LF in DATA with 5xx, or "normalise"


@dataclass(frozen=True, slots=True)
class TenantSettings:
    file: Path = Path("config/tenants.toml")
    api_url: str | None = None  # set: the provider's tenant API replaces the file
    token: str | None = None
    token_file: Path | None = None
    lookup_timeout: float = 2.0
    auth_timeout: float = 5.0
    cache_size: int = 100_000  # entries per call type
    recipient_stale: float = 3600.0  # seconds a recipient may be served past expiry
    policy_stale: float = 86400.0  # domain and tenant policy, DKIM keys
    limits_stale: float = 3600.0
    negative_ttl: float = 60.0  # "no such recipient" kept this long, never served stale
    auth_ttl: float = 60.0  # successful logins, cached under a keyed hash only
    breaker_failures: int = 5  # consecutive failures that open the circuit
    breaker_reset: float = 10.0  # seconds before a trial request


@dataclass(frozen=True, slots=True)
class DnsSettings:
    nameservers: tuple[HostPort, ...] = ()  # empty: the system's resolv.conf
    timeout: float = 2.0  # per query, all attempts included
    cache_size: int = 50_000


@dataclass(frozen=True, slots=True)
class AntivirusSettings:
    clamd: str | None = None  # "unix:/run/clamav/clamd.ctl" or "host:port"; None: no scanning
    timeout: float = 30.0
    max_scan_size: int = 26_214_400  # match clamd's StreamMaxLength; larger: unscanned


@dataclass(frozen=True, slots=True)
class AntispamSettings:
    rspamd_url: str | None = None  # "http://127.0.0.1:11333", "unix:/path"; None: no scanning
    timeout: float = 20.0
    max_scan_size: int = 10_485_760  # larger messages are not scored
    password: str | None = None


@dataclass(frozen=True, slots=True)
class StateSettings:
    redis_url: str | None = None  # None: in-memory state (run a single worker)


@dataclass(frozen=True, slots=True)
class StorageSettings:
    lmtp: str | None = None
    maildir: Path | None = Path("var/mail")
    lmtp_max_connections: int = 20
    lmtp_connect_timeout: float = 10.0
    lmtp_command_timeout: float = 60.0
    lmtp_data_timeout: float = 300.0
    backend_pause: float = 30.0  # a failing backend is probed, not hammered, for this long


@dataclass(frozen=True, slots=True)
class QueueSettings:
    retry_min: float = 60.0
    retry_max: float = 3600.0
    lifetime: float = 5 * 86400.0
    max_active: int = 2000  # messages in delivery at once
    fsync: bool = True


@dataclass(frozen=True, slots=True)
class OutboundSettings:
    smarthost: str | None = None
    helo_name: str | None = None  # default: [inbound] hostname
    timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: HostPort | None = HostPort("127.0.0.1", 8025)
    tenant_label_limit: int = 200


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    connect: tuple[str, ...] = ()
    helo: tuple[str, ...] = ()
    mail: tuple[str, ...] = ()
    rcpt: tuple[str, ...] = ()
    message: tuple[str, ...] = ()

    def for_stage(self, stage: str) -> tuple[str, ...]:
        value: tuple[str, ...] = getattr(self, stage)
        return value


@dataclass(frozen=True, slots=True)
class Settings:
    path: Path
    node: NodeSettings = field(default_factory=NodeSettings)
    inbound: InboundSettings = field(default_factory=InboundSettings)
    tenants: TenantSettings = field(default_factory=TenantSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    antivirus: AntivirusSettings = field(default_factory=AntivirusSettings)
    antispam: AntispamSettings = field(default_factory=AntispamSettings)
    state: StateSettings = field(default_factory=StateSettings)
    dnsbl: DnsblSettings = field(default_factory=DnsblSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    reputation: ReputationSettings = field(default_factory=ReputationSettings)
    greylist: GreylistSettings = field(default_factory=GreylistSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    outbound: OutboundSettings = field(default_factory=OutboundSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)


_HEADER_RE = re.compile(r"^\[\[?([^\[\]]+)\]\]?\s*(?:#.*)?$")
_KEY_LINE_RE = re.compile(r"^((?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)"
                          r"(?:\s*\.\s*(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+))*)\s*=")


def _dotted(key_path: str) -> str:
    """`a . "b" .c` -> `a.b.c` (quoted parts holding dots are rare enough to ignore)."""
    return ".".join(part.strip().strip("\"'") for part in key_path.split("."))


class _LineFinder:
    """Finds the line of `[table]` / `key =` in the raw text, for error messages."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def find(self, dotted: str) -> int | None:
        """Line of the key (or table) `dotted`; `table.` (trailing dot) finds the header."""
        parts = dotted.split(".")
        table, key = ".".join(parts[:-1]), parts[-1]
        current = ""  # the table the following key lines belong to ("" = root)
        for number, raw in enumerate(self.lines, start=1):
            line = raw.strip()
            header = _HEADER_RE.match(line)
            if header:
                current = _dotted(header.group(1))
                if not key and current == table:
                    return number  # the table's own header
                if key and (current == dotted or current.startswith(dotted + ".")):
                    return number  # `dotted` names a (sub-)table
                continue
            match = _KEY_LINE_RE.match(line)
            if key and match:
                full = _dotted(match.group(1))
                full = f"{current}.{full}" if current else full
                if full == dotted or full.startswith(dotted + "."):
                    return number
        return None


class _Reader:
    """Pulls typed values out of the parsed TOML, recording every problem."""

    def __init__(self, data: Mapping[str, Any], lines: _LineFinder, base: Path) -> None:
        self.data = data
        self.lines = lines
        self.base = base
        self.problems: list[ConfigProblem] = []

    def problem(self, key: str, message: str) -> None:
        line = self.lines.find(key)
        if line is None and "." in key:
            line = self.lines.find(key.rsplit(".", 1)[0] + ".")
        self.problems.append(ConfigProblem(key, message, line))

    def table(self, name: str, known: set[str]) -> Mapping[str, Any]:
        raw = self.data.get(name, {})
        if not isinstance(raw, dict):
            self.problem(name, "must be a table")
            return {}
        for key in raw:
            if key not in known:
                self.problem(f"{name}.{key}", "unknown key")
        return raw

    def get(
        self,
        table: Mapping[str, Any],
        dotted: str,
        kind: type[T] | tuple[type, ...],
        default: T,
        check: Callable[[Any], str | None] | None = None,
    ) -> T:
        key = dotted.rsplit(".", 1)[-1]
        if key not in table:
            return default
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool:
            self.problem(dotted, f"must be {_kind_name(kind)}, not a boolean")
            return default
        if not isinstance(value, kind):
            self.problem(dotted, f"must be {_kind_name(kind)}, not {type(value).__name__}")
            return default
        if check is not None:
            message = check(value)
            if message:
                self.problem(dotted, message)
                return default
        return value  # type: ignore[return-value]

    def path(self, table: Mapping[str, Any], dotted: str, default: Path | None) -> Path | None:
        value = self.get(table, dotted, str, None if default is None else str(default))
        if value is None or value == "":
            return None
        candidate = Path(value)
        return candidate if candidate.is_absolute() else (self.base / candidate)

    def host_port(self, dotted: str, value: Any) -> HostPort | None:
        if not isinstance(value, str):
            self.problem(dotted, "must be a string like '127.0.0.1:2525'")
            return None
        parsed = parse_host_port(value)
        if parsed is None:
            self.problem(dotted, f"{value!r} is not host:port (IPv6 as [::1]:25)")
        return parsed


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a table"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def parse_host_port(value: str) -> HostPort | None:
    """'127.0.0.1:25', '[::1]:25', 'mx.example:25' -> HostPort; None if malformed."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", value)
    if not match:
        return None
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        return None
    return HostPort(host, port)


MAX_WORKERS = 64  # the spool's ownership slots (gateway/ownership.py)


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _scanner_timeout(value: Any) -> str | None:
    # Below the scanning filters' own 60 s, so a hung scanner is an ordinary scanner
    # error (which fail-open tenants accept), not a pipeline timeout.
    return None if 0 < value < 60 else "must be more than 0 and less than 60 seconds"


def _read_settings(data: Mapping[str, Any], reader: _Reader, path: Path) -> Settings:
    known_tables = {"node", "inbound", "tenants", "storage", "queue", "outbound", "admin",
                    "pipeline", "dns", "antivirus", "antispam", "state", "dnsbl", "access",
                    "limits", "reputation", "greylist"}
    for key in data:
        if key not in known_tables:
            reader.problem(key, "unknown table")

    t = reader.table("node", {"name", "spool_dir", "log_level", "workers"})
    node_defaults = NodeSettings()
    node = NodeSettings(
        name=reader.get(t, "node.name", str, node_defaults.name,
                        lambda v: None if NODE_NAME_RE.match(v) else
                        "must be 1-31 of a-z, 0-9 and '-', starting with a letter or digit"),
        spool_dir=reader.path(t, "node.spool_dir", node_defaults.spool_dir) or Path("var/spool"),
        log_level=reader.get(t, "node.log_level", str, "info",
                             lambda v: None if v in {"debug", "info", "warning", "error"}
                             else "must be debug, info, warning or error"),
        workers=reader.get(t, "node.workers", int, node_defaults.workers,
                           lambda v: None if 0 <= v <= MAX_WORKERS
                           else f"must be 0 (automatic) to {MAX_WORKERS}"),
    )

    t = reader.table("inbound", {
        "listen", "hostname", "max_message_size", "max_recipients", "max_connections",
        "tls_cert", "tls_key", "proxy_protocol_from", "command_timeout", "min_data_rate",
        "data_rate_grace", "max_transaction_time", "max_session_time", "max_concurrent_data",
        "smuggling"})
    d = InboundSettings()
    listen: list[HostPort] = []
    for item in reader.get(t, "inbound.listen", list, []):
        hp = reader.host_port("inbound.listen", item)
        if hp:
            listen.append(hp)
    networks = []
    for item in reader.get(t, "inbound.proxy_protocol_from", list, []):
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            reader.problem("inbound.proxy_protocol_from", f"{item!r} is not an address or network")
    tls_cert = reader.path(t, "inbound.tls_cert", None)
    tls_key = reader.path(t, "inbound.tls_key", None)
    if (tls_cert is None) != (tls_key is None):
        reader.problem("inbound.tls_cert", "tls_cert and tls_key must be set together")
    max_recipients = reader.get(t, "inbound.max_recipients", int, d.max_recipients,
                                lambda v: None if v >= 100 else
                                "must be at least 100 (RFC 5321 §4.5.3.1.8)")
    inbound = InboundSettings(
        listen=tuple(listen) if "listen" in t else d.listen,
        hostname=reader.get(t, "inbound.hostname", str, d.hostname,
                            lambda v: None if re.fullmatch(r"[A-Za-z0-9.-]+", v)
                            else "must be a host name"),
        max_message_size=reader.get(t, "inbound.max_message_size", int, d.max_message_size,
                                    _positive),
        max_recipients=max_recipients,
        max_connections=reader.get(t, "inbound.max_connections", int, d.max_connections,
                                   _positive),
        tls_cert=tls_cert,
        tls_key=tls_key,
        proxy_protocol_from=tuple(networks),
        command_timeout=reader.get(t, "inbound.command_timeout", float, d.command_timeout,
                                   _positive),
        min_data_rate=reader.get(t, "inbound.min_data_rate", int, d.min_data_rate,
                                 lambda v: None if v >= 0 else "must not be negative"),
        data_rate_grace=reader.get(t, "inbound.data_rate_grace", float, d.data_rate_grace,
                                   _positive),
        max_transaction_time=reader.get(t, "inbound.max_transaction_time", float,
                                        d.max_transaction_time, _positive),
        max_session_time=reader.get(t, "inbound.max_session_time", float, d.max_session_time,
                                    _positive),
        max_concurrent_data=reader.get(t, "inbound.max_concurrent_data", int,
                                       d.max_concurrent_data, _positive),
        smuggling=reader.get(t, "inbound.smuggling", str, d.smuggling,
                             lambda v: None if v in {"reject", "normalise"}
                             else "must be 'reject' or 'normalise'"),
    )
    if "listen" in t and not listen and not any(p.key == "inbound.listen"
                                                for p in reader.problems):
        reader.problem("inbound.listen", "must name at least one address")

    td = TenantSettings()
    t = reader.table("tenants", {"file", "api_url", "token", "token_file", "lookup_timeout",
                                 "auth_timeout", "cache_size", "recipient_stale",
                                 "policy_stale", "limits_stale", "negative_ttl", "auth_ttl",
                                 "breaker_failures", "breaker_reset"})

    def non_negative(value: Any) -> str | None:
        return None if value >= 0 else "must not be negative"

    api_url = reader.get(t, "tenants.api_url", str, None,
                         lambda v: None if re.fullmatch(r"https?://[^\s/]+(/\S*)?", v)
                         else "must be an http:// or https:// URL")
    tenants = TenantSettings(
        file=reader.path(t, "tenants.file", td.file) or td.file,
        api_url=api_url or None,
        token=reader.get(t, "tenants.token", str, None),
        token_file=reader.path(t, "tenants.token_file", None),
        lookup_timeout=reader.get(t, "tenants.lookup_timeout", float, td.lookup_timeout,
                                  _positive),
        auth_timeout=reader.get(t, "tenants.auth_timeout", float, td.auth_timeout, _positive),
        cache_size=reader.get(t, "tenants.cache_size", int, td.cache_size, _positive),
        recipient_stale=reader.get(t, "tenants.recipient_stale", float, td.recipient_stale,
                                   non_negative),
        policy_stale=reader.get(t, "tenants.policy_stale", float, td.policy_stale,
                                non_negative),
        limits_stale=reader.get(t, "tenants.limits_stale", float, td.limits_stale,
                                non_negative),
        negative_ttl=reader.get(t, "tenants.negative_ttl", float, td.negative_ttl,
                                non_negative),
        auth_ttl=reader.get(t, "tenants.auth_ttl", float, td.auth_ttl, non_negative),
        breaker_failures=reader.get(t, "tenants.breaker_failures", int, td.breaker_failures,
                                    _positive),
        breaker_reset=reader.get(t, "tenants.breaker_reset", float, td.breaker_reset,
                                 _positive),
    )
    if tenants.api_url and not (tenants.token or tenants.token_file):
        reader.problem("tenants.api_url", "needs tenants.token or tenants.token_file")

    t = reader.table("storage", {"lmtp", "maildir", "lmtp_max_connections",
                                 "lmtp_connect_timeout", "lmtp_command_timeout",
                                 "lmtp_data_timeout", "backend_pause"})
    s = StorageSettings()
    lmtp = reader.get(t, "storage.lmtp", str, None,
                      lambda v: None if v.startswith("unix:") or parse_host_port(v)
                      else "must be host:port or unix:/path")
    storage = StorageSettings(
        lmtp=lmtp,
        # Without an explicit maildir, Maildir is the default only while no LMTP is set.
        maildir=(reader.path(t, "storage.maildir", None) if "maildir" in t
                 else None if lmtp else reader.path({}, "storage.maildir", s.maildir)),
        lmtp_max_connections=reader.get(t, "storage.lmtp_max_connections", int,
                                        s.lmtp_max_connections, _positive),
        lmtp_connect_timeout=reader.get(t, "storage.lmtp_connect_timeout", float,
                                        s.lmtp_connect_timeout, _positive),
        lmtp_command_timeout=reader.get(t, "storage.lmtp_command_timeout", float,
                                        s.lmtp_command_timeout, _positive),
        lmtp_data_timeout=reader.get(t, "storage.lmtp_data_timeout", float,
                                     s.lmtp_data_timeout, _positive),
        backend_pause=reader.get(t, "storage.backend_pause", float, s.backend_pause,
                                 _positive),
    )
    if storage.lmtp is None and storage.maildir is None:
        reader.problem("storage", "set storage.lmtp or storage.maildir")

    t = reader.table("dns", {"nameservers", "timeout", "cache_size"})
    nameservers: list[HostPort] = []
    for item in reader.get(t, "dns.nameservers", list, []):
        text = item if isinstance(item, str) else ""
        hp = parse_host_port(text) or (parse_host_port(f"{text}:53") if ":" not in text
                                       else parse_host_port(f"[{text}]:53"))
        try:
            valid = hp is not None and bool(ipaddress.ip_address(hp.host))
        except ValueError:
            valid = False
        if hp is None or not valid:
            reader.problem("dns.nameservers",
                           f"{item!r} is not an IP address or address:port")
        else:
            nameservers.append(hp)
    dns_settings = DnsSettings(
        nameservers=tuple(nameservers),
        timeout=reader.get(t, "dns.timeout", float, DnsSettings().timeout, _positive),
        cache_size=reader.get(t, "dns.cache_size", int, DnsSettings().cache_size, _positive),
    )

    t = reader.table("antivirus", {"clamd", "timeout", "max_scan_size"})
    av = AntivirusSettings()
    antivirus = AntivirusSettings(
        clamd=reader.get(t, "antivirus.clamd", str, None,
                         lambda v: None if v.startswith("unix:/") or parse_host_port(v)
                         else "must be unix:/path or host:port") or None,
        timeout=reader.get(t, "antivirus.timeout", float, av.timeout, _scanner_timeout),
        max_scan_size=reader.get(t, "antivirus.max_scan_size", int, av.max_scan_size,
                                 _positive))
    t = reader.table("antispam", {"rspamd_url", "timeout", "max_scan_size", "password"})
    sp = AntispamSettings()
    antispam = AntispamSettings(
        rspamd_url=reader.get(t, "antispam.rspamd_url", str, None, rspamd_url_problem)
        or None,
        timeout=reader.get(t, "antispam.timeout", float, sp.timeout, _scanner_timeout),
        max_scan_size=reader.get(t, "antispam.max_scan_size", int, sp.max_scan_size,
                                 _positive),
        password=reader.get(t, "antispam.password", str, None) or None)
    t = reader.table("state", {"redis_url"})
    state = StateSettings(redis_url=reader.get(
        t, "state.redis_url", str, None,
        lambda v: None if re.match(r"^(redis|rediss|redis\+sentinel|unix)://", v)
        else "must be a redis://, rediss://, redis+sentinel:// or unix:// URL") or None)
    t = reader.table("dnsbl", {"zones", "threshold"})
    dnsbl = DnsblSettings()
    try:
        dnsbl = build_dnsbl_settings(**{k: t[k] for k in ("zones", "threshold") if k in t})
    except DnsblSettingsError as exc:
        for problem in exc.problems:
            reader.problem("dnsbl." + problem.split(":", 1)[0].split("[", 1)[0],
                           problem)
    t = reader.table("access", {"allow_ips", "deny_ips", "allow_senders", "deny_senders"})
    access = AccessSettings()
    try:
        access = build_access_settings(**dict(t))
    except AccessSettingsError as exc:
        for problem in exc.problems:
            reader.problem("access." + problem.split(":", 1)[0].split("[", 1)[0], problem)
    limits = _dataclass_table(reader, "limits", LimitSettings)
    reputation = _dataclass_table(reader, "reputation", ReputationSettings)
    greylist = _dataclass_table(reader, "greylist", GreylistSettings)

    t = reader.table("queue", {"retry_min", "retry_max", "lifetime", "max_active", "fsync"})
    q = QueueSettings()
    queue = QueueSettings(
        retry_min=reader.get(t, "queue.retry_min", float, q.retry_min, _positive),
        retry_max=reader.get(t, "queue.retry_max", float, q.retry_max, _positive),
        lifetime=reader.get(t, "queue.lifetime", float, q.lifetime, _positive),
        max_active=reader.get(t, "queue.max_active", int, q.max_active, _positive),
        fsync=reader.get(t, "queue.fsync", bool, q.fsync),
    )
    if queue.retry_max < queue.retry_min:
        reader.problem("queue.retry_max", "must not be smaller than queue.retry_min")

    t = reader.table("outbound", {"smarthost", "helo_name", "timeout"})
    smarthost = reader.get(t, "outbound.smarthost", str, None,
                           lambda v: None if v == "" or parse_host_port(v)
                           else "must be host:port")
    outbound = OutboundSettings(
        smarthost=smarthost or None,
        helo_name=reader.get(t, "outbound.helo_name", str, None),
        timeout=reader.get(t, "outbound.timeout", float, OutboundSettings().timeout, _positive),
    )

    t = reader.table("admin", {"listen", "tenant_label_limit"})
    admin_listen: HostPort | None = AdminSettings().listen
    if "listen" in t:
        admin_listen = None if t["listen"] == "" else reader.host_port("admin.listen",
                                                                       t["listen"])
    admin = AdminSettings(
        listen=admin_listen,
        tenant_label_limit=reader.get(t, "admin.tenant_label_limit", int,
                                      AdminSettings().tenant_label_limit, _positive),
    )

    t = reader.table("pipeline", set(STAGE_NAMES))
    stages: dict[str, tuple[str, ...]] = {}
    for stage in STAGE_NAMES:
        names = reader.get(t, f"pipeline.{stage}", list, [])
        if not all(isinstance(n, str) for n in names):
            reader.problem(f"pipeline.{stage}", "must be a list of filter names")
            names = []
        stages[stage] = tuple(names)
    pipeline = PipelineSettings(**stages)

    return Settings(path=path, node=node, inbound=inbound, tenants=tenants, storage=storage,
                    dns=dns_settings, antivirus=antivirus, antispam=antispam, state=state,
                    dnsbl=dnsbl, access=access, limits=limits, reputation=reputation,
                    greylist=greylist,
                    queue=queue, outbound=outbound, admin=admin, pipeline=pipeline)


D = TypeVar("D")


def _dataclass_table(reader: _Reader, name: str, cls: type[D]) -> D:
    """A table read straight into a filter's settings dataclass, field by field.

    Each key must be one of the dataclass's fields and of its default's type; the
    dataclass's own checks (`__post_init__`) report the rest.
    """
    fields_ = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    t = reader.table(name, set(fields_))
    values: dict[str, Any] = {}
    for key, value in t.items():
        if key not in fields_:
            continue
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                reader.problem(f"{name}.{key}", "must be a list of strings")
                continue
            values[key] = tuple(value)
        elif isinstance(default, bool):
            values[key] = reader.get(t, f"{name}.{key}", bool, default)
        elif isinstance(default, int):
            values[key] = reader.get(t, f"{name}.{key}", int, default)
        elif isinstance(default, float):
            values[key] = reader.get(t, f"{name}.{key}", float, default)
        else:
            values[key] = value
    try:
        return cls(**values)
    except ValueError as exc:
        reader.problem(name, str(exc))
        return cls()


def load_config(path: Path) -> Settings:
    """Read and validate the whole file; raise ConfigError listing every problem.

    Relative paths in the file are relative to the directory the node runs in
    (the working directory), like Postfix's queue_directory; this keeps the example
    config usable straight from a checkout.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [ConfigProblem("(file)", f"cannot read: {exc.strerror}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line_match = re.search(r"line (\d+)", str(exc))
        raise ConfigError(path, [ConfigProblem(
            "(syntax)", str(exc), int(line_match.group(1)) if line_match else None)]) from None
    reader = _Reader(data, _LineFinder(text), Path.cwd())
    settings = _read_settings(data, reader, path)
    if reader.problems:
        raise ConfigError(path, reader.problems)
    return settings
