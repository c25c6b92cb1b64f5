"""Allow and deny lists for client addresses and envelope senders, node-wide and per tenant.

Theory of operation
-------------------
Four lists, node-wide in ``[access]`` (`AccessSettings`, `ctx.services.settings.access`)
and per tenant in its policy (``allow_ips``, ``deny_ips``, ``allow_senders``,
``deny_senders``):

* IP entries: an address (``192.0.2.1``, ``2001:db8::1``) or a network
  (``192.0.2.0/24``, ``2001:db8::/32``; host bits must be zero). An IPv4-mapped IPv6
  client (``::ffff:192.0.2.1``) is matched as its IPv4 address.
* Sender entries: an address (``user@example.com``: the local part compared NFC-
  normalised and case-folded, the domain lowercased as an A-label, DESIGN.md's lookup
  form; an entry without a ``+detail`` also matches the sender's subaddresses, so
  ``user@example.com`` matches ``User+news@Example.COM``); a domain (``@example.com``
  as docs/tenants-file.md writes it, or ``example.com``: exactly that domain); or a
  leading dot (``.example.com``: every subdomain of example.com, not example.com
  itself - Postfix's access-table convention; list both to get both). The null sender
  matches no entry.

Within one list pair (say node-wide IPs) the most specific matching entry decides, so
an allow entry can carve an exception out of a denied network and the other way round:
longer prefix beats shorter; for senders an address beats a domain beats a subdomain
pattern, longer suffix beating shorter. An allow and a deny entry equally specific: deny.
Across pairs - client address vs sender, node-wide vs tenant - any denial wins: an
allowlisted client does not launder a denied sender, and a tenant's allow list does not
override the provider's deny list (the provider's abuse desk has the last word), nor the
other way round.

`AccessLists` (``access_lists``) runs at:

* CONNECT: node-wide IP lists;
* MAIL: node-wide IP and sender lists;
* RCPT: node-wide and the tenant's lists, IPs and senders.

A denial is ``REJECT 554 5.7.1 Access denied`` (RFC 3463 X.7.1: delivery not
authorized), which the pipeline holds until RCPT at CONNECT and MAIL; at RCPT it is
not applied to postmaster@ and abuse@ (RFC 5321 §4.5.1, RFC 2142), like held denials.
An allow is an ACCEPT for the stage (the rest of that stage's filters are skipped: put
advisory recorders like ``rdns`` before this filter) and the fact ``"allowlisted"``
(``"allowlisted@<tenant>"`` when the tenant's list decided), an `AccessMatch`.

Held denials: a denial held from CONNECT/HELO/MAIL (a DNSBL listing, say) must not
refuse an allowlisted client or sender. The gateway asks the pure function
`allowlisted(ip, sender, tenant_policy, settings)` at RCPT before it applies held
denials; it is also what greylisting and others use (`is_allowlisted(ctx)`).

Tenant lists come from the tenant API: an invalid entry there is ignored and logged
(once per distinct list), never fatal. Node-wide lists are validated when the
configuration is loaded (`build_access_settings` raises `AccessSettingsError`, a
ValueError listing every problem).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from filters.base import CONTINUE, Action, Context, Outcome, Reply, Stage, Verdict

log = logging.getLogger(__name__)

__all__ = [
    "ACCESS_DENIED",
    "ALWAYS_REACHABLE",
    "AccessLists",
    "AccessMatch",
    "AccessSettings",
    "AccessSettingsError",
    "allowlisted",
    "build_access_settings",
    "evaluate",
    "is_allowlisted",
    "recipient_always_reachable",
]

FACT = "allowlisted"
ACCESS_DENIED = Reply(554, "5.7.1", "Access denied")
#: Local parts every filter's RCPT-stage denial spares (RFC 5321 §4.5.1, RFC 2142); the
#: same set as gateway.inbound.ALWAYS_REACHABLE for held denials.
ALWAYS_REACHABLE = frozenset({"postmaster", "abuse"})
LIST_NAMES = ("allow_ips", "deny_ips", "allow_senders", "deny_senders")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Verb = Literal["allow", "deny"]


class AccessSettingsError(ValueError):
    """Access list entries with problems; `problems` lists every one of them."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


