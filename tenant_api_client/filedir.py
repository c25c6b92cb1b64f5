"""The embedded tenant directory: `config/tenants.toml` behind the TenantDirectory interface.

Theory of operation: the file is parsed and validated whole into two dictionaries
(domain → tenant id, mailbox lookup key → Recipient). Lookups are dictionary reads.
The file is re-read when its modification time changes (checked at most every
`reload_interval` seconds, on lookup), so an operator can add a mailbox without a
restart; a reload that fails validation keeps the previous data and logs every
problem once. The format is documented in docs/tenants-file.md.

Keys in the file are normalised the same way lookups are (lowercase A-label domain,
NFC case-folded local part), so `Alice@Example.TEST` in the file still matches.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
import tomllib
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from tenant_api_client.errors import InvalidData, Unavailable
from tenant_api_client.models import (
    Account,
    Autoreply,
    DkimKey,
    DkimKeys,
    DomainInfo,
    Event,
    Limits,
    Policy,
    Recipient,
    Tenant,
    Unknown,
)
from tenant_api_client.passwords import (
    BadHash,
    check_format,
    hash_password,
    verify_password_async,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

TENANT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAILBOX_KEYS = {"storage", "disabled", "over_quota", "autoreply", "spam_allow_senders",
                "spam_block_senders"}
TENANT_KEYS = {"name", "domains", "mailboxes", "mailbox", "policy", "alias", "forward",
               "domain", "account", "limits"}
POLICY_KEYS = set(Policy.__struct_fields__)
DOMAIN_KEYS = {"policy", "catch_all", "dkim"}
ACCOUNT_KEYS = {"password", "allowed_senders", "limits_class", "limits", "contained"}
DKIM_KEYS = {"algorithm", "private_key", "private_key_file", "active"}


def normalise_domain(domain: str) -> str:
    """Lowercase A-label form of a domain (IDNA 2003 codec, see docs)."""
    domain = unicodedata.normalize("NFC", domain).lower().rstrip(".")
    if domain.isascii():
        return domain
    return domain.encode("idna").decode("ascii")


def normalise_local(local: str) -> str:
    return unicodedata.normalize("NFC", local).casefold()


@dataclass(frozen=True, slots=True)
class StoredAccount:
    account: Account
    password_hash: str


@dataclass(frozen=True, slots=True)
class _Snapshot:
    tenants: dict[str, Tenant]
    domains: dict[str, str]  # domain -> tenant id
    recipients: dict[str, Recipient]  # mailboxes, aliases, forwards by lookup key
    domain_info: dict[str, DomainInfo] = field(default_factory=dict)
    catch_all: dict[str, str] = field(default_factory=dict)  # domain -> target mailbox
    accounts: dict[str, StoredAccount] = field(default_factory=dict)  # lowercase username
    dkim: dict[str, DkimKeys] = field(default_factory=dict)
    tenant_limits: dict[str, Limits] = field(default_factory=dict)


_KEY_PART = r"""(?:"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)"""
_KEY_PATH = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER_RE = re.compile(rf"^\[\[?\s*({_KEY_PATH})\s*\]\]?\s*(?:#.*)?$")
_KEY_LINE_RE = re.compile(rf"^({_KEY_PATH})\s*=")
_KEY_PART_RE = re.compile(_KEY_PART)

Scope = tuple[str, ...]


def _key_path(text: str) -> Scope:
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in _KEY_PART_RE.findall(text))


class _Lines:
    """Where things are in the file, for error messages (best effort, no TOML parser).

    Each line gets the key path it belongs to: a `[table]` header its table, `key = ...`
    its table plus key, the continuation lines of a multi-line value the same as their
    key; comments and blank lines none. `find` looks only inside a scope, so a problem
    of one tenant never points at a line of another, or at a comment.
    """

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.places: list[Scope | None] = []
        table: Scope = ()
        place: Scope = ()
        for raw in self.lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                self.places.append(None)
                continue
            header = _HEADER_RE.match(line)
            key = _KEY_LINE_RE.match(line)
            if header:
                table = place = _key_path(header.group(1))
            elif key:
                place = table + _key_path(key.group(1))
            self.places.append(place)

    def find(self, scope: Scope, *needles: str) -> int | None:
        """First line in `scope` (or below it) holding every needle; fewer needles, then
        wider scopes, when that finds nothing."""
        while True:
            for number, (line, place) in enumerate(zip(self.lines, self.places,
                                                       strict=True), start=1):
                if place is not None and place[:len(scope)] == scope and all(
                        n in line for n in needles):
                    return number
            if needles:
                needles = ()
            elif len(scope) > 1:
                scope = scope[:-1]
            else:
                return None


