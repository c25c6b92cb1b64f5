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
import time
import tomllib
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenant_api_client.errors import InvalidData, Unavailable
from tenant_api_client.models import Recipient, Tenant, TenantPolicy, Unknown

log = logging.getLogger(__name__)

TENANT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAILBOX_KEYS = {"storage", "disabled", "over_quota"}
TENANT_KEYS = {"name", "domains", "mailboxes", "mailbox", "policy"}
POLICY_KEYS = {"max_message_size", "rejected_copies"}


def normalise_domain(domain: str) -> str:
    """Lowercase A-label form of a domain (IDNA 2003 codec, see docs)."""
    domain = unicodedata.normalize("NFC", domain).lower().rstrip(".")
    if domain.isascii():
        return domain
    return domain.encode("idna").decode("ascii")


def normalise_local(local: str) -> str:
    return unicodedata.normalize("NFC", local).casefold()


@dataclass(frozen=True, slots=True)
class _Snapshot:
    tenants: dict[str, Tenant]
    domains: dict[str, str]
    recipients: dict[str, Recipient]


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


def parse_tenants(text: str) -> _Snapshot:
    """Validate the whole tenants file; raise InvalidData listing every problem."""
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

    tenants: dict[str, Tenant] = {}
    domains: dict[str, str] = {}
    recipients: dict[str, Recipient] = {}
    for tenant_id, body in raw_tenants.items():
        where = f"tenant.{tenant_id}"
        here: Scope = ("tenant", tenant_id)
        if not TENANT_ID_RE.match(tenant_id):
            problem(where, "tenant id must be letters, digits, '_', '.', '-'", here)
            continue
        if not isinstance(body, dict):
            problem(where, "must be a table", here)
            continue
        for key in body:
            if key not in TENANT_KEYS:
                problem(f"{where}.{key}", "unknown key", (*here, key))
        tenant_domains: list[str] = []
        for domain in _list_of_str(body.get("domains", []), f"{where}.domains",
                                   (*here, "domains"), problem):
            try:
                norm = normalise_domain(domain)
            except UnicodeError:
                problem(f"{where}.domains", f"{domain!r} is not a valid domain",
                        (*here, "domains"), domain)
                continue
            if norm in domains and domains[norm] != tenant_id:
                problem(f"{where}.domains",
                        f"{domain} already belongs to tenant {domains[norm]}",
                        (*here, "domains"), domain)
                continue
            domains[norm] = tenant_id
            tenant_domains.append(norm)
        if not tenant_domains:
            problem(f"{where}.domains", "a tenant needs at least one domain", here)
        policy = _policy(body.get("policy", {}), f"{where}.policy", (*here, "policy"), problem)
        tenants[tenant_id] = Tenant(id=tenant_id, name=str(body.get("name", "")),
                                    domains=tuple(tenant_domains), policy=policy)

        # (address, options, where in the file: scope and needle)
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
            local, at, domain = address.rpartition("@")
            if not at or not local or not domain:
                problem(key, "must be a full address local@domain", scope, needle)
                continue
            try:
                lookup = f"{normalise_local(local)}@{normalise_domain(domain)}"
            except UnicodeError:
                problem(key, "domain is not valid", scope, needle)
                continue
            if lookup.rpartition("@")[2] not in tenant_domains:
                problem(key, f"domain {domain} is not one of this tenant's domains", scope,
                        needle)
                continue
            if lookup in recipients:
                problem(key, "mailbox listed twice", scope, needle)
                continue
            for option in options:
                if option not in MAILBOX_KEYS:
                    problem(f"{key}.{option}", "unknown key", (*scope, option))
            storage = options.get("storage")
            if storage is not None and not (isinstance(storage, str) and (
                    storage.startswith("unix:/") or re.fullmatch(r"\[?[\w.:-]+\]?:\d+", storage))):
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
            recipients[lookup] = Recipient(address=lookup, tenant=tenant_id, storage=storage,
                                           disabled=flags["disabled"],
                                           over_quota=flags["over_quota"])
    if problems:
        raise InvalidData(problems)
    return _Snapshot(tenants=tenants, domains=domains, recipients=recipients)


def _list_of_str(value: Any, key: str, scope: Scope, problem: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problem(key, "must be a list of strings", scope)
        return []
    return list(value)


def _policy(raw: Any, key: str, scope: Scope, problem: Any) -> TenantPolicy:
    if not isinstance(raw, dict):
        problem(key, "must be a table", scope)
        return TenantPolicy()
    for option in raw:
        if option not in POLICY_KEYS:
            problem(f"{key}.{option}", "unknown key", (*scope, option))
    size = raw.get("max_message_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        problem(f"{key}.max_message_size", "must be a positive integer (bytes)",
                (*scope, "max_message_size"))
        size = None
    copies = raw.get("rejected_copies", "quarantine")
    if copies not in ("quarantine", "discard"):
        problem(f"{key}.rejected_copies", "must be 'quarantine' or 'discard'",
                (*scope, "rejected_copies"))
        copies = "quarantine"
    return TenantPolicy(max_message_size=size, rejected_copies=copies)


class FileDirectory:
    """TenantDirectory backed by a TOML file, reloaded when it changes."""

    def __init__(self, path: Path, *, reload_interval: float = 2.0) -> None:
        self.path = path
        self.reload_interval = reload_interval
        self._mtime = self._stat()  # before reading: a change while reading is seen later
        self._snapshot = self._load()
        self._checked = time.monotonic()

    def _stat(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return -1.0

    def _load(self) -> _Snapshot:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidData([("(file)", None, f"cannot read {self.path}: {exc.strerror}")]) \
                from None
        return parse_tenants(text)

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
            return Unknown()
        found = snapshot.recipients.get(f"{local}@{domain}")
        return found if found is not None else Unknown(tenant=tenant)

    async def tenant(self, tenant_id: str) -> Tenant | None:
        self._maybe_reload()
        return self._snapshot.tenants.get(tenant_id)

    def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


__all__ = ["FileDirectory", "Unavailable", "normalise_domain", "normalise_local",
           "parse_tenants"]
