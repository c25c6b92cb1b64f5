"""The durable spool: a message is ours only once it is on disk and synced.

Theory of operation
-------------------
Each accepted message is one file, `queue/<id>.msg`: a short header line, the
envelope record (JSON), and the message bytes exactly as they will be delivered.
Writing it goes:

    tmp/<id>  write  → fsync(file) → close → rename to queue/<id>.msg → fsync(queue/)

and only when the directory sync that covers the rename has finished does `commit`
return, so the SMTP reply 250 is sent after the data and its name are both durable.

Group commit: file writes and their fsyncs run concurrently in a few threads
(gateway/spool_threads.py, which hands calls over in batches; the file system's
journal merges concurrent syncs), and one directory fsync covers every
rename that finished before it started. A commit waits for the first directory sync
that *started after* its own rename; whoever arrives while one is running waits for
the next, which then covers all of them. So N messages arriving together cost N file
syncs in parallel plus one or two directory syncs, never fewer syncs than that.

Delivery progress lives beside the message in `queue/<id>.state`, an append-only
log of records ("done <n>", "failed <n> ...", "attempt ..."), synced on each append,
so a restart neither loses a failure nor delivers a finished recipient again.

Every file operation goes through `SpoolFS`, one small seam, so a test can record
their order and check that no 250 precedes the syncs of its message.

A full disk (ENOSPC, EDQUOT) raises `SpoolFull`; the half-written temporary file is
removed, and nothing that was not completely written is ever renamed into queue/.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import msgspec

from gateway.ownership import SlotOwnership
from gateway.spool_threads import BatchThreads

log = logging.getLogger(__name__)
R = TypeVar("R")

MAGIC = b"MAILEDGE-SPOOL 1 "
SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class SpoolError(Exception):
    """The spool could not take the message; the sender must try again later."""


class SpoolFull(SpoolError):
    """No space left for the spool."""


class CorruptEntry(SpoolError):
    """A spool file that cannot be read back (kept aside, never delivered)."""


class SpoolRecipient(msgspec.Struct, frozen=True, kw_only=True):
    address: str  # as the client gave it at RCPT (for DSNs: Original-Recipient)
    mailbox: str  # the directory's lookup key; what the storage is asked for
    tenant: str
    kind: str = "mailbox"  # "mailbox" (local storage) or "remote" (outbound, e.g. a DSN)


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    sender: str
    recipients: tuple[SpoolRecipient, ...]
    received: float  # unix time of acceptance
    client_ip: str = ""
    helo: str = ""
    smtputf8: bool = False
    eight_bit: bool = False
    spam: bool = False  # scored as spam: never bounced
    dsn: bool = False  # this message is itself a DSN: never bounced
    header_size: int = 0  # bytes of the message up to and including the blank line


class StateRecord(msgspec.Struct, frozen=True, kw_only=True, tag_field="t"):
    pass


class Done(StateRecord, frozen=True, kw_only=True, tag="done"):
    index: int
    code: int
    status: str
    text: str
    at: float


class Failed(StateRecord, frozen=True, kw_only=True, tag="failed"):
    index: int
    code: int
    status: str
    text: str
    remote: str
    at: float


class Attempt(StateRecord, frozen=True, kw_only=True, tag="attempt"):
    at: float
    next_at: float
    count: int
    last_error: str = ""


class Dropped(StateRecord, frozen=True, kw_only=True, tag="dropped"):
    """An operator deleted the message, or DSNs for it are complete: delete on sight."""

    at: float
    reason: str


_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(Done | Failed | Attempt | Dropped)
_envelope_encoder = msgspec.json.Encoder()
_envelope_decoder = msgspec.json.Decoder(Envelope)


class SpoolFS:
    """The only place the spool touches the file system (blocking; run in threads)."""

    def __init__(self, fsync: bool = True) -> None:
        self.fsync_enabled = fsync

    def write_synced(self, path: Path, chunks: Sequence[bytes]) -> None:
        """Create `path`, write the chunks, fsync, close. Removes the file on failure."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # One writev for all chunks: each system call here also hands the GIL
            # back and forth with the event loop. A short write finishes chunk by chunk.
            written = os.writev(fd, chunks)
            for chunk in chunks:
                if written >= len(chunk):
                    written -= len(chunk)
                    continue
                view = memoryview(chunk)[written:]
                written = 0
                while view:
                    view = view[os.write(fd, view):]
            if self.fsync_enabled:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.unlink(path)
            raise
        os.close(fd)

    def rename(self, source: Path, target: Path) -> None:
        os.rename(source, target)

    def fsync_dir(self, path: Path) -> None:
        if not self.fsync_enabled:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def append_synced(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:  # a short write must not return as if the record were on disk
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync_enabled:
                os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def read(self, path: Path) -> bytes:
        return path.read_bytes()


class QueueIdFactory:
    """Queue ids unique across the cluster: time, process, counter, worker slot, node.

    Example: `0633A6E2F1C40-1F2A-0001B.mx1`, or `0633A6E2F1C40-1F2A-0001B-w1.mx1` from
    worker slot 1 (gateway/ownership.py: the slot says which worker owns the message).
    Sorting ids sorts by arrival time.
    """

    def __init__(self, node: str, slot: int = 0) -> None:
        self.node = node
        self._suffix = f"-w{slot}" if slot else ""
        self._counter = secrets.randbelow(0xFFFFF)
        self._lock = threading.Lock()

    def new(self) -> str:
        with self._lock:
            self._counter = (self._counter + 1) & 0xFFFFF
            counter = self._counter
        micros = time.time_ns() // 1000
        return (f"{micros:013X}-{os.getpid() & 0xFFFF:04X}-{counter:05X}{self._suffix}"
                f".{self.node}")


class Spool:
    """The node's spool directory; see the module docstring for the protocol."""

    def __init__(self, root: Path, *, fs: SpoolFS | None = None, threads: int = 4,
                 owner: SlotOwnership | None = None) -> None:
        self.root = root
        self.fs = fs or SpoolFS()
        # With several workers on this spool, recovery and clean-up touch only the
        # messages this process owns; None (tools, tests) sees every message.
        self.owner = owner
        self.tmp_dir = root / "tmp"
        self.queue_dir = root / "queue"
        self.corrupt_dir = root / "corrupt"
        for directory in (self.tmp_dir, self.queue_dir, self.corrupt_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._threads = BatchThreads(threads, "spool")
        # Group commit bookkeeping (event loop thread only).
        self._renamed = 0  # renames completed so far (a sequence number)
        self._synced = 0  # renames covered by a finished directory sync
        self._dir_sync: asyncio.Future[None] | None = None

    async def _run(self, fn: Callable[..., R], *args: object) -> R:
        return await self._threads.run(fn, *args)

    def msg_path(self, queue_id: str) -> Path:
        return self.queue_dir / f"{queue_id}.msg"

    def state_path(self, queue_id: str) -> Path:
        return self.queue_dir / f"{queue_id}.state"

    async def commit(self, envelope: Envelope, message: bytes) -> None:
        """Write, sync and publish one message; return only once it is durable."""
        record = _envelope_encoder.encode(envelope)
        header = MAGIC + str(len(record)).encode() + b"\n"
        tmp = self.tmp_dir / envelope.id
        target = self.msg_path(envelope.id)
        try:
            await self._run(self._write_and_rename, tmp, target, (header, record, b"\n", message))
        except OSError as exc:
            if exc.errno in SPACE_ERRNOS:
                raise SpoolFull(str(exc)) from None
            raise SpoolError(str(exc)) from None
        self._renamed += 1
        await self._sync_queue_dir(self._renamed)

    def _write_and_rename(self, tmp: Path, target: Path, chunks: Sequence[bytes]) -> None:
        self.fs.write_synced(tmp, chunks)
        self.fs.rename(tmp, target)

    async def _sync_queue_dir(self, sequence: int) -> None:
        """Wait until a directory sync that started after rename `sequence` has finished."""
        while self._synced < sequence:
            if self._dir_sync is None:
                self._dir_sync = asyncio.ensure_future(self._dir_sync_round())
            try:
                await asyncio.shield(self._dir_sync)
            except OSError as exc:
                raise SpoolError(f"directory sync failed: {exc}") from None

    async def _dir_sync_round(self) -> None:
        """One directory fsync covering every rename finished before it started.

        The bookkeeping happens inside this task, so whoever wakes up after it sees
        `_synced` already advanced and `_dir_sync` free for the next round.
        """
        covered = self._renamed
        try:
            await self._run(self.fs.fsync_dir, self.queue_dir)
            self._synced = max(self._synced, covered)
        finally:
            self._dir_sync = None

    async def append_state(self, queue_id: str, *records: StateRecord) -> None:
        """Append records to the message's state log with one synced write."""
        # The leading newline ends a torn line a crash may have left at the end of the
        # log, so that fragment cannot swallow these records (readers skip empty lines).
        data = b"\n" + b"".join(_record_encoder.encode(record) + b"\n" for record in records)
        await self._run(self.fs.append_synced, self.state_path(queue_id), data)

    async def remove(self, queue_id: str, *, state: bool = True) -> None:
        """Forget a finished message: the message first, then its state log.

        `state=False` says no state log was ever written for it (the caller knows: a
        message delivered at its first attempt), which saves a failing unlink.
        """
        await self._run(self._remove, queue_id, state)

    def _remove(self, queue_id: str, state: bool = True) -> None:
        self.fs.unlink(self.msg_path(queue_id))
        if state:
            self.fs.unlink(self.state_path(queue_id))

    def remove_sync(self, queue_id: str) -> None:
        self._remove(queue_id)

    async def load(self, queue_id: str) -> tuple[Envelope, bytes]:
        return await self._run(self.load_sync, queue_id)

    def load_sync(self, queue_id: str) -> tuple[Envelope, bytes]:
        return parse_entry(self.fs.read(self.msg_path(queue_id)), queue_id)

    def load_state_sync(self, queue_id: str) -> list[StateRecord]:
        try:
            raw = self.fs.read(self.state_path(queue_id))
        except FileNotFoundError:
            return []
        records: list[StateRecord] = []
        for line in raw.split(b"\n"):
            if not line:
                continue
            try:
                records.append(_record_decoder.decode(line))
            except msgspec.DecodeError:
                # A torn last line after a crash: that append never returned, so its
                # outcome was never acted on. Ignoring it means at worst a retry.
                log.warning("spool: ignoring unreadable state line in %s", queue_id)
        return records

    def queued_ids(self, *, clean: bool = True) -> Iterator[str]:
        """Every committed message this process owns (all without an owner), oldest first.

        With `clean` (the node's recovery at start-up, when nothing else writes the
        owned slots) leftovers in tmp/ and state files without a message are removed;
        an inspection that may run beside a live node passes clean=False.
        """
        owns = self.owner.owns if self.owner is not None else (lambda _id: True)
        names = sorted(p.name for p in self.queue_dir.iterdir())
        msg_ids = {n[:-4] for n in names if n.endswith(".msg") and owns(n[:-4])}
        if clean:
            for leftover in self.tmp_dir.iterdir():
                if owns(leftover.name):
                    self.fs.unlink(leftover)
            for name in names:
                if name.endswith(".state") and owns(name[:-6]) and name[:-6] not in msg_ids:
                    self.fs.unlink(self.queue_dir / name)  # its message was already removed
        yield from sorted(msg_ids)

    def quarantine_corrupt(self, queue_id: str) -> None:
        for path in (self.msg_path(queue_id), self.state_path(queue_id)):
            if path.exists():
                os.replace(path, self.corrupt_dir / path.name)

    def close(self) -> None:
        self._threads.close()


def parse_entry(raw: bytes, queue_id: str) -> tuple[Envelope, bytes]:
    if not raw.startswith(MAGIC):
        raise CorruptEntry(f"{queue_id}: not a spool file")
    newline = raw.find(b"\n", len(MAGIC))
    try:
        length = int(raw[len(MAGIC):newline])
        start = newline + 1
        envelope = _envelope_decoder.decode(raw[start:start + length])
    except (ValueError, msgspec.DecodeError) as exc:
        raise CorruptEntry(f"{queue_id}: bad envelope: {exc}") from None
    body_start = start + length + 1
    return envelope, raw[body_start:]