# -- entries ------------------------------------------------------------------------------


def _ascii_domain(domain: str) -> str | None:
    """Lookup form of a domain: lowercase A-labels (IDNA 2003, as gateway/addresses.py);
    None when it is not a host name."""
    labels: list[str] = []
    for label in domain.split("."):
        if not label.isascii():
            try:
                label = unicodedata.normalize("NFC", label).lower().encode("idna").decode()
            except UnicodeError:
                return None
        label = label.lower()
        if not (0 < len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
                and not label.startswith("-") and not label.endswith("-")):
            return None
        labels.append(label)
    result = ".".join(labels)
    return result if len(result) <= 253 else None


def _local(local: str) -> str:
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = local[1:-1].replace("\\\\", "\x00").replace("\\", "").replace("\x00", "\\")
    return unicodedata.normalize("NFC", local).casefold()


def _strip_detail(local: str) -> str:
    cut = local.find("+")
    return local[:cut] if cut > 0 else local  # a leading '+' is not a separator (Postfix)


@dataclass(frozen=True, slots=True)
class _Sender:
    """A sender in lookup form; `base` is the local part without its subaddress."""

    local: str
    base: str
    domain: str

    @classmethod
    def parse(cls, sender: str) -> _Sender | None:
        local, at, domain = sender.rpartition("@")
        if not at or not local or not domain:
            return None
        if domain.startswith("["):
            lookup = domain.lower()
        else:
            lookup = _ascii_domain(domain.rstrip(".")) or domain.lower()
        folded = _local(local)
        return cls(folded, _strip_detail(folded), lookup)


def _parse_ip(entry: str) -> tuple[Network | None, str]:
    text = entry.strip()
    try:
        return ipaddress.ip_network(text, strict=True), ""
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None, f"{entry!r} is not an IP address or network"
    return None, f"{entry!r} has host bits set (did you mean {loose}?)"


def _parse_sender(entry: str) -> tuple[tuple[str, str] | None, str]:
    """(("address"|"domain"|"suffix", key), "") or (None, problem)."""
    text = entry.strip()
    if text.startswith("@"):  # "@example.com": the domain, as the tenant API documents
        text = text[1:]
        if text.startswith("."):
            return None, f"{entry!r}: write subdomains as '.example.com', without '@'"
    if "@" in text:
        local, _, domain = text.rpartition("@")
        if not local:
            return None, f"{entry!r}: no local part"
        lookup = _ascii_domain(domain.rstrip("."))
        if lookup is None:
            return None, f"{entry!r}: {domain!r} is not a domain"
        return ("address", f"{_local(local)}@{lookup}"), ""
    kind = "suffix" if text.startswith(".") else "domain"
    lookup = _ascii_domain(text[1:] if kind == "suffix" else text.rstrip("."))
    if lookup is None:
        return None, f"{entry!r} is not an address, a domain or a .domain"
    return (kind, lookup), ""


class _IpList:
    """Networks by prefix length: a lookup costs one set probe per distinct length."""

    def __init__(self, entries: Iterable[tuple[Network, str]]) -> None:
        self._by_length: dict[tuple[int, int], dict[int, str]] = {}
        for network, text in entries:
            key = (network.version, network.prefixlen)
            self._by_length.setdefault(key, {}).setdefault(int(network.network_address), text)
        self._lengths = sorted(self._by_length, key=lambda k: -k[1])

    def match(self, address: IPAddress) -> tuple[int, str] | None:
        """(prefix length, entry) of the most specific entry containing `address`."""
        value, bits = int(address), address.max_prefixlen
        for version, length in self._lengths:
            if version != address.version:
                continue
            masked = value >> (bits - length) << (bits - length) if length else 0
            entry = self._by_length[(version, length)].get(masked)
            if entry is not None:
                return length, entry
        return None


