"""Per-tenant quarantine on the node: copies accepted but held instead of delivered.

A copy lands here when a tenant's checks refused a message that the transaction
accepted for another tenant (never bounced: that would be backscatter), or when a
filter answered QUARANTINE. Each entry is a spool-format file (envelope + message)
plus the reason, written with the same durability as the queue before the 250:
`<spool>/quarantine/<tenant>/<id>.msg`. Listing, release and retention arrive with
the content-security issue; the layout is stable for them.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from gateway.spool import Envelope, SpoolFS, parse_entry

_SAFE_TENANT = re.compile(r"[^A-Za-z0-9_.-]")


class Quarantine:
    def __init__(self, root: Path, fs: SpoolFS) -> None:
        self.root = root
        self.fs = fs

    def _dir(self, tenant: str) -> Path:
        return self.root / _SAFE_TENANT.sub("_", tenant)

    async def store(self, tenant: str, envelope: Envelope, message: bytes, reason: str) -> Path:
        return await asyncio.to_thread(self._store, tenant, envelope, message, reason)

    def _store(self, tenant: str, envelope: Envelope, message: bytes, reason: str) -> Path:
        import msgspec

        directory = self._dir(tenant)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        record = msgspec.json.encode(envelope)
        header = b"MAILEDGE-SPOOL 1 " + str(len(record)).encode() + b"\n"
        reason_line = b"X-Mailedge-Quarantine-Reason: " + reason.encode(
            "ascii", "replace")[:900] + b"\r\n"
        tmp = directory / f".{envelope.id}.tmp"
        target = directory / f"{envelope.id}.msg"
        self.fs.write_synced(tmp, (header, record, b"\n", reason_line, message))
        self.fs.rename(tmp, target)
        self.fs.fsync_dir(directory)
        return target

    def list(self, tenant: str) -> list[str]:
        directory = self._dir(tenant)
        if not directory.is_dir():
            return []
        return sorted(p.name[:-4] for p in directory.glob("*.msg"))

    def load(self, tenant: str, queue_id: str) -> tuple[Envelope, bytes]:
        return parse_entry((self._dir(tenant) / f"{queue_id}.msg").read_bytes(), queue_id)