def parse_tenants(text: str, base: Path | None = None) -> _Snapshot:
    """Validate the whole tenants file; raise InvalidData listing every problem.

    `base` is the directory relative `private_key_file` paths are resolved against.
    """
    problems: list[tuple[str, int | None, str]] = []
    lines = _Lines(text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise InvalidData([("(syntax)", int(match.group(1)) if match else None, str(exc))]) \
            from None

    def problem(key: str, message: str, scope: Scope, *needles: str) -> None:
        problems.append((key, lines.find(scope, *needles), message))

    for key in data:
        if key != "tenant":
            problem(key, "unknown key (tenants are [tenant.<id>] tables)", (key,))
    raw_tenants = data.get("tenant", {})
    if not isinstance(raw_tenants, dict):
        problem("tenant", "must be a table of tenants", ("tenant",))
        raise InvalidData(problems)

    reader = _TenantReader(problem, base or Path.cwd())
    for tenant_id, body in raw_tenants.items():
        reader.tenant(tenant_id, body)
    snapshot = reader.snapshot()
    if problems:
        raise InvalidData(problems)
    return snapshot


Problem = Callable[..., None]


def _list_of_str(value: Any, key: str, scope: Scope, problem: Problem) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problem(key, "must be a list of strings", scope)
        return []
    return list(value)


def _required(model: type) -> set[str]:
    info = msgspec.inspect.type_info(model)
    return {f.name for f in getattr(info, "fields", ()) if f.required}


def _message(exc: msgspec.ValidationError) -> str:
    return str(exc).split(" - at `", 1)[0]


class _TenantReader:
    """Reads tenant tables one by one into the snapshot's dictionaries."""

    def __init__(self, problem: Problem, base: Path) -> None:
        self.problem = problem
        self.base = base
        self.tenants: dict[str, Tenant] = {}
        self.domains: dict[str, str] = {}
        self.recipients: dict[str, Recipient] = {}
        self.domain_info: dict[str, DomainInfo] = {}
        self.catch_all: dict[str, str] = {}
        self.accounts: dict[str, StoredAccount] = {}
        self.dkim: dict[str, DkimKeys] = {}
        self.tenant_limits: dict[str, Limits] = {}
        self._catch_all_pending: list[tuple[str, str, str, Scope]] = []

    def snapshot(self) -> _Snapshot:
        for domain, target, key, scope in self._catch_all_pending:
            found = self.recipients.get(target)
            if found is None or found.kind != "mailbox":
                self.problem(key, f"catch-all target {target} is not a mailbox", scope)
            else:
                self.catch_all[domain] = target
        return _Snapshot(tenants=self.tenants, domains=self.domains,
                         recipients=self.recipients, domain_info=self.domain_info,
                         catch_all=self.catch_all, accounts=self.accounts, dkim=self.dkim,
                         tenant_limits=self.tenant_limits)

    def tenant(self, tenant_id: str, body: Any) -> None:
        problem = self.problem
        where = f"tenant.{tenant_id}"
        here: Scope = ("tenant", tenant_id)
        if not TENANT_ID_RE.match(tenant_id):
            problem(where, "tenant id must be letters, digits, '_', '.', '-'", here)
            return
        if not isinstance(body, dict):
            problem(where, "must be a table", here)
            return
        for key in body:
            if key not in TENANT_KEYS:
                problem(f"{where}.{key}", "unknown key", (*here, key))
        tenant_domains: list[str] = []
        listed = _list_of_str(body.get("domains", []), f"{where}.domains", (*here, "domains"),
                              problem)
        for domain in listed:
            try:
                norm = normalise_domain(domain)
            except UnicodeError:
                problem(f"{where}.domains", f"{domain!r} is not a valid domain",
                        (*here, "domains"), domain)
                continue
            if norm in self.domains and self.domains[norm] != tenant_id:
                problem(f"{where}.domains",
                        f"{domain} already belongs to tenant {self.domains[norm]}",
                        (*here, "domains"), domain)
                continue
            if norm not in tenant_domains:
                self.domains[norm] = tenant_id
                tenant_domains.append(norm)
        if not tenant_domains:
            problem(f"{where}.domains", "a tenant needs at least one domain", here)
        policy = self.convert(body.get("policy", {}), Policy, f"{where}.policy",
                              (*here, "policy")) or Policy()
        self.tenants[tenant_id] = Tenant(id=tenant_id, name=str(body.get("name", "")),
                                         domains=tuple(tenant_domains), policy=policy)
        self.tenant_limits[tenant_id] = self.convert(
            body.get("limits", {}), Limits, f"{where}.limits", (*here, "limits")) or Limits()
        self.domain_tables(tenant_id, body.get("domain", {}), tenant_domains, policy)
        self.mailboxes(tenant_id, body, tenant_domains)
        self.redirects(tenant_id, "alias", body.get("alias", {}), tenant_domains)
        self.redirects(tenant_id, "forward", body.get("forward", {}), tenant_domains)
        self.account_tables(tenant_id, body.get("account", {}))

    def convert(self, raw: Any, model: type[T], key: str, scope: Scope) -> T | None:
        """A table into a model; unknown keys and wrong types become problems."""
        if not isinstance(raw, dict):
            self.problem(key, "must be a table", scope)
            return None
        known: tuple[str, ...] = getattr(model, "__struct_fields__", ())
        unknown = [k for k in raw if k not in known]
        for name in unknown:
            self.problem(f"{key}.{name}", "unknown key", (*scope, name))
        values = {k: v for k, v in raw.items() if k not in unknown}
        try:
            return msgspec.convert(values, model)
        except msgspec.ValidationError as first:
            # msgspec stops at the first bad field; convert field by field (with the
            # others' values) to report every one of them.
            failed = False
            required = _required(model)
            for name in values:
                alone = {n: v for n, v in values.items() if n == name or n in required}
                try:
                    msgspec.convert(alone, model)
                except msgspec.ValidationError as exc:
                    if f"`$.{name}`" in str(exc):
                        failed = True
                        self.problem(f"{key}.{name}", _message(exc), (*scope, name))
            if not failed:
                self.problem(key, _message(first), scope)
            return None

    def address(self, address: str, tenant_domains: list[str], key: str, scope: Scope,
                needle: str = "") -> str | None:
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            self.problem(key, "must be a full address local@domain", scope, needle)
            return None
        try:
            lookup = f"{normalise_local(local)}@{normalise_domain(domain)}"
        except UnicodeError:
            self.problem(key, "domain is not valid", scope, needle)
            return None
        if lookup.rpartition("@")[2] not in tenant_domains:
            self.problem(key, f"domain {domain} is not one of this tenant's domains", scope,
                         needle)
            return None
        if lookup in self.recipients:
            self.problem(key, "address listed twice", scope, needle)
            return None
        return lookup

    def mailboxes(self, tenant_id: str, body: dict[str, Any], tenant_domains: list[str]) -> None:
        problem = self.problem
        where = f"tenant.{tenant_id}"
        here: Scope = ("tenant", tenant_id)
        entries: list[tuple[str, dict[str, Any], Scope, str]] = [
            (address, {}, (*here, "mailboxes"), f'"{address}"') for address in
            _list_of_str(body.get("mailboxes", []), f"{where}.mailboxes",
                         (*here, "mailboxes"), problem)]
        raw_boxes = body.get("mailbox", {})
        if not isinstance(raw_boxes, dict):
            problem(f"{where}.mailbox", "must be a table of mailboxes", (*here, "mailbox"))
            raw_boxes = {}
        for address, options in raw_boxes.items():
            if not isinstance(options, dict):
                problem(f"{where}.mailbox.{address}", "must be a table",
                        (*here, "mailbox", address))
                continue
            entries.append((address, options, (*here, "mailbox", address), ""))
        for address, options, scope, needle in entries:
            key = f"{where}.mailbox.{address}"
            lookup = self.address(address, tenant_domains, key, scope, needle)
            if lookup is None:
                continue
            for option in options:
                if option not in MAILBOX_KEYS:
                    problem(f"{key}.{option}", "unknown key", (*scope, option))
            storage = options.get("storage")
            if storage is not None and not (isinstance(storage, str) and (
                    storage.startswith("unix:/")
                    or re.fullmatch(r"\[?[\w.:-]+\]?:\d+", storage))):
                problem(f"{key}.storage", "must be an LMTP endpoint host:port or unix:/path",
                        (*scope, "storage"))
                storage = None
            flags = {}
            for flag in ("disabled", "over_quota"):
                value = options.get(flag, False)
                if not isinstance(value, bool):
                    problem(f"{key}.{flag}", "must be true or false", (*scope, flag))
                    value = False
                flags[flag] = value
            autoreply = None
            if "autoreply" in options:
                autoreply = self.convert(options["autoreply"], Autoreply, f"{key}.autoreply",
                                         (*scope, "autoreply"))
            allow, block = (tuple(_list_of_str(options.get(name, []), f"{key}.{name}",
                                               (*scope, name), problem))
                            for name in ("spam_allow_senders", "spam_block_senders"))
            self.recipients[lookup] = Recipient(
                address=lookup, tenant=tenant_id, storage=storage, disabled=flags["disabled"],
                over_quota=flags["over_quota"], autoreply=autoreply,
                spam_allow_senders=allow, spam_block_senders=block)

    def redirects(self, tenant_id: str, kind: Literal["alias", "forward"], raw: Any,
                  tenant_domains: list[str]) -> None:
        where = f"tenant.{tenant_id}.{kind}"
        here: Scope = ("tenant", tenant_id, kind)
        if not isinstance(raw, dict):
            self.problem(where, f"must be a table of {kind}es", here)
            return
        allowed = {"targets", "keep_copy"} if kind == "forward" else {"targets"}
        for address, options in raw.items():
            key, scope = f"{where}.{address}", (*here, address)
            if not isinstance(options, dict):
                self.problem(key, "must be a table", scope)
                continue
            lookup = self.address(address, tenant_domains, key, scope)
            if lookup is None:
                continue
            for option in options:
                if option not in allowed:
                    self.problem(f"{key}.{option}", "unknown key", (*scope, option))
            targets: list[str] = []
            for target in _list_of_str(options.get("targets", []), f"{key}.targets",
                                       (*scope, "targets"), self.problem):
                local, at, domain = target.rpartition("@")
                try:
                    if not at or not local or not domain:
                        raise UnicodeError
                    targets.append(f"{normalise_local(local)}@{normalise_domain(domain)}")
                except UnicodeError:
                    self.problem(f"{key}.targets", f"{target!r} is not an address",
                                 (*scope, "targets"), target)
            if not targets:
                self.problem(f"{key}.targets", "needs at least one target address", scope)
                continue
            keep_copy = options.get("keep_copy", False)
            if not isinstance(keep_copy, bool):
                self.problem(f"{key}.keep_copy", "must be true or false", (*scope, "keep_copy"))
                keep_copy = False
            self.recipients[lookup] = Recipient(address=lookup, tenant=tenant_id, kind=kind,
                                                targets=tuple(targets), keep_copy=keep_copy)

    def domain_tables(self, tenant_id: str, raw: Any, tenant_domains: list[str],
                      policy: Policy) -> None:
        where = f"tenant.{tenant_id}.domain"
        here: Scope = ("tenant", tenant_id, "domain")
        for domain in tenant_domains:
            self.domain_info[domain] = DomainInfo(domain=domain, tenant=tenant_id, policy=policy)
            self.dkim[domain] = DkimKeys(domain=domain)
        if not isinstance(raw, dict):
            self.problem(where, "must be a table of domains", here)
            return
        for name, options in raw.items():
            key, scope = f"{where}.{name}", (*here, name)
            try:
                domain = normalise_domain(name)
            except UnicodeError:
                domain = name
            if domain not in tenant_domains:
                self.problem(key, f"{name} is not one of this tenant's domains", scope)
                continue
            if not isinstance(options, dict):
                self.problem(key, "must be a table", scope)
                continue
            for option in options:
                if option not in DOMAIN_KEYS:
                    self.problem(f"{key}.{option}", "unknown key", (*scope, option))
            overrides = options.get("policy", {})
            if overrides:
                unknown = set(overrides) - POLICY_KEYS if isinstance(overrides, dict) else set()
                for name_ in sorted(unknown):
                    self.problem(f"{key}.policy.{name_}", "unknown key",
                                 (*scope, "policy", name_))
                if isinstance(overrides, dict) and not unknown:
                    merged = self.convert({**policy.as_mapping(), **overrides}, Policy,
                                          f"{key}.policy", (*scope, "policy"))
                    if merged is not None:
                        self.domain_info[domain] = DomainInfo(domain=domain, tenant=tenant_id,
                                                              policy=merged)
            if "catch_all" in options:
                target = options["catch_all"]
                local, at, tdomain = target.rpartition("@") if isinstance(target, str) else \
                    ("", "", "")
                if not at:
                    self.problem(f"{key}.catch_all", "must be a mailbox address",
                                 (*scope, "catch_all"))
                else:
                    self._catch_all_pending.append(
                        (domain, f"{normalise_local(local)}@{normalise_domain(tdomain)}",
                         f"{key}.catch_all", (*scope, "catch_all")))
            dkim = options.get("dkim", {})
            if not isinstance(dkim, dict):
                self.problem(f"{key}.dkim", "must be a table of selectors", (*scope, "dkim"))
                continue
            keys = [k for k in (self.dkim_key(selector, spec, f"{key}.dkim.{selector}",
                                              (*scope, "dkim", selector))
                                for selector, spec in dkim.items()) if k is not None]
            if keys:
                self.dkim[domain] = DkimKeys(domain=domain, keys=tuple(keys))

    def dkim_key(self, selector: str, spec: Any, key: str, scope: Scope) -> DkimKey | None:
        if not isinstance(spec, dict):
            self.problem(key, "must be a table", scope)
            return None
        for option in spec:
            if option not in DKIM_KEYS:
                self.problem(f"{key}.{option}", "unknown key", (*scope, option))
        pem = spec.get("private_key")
        if "private_key_file" in spec:
            path = Path(str(spec["private_key_file"]))
            path = path if path.is_absolute() else self.base / path
            try:
                pem = path.read_text()
            except OSError as exc:
                self.problem(f"{key}.private_key_file", f"cannot read {path}: {exc.strerror}",
                             (*scope, "private_key_file"))
                return None
        if not isinstance(pem, str) or "PRIVATE KEY-----" not in pem:
            self.problem(key, "needs private_key (PEM) or private_key_file", scope)
            return None
        fields = {k: v for k, v in spec.items() if k in ("algorithm", "active")}
        return self.convert({"selector": selector, "private_key": pem, **fields}, DkimKey,
                            key, scope)

    def account_tables(self, tenant_id: str, raw: Any) -> None:
        where = f"tenant.{tenant_id}.account"
        here: Scope = ("tenant", tenant_id, "account")
        if not isinstance(raw, dict):
            self.problem(where, "must be a table of accounts", here)
            return
        for username, options in raw.items():
            key, scope = f"{where}.{username}", (*here, username)
            if not isinstance(options, dict):
                self.problem(key, "must be a table", scope)
                continue
            password = options.get("password")
            if not isinstance(password, str):
                self.problem(f"{key}.password",
                             "a password hash is required (mailedge hash-password)", scope)
                continue
            try:
                check_format(password)
            except BadHash as exc:
                self.problem(f"{key}.password", str(exc), (*scope, "password"))
                continue
            if username.lower() in self.accounts:
                self.problem(key, "account listed twice", scope)
                continue
            fields = {k: v for k, v in options.items() if k != "password"}
            account = self.convert({"username": username, "tenant": tenant_id, **fields},
                                   Account, key, scope)
            if account is not None:
                self.accounts[username.lower()] = StoredAccount(account, password)


class FileDirectory:
    """TenantDirectory backed by a TOML file, reloaded when it changes."""

    def __init__(self, path: Path, *, reload_interval: float = 2.0) -> None:
        self.path = path
        self.reload_interval = reload_interval
        self._mtime = self._stat()  # before reading: a change while reading is seen later
        self._snapshot = self._load()
        self._checked = time.monotonic()
        self.events: list[Event] = []

    def _stat(self) -> tuple[int, int, int]:
        """What tells a changed file: nanosecond mtime, size and inode (an editor that
        replaces the file, or two edits within one coarse timestamp, still show)."""
        try:
            st = self.path.stat()
        except OSError:
            return (-1, -1, -1)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> _Snapshot:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidData([("(file)", None, f"cannot read {self.path}: {exc.strerror}")]) \
                from None
        return parse_tenants(text, self.path.parent)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_interval:
            return
        self._checked = now
        mtime = self._stat()
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            self._snapshot = self._load()
            log.info("tenant directory reloaded from %s", self.path)
        except InvalidData as exc:
            log.error("tenant directory reload failed, keeping the previous data:\n%s",
                      exc.render(str(self.path)))

    async def lookup_recipient(self, local: str, domain: str) -> Recipient | Unknown:
        self._maybe_reload()
        snapshot = self._snapshot
        tenant = snapshot.domains.get(domain)
        if tenant is None:
            return Unknown(tenant=None)
        found = snapshot.recipients.get(f"{local}@{domain}")
        if found is not None:
            return found
        target = snapshot.catch_all.get(domain)
        if target is not None:
            mailbox = snapshot.recipients[target]
            return msgspec.structs.replace(mailbox, kind="catch_all")
        return Unknown(tenant=tenant)

    async def tenant(self, tenant_id: str) -> Tenant | None:
        self._maybe_reload()
        return self._snapshot.tenants.get(tenant_id)

    async def domain(self, domain: str) -> DomainInfo | None:
        self._maybe_reload()
        return self._snapshot.domain_info.get(domain)

    async def authenticate(self, username: str, password: str, *, mechanism: str,
                           client_ip: str) -> Account | None:
        self._maybe_reload()
        stored = self._snapshot.accounts.get(username.lower())
        if stored is None:
            # Same work as a wrong password, so timing does not tell who exists.
            await verify_password_async(password, _DUMMY_HASH)
            return None
        if await verify_password_async(password, stored.password_hash):
            return stored.account
        return None

    def account(self, username: str) -> Account | None:
        self._maybe_reload()
        stored = self._snapshot.accounts.get(username.lower())
        return None if stored is None else stored.account

    async def sender_allowed(self, username: str, sender: str) -> bool:
        account = self.account(username)
        return account is not None and account.may_send_as(sender)

    async def dkim_keys(self, domain: str) -> DkimKeys:
        self._maybe_reload()
        return self._snapshot.dkim.get(domain) or DkimKeys(domain=domain)

    async def account_limits(self, username: str) -> Limits:
        account = self.account(username)
        return Limits() if account is None else account.limits

    async def tenant_limits(self, tenant_id: str) -> Limits:
        self._maybe_reload()
        return self._snapshot.tenant_limits.get(tenant_id) or Limits()

    async def report(self, event: Event) -> None:
        # No provider behind a file: the event is logged for the operator, and kept.
        self.events.append(event)
        del self.events[:-1000]
        log.warning("tenant event %s: tenant=%s account=%s %s", event.type, event.tenant,
                    event.account or "-", event.reason)

    def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


# A real scrypt hash of a random password, for constant-time refusals.
_DUMMY_HASH = hash_password(secrets.token_hex(8))


__all__ = ["FileDirectory", "Unavailable", "normalise_domain", "normalise_local",
           "parse_tenants"]