class _SenderList:
    def __init__(self, entries: Iterable[tuple[tuple[str, str], str]]) -> None:
        self._keys: dict[tuple[str, str], str] = {}
        for key, text in entries:
            self._keys.setdefault(key, text)

    def match(self, sender: _Sender) -> tuple[tuple[int, int], str] | None:
        """((rank, length), entry): address 3, domain 2, subdomain pattern 1."""
        for local in dict.fromkeys((sender.local, sender.base)):
            entry = self._keys.get(("address", f"{local}@{sender.domain}"))
            if entry is not None:
                return (3, 0), entry
        entry = self._keys.get(("domain", sender.domain))
        if entry is not None:
            return (2, 0), entry
        labels = sender.domain.split(".")
        for start in range(1, len(labels)):
            entry = self._keys.get(("suffix", ".".join(labels[start:])))
            if entry is not None:
                return (1, len(labels) - start), entry
        return None


@dataclass(frozen=True, slots=True)
class _Lists:
    allow_ips: _IpList
    deny_ips: _IpList
    allow_senders: _SenderList
    deny_senders: _SenderList


def _compile(lists: Mapping[str, Iterable[Any]]) -> tuple[_Lists, list[str]]:
    """The four lists compiled, and the problems of the entries left out."""
    problems: list[str] = []
    ips: dict[str, list[tuple[Network, str]]] = {}
    senders: dict[str, list[tuple[tuple[str, str], str]]] = {}
    for name in LIST_NAMES:
        parsed_ips: list[tuple[Network, str]] = []
        parsed_senders: list[tuple[tuple[str, str], str]] = []
        for index, entry in enumerate(lists.get(name, ())):
            where = f"{name}[{index}]"
            if not isinstance(entry, str):
                problems.append(f"{where}: {entry!r} is not a string")
                continue
            if name.endswith("_ips"):
                network, problem = _parse_ip(entry)
                if network is not None:
                    parsed_ips.append((network, entry.strip()))
            else:
                key, problem = _parse_sender(entry)
                if key is not None:
                    parsed_senders.append((key, entry.strip()))
            if problem:
                problems.append(f"{where}: {problem}")
        ips[name], senders[name] = parsed_ips, parsed_senders
    problems += _in_both("ips", [k for k, _ in ips["allow_ips"]], ips["deny_ips"])
    problems += _in_both("senders", [k for k, _ in senders["allow_senders"]],
                         senders["deny_senders"])
    return _Lists(_IpList(ips["allow_ips"]), _IpList(ips["deny_ips"]),
                  _SenderList(senders["allow_senders"]),
                  _SenderList(senders["deny_senders"])), problems


def _in_both(kind: str, allowed: Iterable[object],
             denied: Iterable[tuple[object, str]]) -> list[str]:
    """Problems for entries that are in both lists of a pair (a typo, surely)."""
    keys = set(allowed)
    return [f"deny_{kind}: {text!r} is in allow_{kind} too"
            for key, text in denied if key in keys]


@dataclass(frozen=True, slots=True)
class AccessSettings:
    """Node-wide access lists (``[access]``); raises `AccessSettingsError` when invalid."""

    allow_ips: tuple[str, ...] = ()
    deny_ips: tuple[str, ...] = ()
    allow_senders: tuple[str, ...] = ()
    deny_senders: tuple[str, ...] = ()
    _lists: _Lists = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lists, problems = _compile({name: getattr(self, name) for name in LIST_NAMES})
        if problems:
            raise AccessSettingsError(problems)
        object.__setattr__(self, "_lists", lists)

    @property
    def lists(self) -> _Lists:
        return self._lists


