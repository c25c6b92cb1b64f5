"""Per-tenant quarantine on the node: copies accepted but held instead of delivered.

A copy lands here when a filter answered QUARANTINE for a tenant (spam over its
quarantine score, a virus under `virus_action = "quarantine"`, DMARC quarantine), or
when a tenant's checks refused a message that the transaction accepted for another
tenant (never bounced: that would be backscatter). Each entry is a spool-format file
(envelope + message), preceded in the message by an `X-Mailedge-Quarantine-Reason:`
line, written with the same durability as the queue before the 250:

    <spool>/quarantine/<tenant>/<id>.msg

Operators list, show, release and delete entries (`mailedge quarantine ...` or the
admin API). Release hands the message (without the reason line) to the queue as if it
had been accepted normally; entries older than the tenant's retention are purged.
Quarantine ids are the queue id of the copy with a `-q` suffix, unique per tenant.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from gateway.spool import MAGIC, CorruptEntry, Envelope, SpoolFS, parse_entry

log = logging.getLogger(__name__)

_SAFE_TENANT = re.compile(r"[^A-Za-z0-9_.-]")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
REASON_HEADER = b"X-Mailedge-Quarantine-Reason: "


class NotQuarantined(LookupError):
    """No such entry in that tenant's quarantine."""


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    tenant: str
    id: str
    envelope: Envelope
    reason: str
    size: int

    def summary(self) -> dict[str, object]:
        return {"tenant": self.tenant, "id": self.id, "sender": self.envelope.sender,
                "recipients": [r.address for r in self.envelope.recipients],
                "received": self.envelope.received, "reason": self.reason,
                "size": self.size}


def split_reason(message: bytes) -> tuple[str, bytes]:
    """(reason, the message as it was accepted) from a stored quarantine copy."""
    if message.startswith(REASON_HEADER):
        line, _, rest = message.partition(b"\r\n")
        return line[len(REASON_HEADER):].decode("ascii", "replace"), rest
    return "", message


class Quarantine:
    def __init__(self, root: Path, fs: SpoolFS) -> None:
        self.root = root
        self.fs = fs

    def _dir(self, tenant: str) -> Path:
        return self.root / _SAFE_TENANT.sub("_", tenant)

    def _path(self, tenant: str, entry_id: str) -> Path:
        if not _SAFE_ID.match(entry_id):
            raise NotQuarantined(entry_id)
        return self._dir(tenant) / f"{entry_id}.msg"

    async def store(self, tenant: str, envelope: Envelope, message: bytes, reason: str) -> Path:
        return await asyncio.to_thread(self._store, tenant, envelope, message, reason)

    def _store(self, tenant: str, envelope: Envelope, message: bytes, reason: str) -> Path:
        directory = self._dir(tenant)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        record = msgspec.json.encode(envelope)
        header = MAGIC + str(len(record)).encode() + b"\n"
        clean = re.sub(r"[\r\n]+", " ", reason)
        reason_line = REASON_HEADER + clean.encode("ascii", "replace")[:900] + b"\r\n"
        tmp = directory / f".{envelope.id}.tmp"
        target = directory / f"{envelope.id}.msg"
        self.fs.write_synced(tmp, (header, record, b"\n", reason_line, message))
        self.fs.rename(tmp, target)
        self.fs.fsync_dir(directory)
        return target

    def tenants(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def ids(self, tenant: str) -> list[str]:
        directory = self._dir(tenant)
        if not directory.is_dir():
            return []
        return sorted(p.name[:-4] for p in directory.glob("*.msg"))

    def load(self, tenant: str, entry_id: str) -> tuple[Envelope, bytes]:
        """The envelope and the stored bytes (reason line included)."""
        path = self._path(tenant, entry_id)
        try:
            raw = self.fs.read(path)
        except FileNotFoundError:
            raise NotQuarantined(f"{tenant}/{entry_id}") from None
        return parse_entry(raw, entry_id)

    def entry(self, tenant: str, entry_id: str) -> QuarantineEntry:
        envelope, stored = self.load(tenant, entry_id)
        reason, message = split_reason(stored)
        return QuarantineEntry(tenant, entry_id, envelope, reason, len(message))

    def entries(self, tenant: str | None = None) -> list[QuarantineEntry]:
        found = []
        for name in [tenant] if tenant is not None else self.tenants():
            for entry_id in self.ids(name):
                try:
                    found.append(self.entry(name, entry_id))
                except (NotQuarantined, CorruptEntry) as exc:
                    log.warning("quarantine %s/%s unreadable: %s", name, entry_id, exc)
        return found

    def delete(self, tenant: str, entry_id: str) -> None:
        path = self._path(tenant, entry_id)
        if not path.exists():
            raise NotQuarantined(f"{tenant}/{entry_id}")
        self.fs.unlink(path)
        self.fs.fsync_dir(path.parent)

    def take(self, tenant: str, entry_id: str) -> tuple[Envelope, bytes]:
        """For release: the envelope and the message as it was accepted."""
        envelope, stored = self.load(tenant, entry_id)
        return envelope, split_reason(stored)[1]

    def purge(self, retention_days: dict[str, float], default_days: float,
              now: float | None = None) -> int:
        """Delete entries older than their tenant's retention; return how many."""
        now = time.time() if now is None else now
        removed = 0
        for entry in self.entries():
            days = retention_days.get(entry.tenant, default_days)
            if now - entry.envelope.received > days * 86400:
                self.delete(entry.tenant, entry.id)
                removed += 1
        if removed:
            log.info("quarantine: purged %d entr(y/ies) past retention", removed)
        return removed