def build_access_settings(allow_ips: Any = (), deny_ips: Any = (), allow_senders: Any = (),
                          deny_senders: Any = ()) -> AccessSettings:
    """`AccessSettings` from the raw ``[access]`` values (TOML lists of strings).

    Raises `AccessSettingsError` (a ValueError) whose `problems` name each bad entry,
    e.g. ``"deny_ips[2]: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)"``.
    """
    raw = {"allow_ips": allow_ips, "deny_ips": deny_ips, "allow_senders": allow_senders,
           "deny_senders": deny_senders}
    problems = [f"{name}: must be a list of strings" for name, value in raw.items()
                if not isinstance(value, list | tuple)]
    if problems:
        raise AccessSettingsError(problems)
    _, problems = _compile(raw)
    if problems:
        raise AccessSettingsError(problems)
    clean = {name: tuple(entry.strip() for entry in value) for name, value in raw.items()}
    return AccessSettings(**clean)


@functools.lru_cache(maxsize=1024)
def _tenant_lists(allow_ips: tuple[Any, ...], deny_ips: tuple[Any, ...],
                  allow_senders: tuple[Any, ...], deny_senders: tuple[Any, ...]) -> _Lists:
    lists, problems = _compile({"allow_ips": allow_ips, "deny_ips": deny_ips,
                                "allow_senders": allow_senders, "deny_senders": deny_senders})
    for problem in problems:  # once per distinct list, thanks to the cache
        log.warning("tenant access list entry ignored: %s", problem)
    return lists


def _policy_lists(policy: Mapping[str, Any]) -> _Lists | None:
    values: list[tuple[Any, ...]] = []
    for name in LIST_NAMES:
        value = policy.get(name) or ()
        if isinstance(value, str) or not isinstance(value, Iterable):
            log.warning("tenant policy %s is not a list: %r (ignored)", name, value)
            value = ()
        values.append(tuple(value))
    if not any(values):
        return None
    try:
        return _tenant_lists(*values)
    except TypeError:  # unhashable entries: nothing sensible to match
        log.warning("tenant access lists ignored: entries are not strings")
        return None


# -- decisions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessMatch:
    """The entry that decided: what it says, whose list, which list, which entry."""

    action: Verb
    scope: str  # "global" or the tenant id
    list: str  # "allow_ips", "deny_senders", ...
    entry: str

    @property
    def allowlisted(self) -> bool:
        """True for an allow entry (what readers of the ``"allowlisted"`` fact test)."""
        return self.action == "allow"

    def describe(self) -> str:
        return f"{self.scope} {self.list} {self.entry!r}"


def _decide(lists: _Lists, scope: str, address: IPAddress | None, sender: _Sender | None
            ) -> list[AccessMatch]:
    """The deciding match of each dimension (client address, sender) of one scope."""
    found: list[AccessMatch] = []
    if address is not None:
        allow, deny = lists.allow_ips.match(address), lists.deny_ips.match(address)
        if deny is not None and (allow is None or deny[0] >= allow[0]):
            found.append(AccessMatch("deny", scope, "deny_ips", deny[1]))
        elif allow is not None:
            found.append(AccessMatch("allow", scope, "allow_ips", allow[1]))
    if sender is not None:
        allow_s, deny_s = lists.allow_senders.match(sender), lists.deny_senders.match(sender)
        if deny_s is not None and (allow_s is None or deny_s[0] >= allow_s[0]):
            found.append(AccessMatch("deny", scope, "deny_senders", deny_s[1]))
        elif allow_s is not None:
            found.append(AccessMatch("allow", scope, "allow_senders", allow_s[1]))
    return found


def _client(ip: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except (ValueError, AttributeError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def evaluate(ip: str | None, sender: str | None, tenant_policy: Mapping[str, Any] | None,
             settings: AccessSettings | None, *, tenant: str = "tenant"
             ) -> AccessMatch | None:
    """The access decision for a client address and envelope sender (either may be
    None or "" when not known yet; "" is also the null sender): the first denial of
    node-wide then tenant lists, else the first allow, else None."""
    address = _client(ip) if ip else None
    parsed = _Sender.parse(sender) if sender else None
    found: list[AccessMatch] = []
    if settings is not None:
        found += _decide(settings.lists, "global", address, parsed)
    if tenant_policy:
        lists = _policy_lists(tenant_policy)
        if lists is not None:
            found += _decide(lists, tenant, address, parsed)
    for match in found:
        if match.action == "deny":
            return match
    return found[0] if found else None


def allowlisted(ip: str | None, sender: str | None, tenant_policy: Mapping[str, Any] | None,
                global_settings: AccessSettings | None) -> bool:
    """True when an allow entry matches the client or the sender and no deny entry does
    (node-wide or in `tenant_policy`): the client is spared held denials.

    Pure and cheap: the gateway calls it at RCPT before applying `session.held`.
    """
    match = evaluate(ip, sender, tenant_policy, global_settings)
    return match is not None and match.action == "allow"


def access_settings(ctx: Context) -> AccessSettings | None:
    """The node-wide lists (None when ``[access]`` is not configured)."""
    settings: AccessSettings | None = ctx.services.settings.access
    return settings


def is_allowlisted(ctx: Context) -> bool:
    """`allowlisted` for the context's client, sender and tenant (any stage)."""
    policy = None if ctx.tenant is None else ctx.tenant.policy
    return allowlisted(ctx.session.client_ip, ctx.envelope.sender, policy,
                       access_settings(ctx))


def recipient_always_reachable(ctx: Context) -> bool:
    """True at RCPT for postmaster@ and abuse@ (as given, or the mailbox it reached)."""
    recipient = ctx.envelope.current_recipient
    if recipient is None:
        return False
    for address in (recipient.address, recipient.lookup_key):
        local = address.rpartition("@")[0] if "@" in address else address
        if _strip_detail(_local(local)) in ALWAYS_REACHABLE:
            return True
    return False


class AccessLists:
    """Node-wide and per-tenant allow/deny lists of client addresses and senders.

    Settings: ``[access] allow_ips, deny_ips, allow_senders, deny_senders`` and the same
    keys in a tenant's policy (RCPT). Replies: ``554 5.7.1 Access denied`` (held until
    RCPT when found at CONNECT or MAIL). An allow settles the stage (ACCEPT) and records
    the fact ``"allowlisted"`` (``"allowlisted@<tenant>"`` for a tenant's entry).
    """

    name: ClassVar[str] = "access_lists"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT, Stage.MAIL, Stage.RCPT})
    timeout: ClassVar[float] = 1.0
    on_error: ClassVar[Action] = Action.TEMPFAIL

    async def check(self, ctx: Context) -> Verdict:
        tenant = ctx.tenant if ctx.stage is Stage.RCPT else None
        sender = ctx.envelope.sender if ctx.stage is not Stage.CONNECT else None
        match = evaluate(ctx.session.client_ip, sender,
                         None if tenant is None else tenant.policy, access_settings(ctx),
                         tenant="tenant" if tenant is None else tenant.id)
        if match is None:
            ctx.note(Outcome.SKIP, "not listed")
            return CONTINUE
        if match.action == "deny":
            if ctx.stage is Stage.RCPT and recipient_always_reachable(ctx):
                ctx.note(Outcome.SKIP, f"{match.describe()}: postmaster/abuse stay reachable")
                return CONTINUE
            ctx.note(Outcome.FAIL, match.describe())
            return Verdict(Action.REJECT, ACCESS_DENIED, reason=f"access {match.describe()}")
        key = FACT if match.scope == "global" else f"{FACT}@{match.scope}"

        async def record() -> AccessMatch:
            return match

        await ctx.once(key, record)
        ctx.note(Outcome.PASS, match.describe())
        return Verdict(Action.ACCEPT, reason=f"access {match.describe()}")
