"""Local delivery into Maildir folders: the embedded default mailbox store.

With no LMTP backend configured, accepted mail for a recipient ``local@domain`` is stored
in the Maildir ``<root>/<domain>/<local>/`` so that ``mailedge run`` works on a fresh
machine (any IMAP server that reads Maildir, Dovecot included, can serve it later). The
caller passes normalised addresses (lowercase domain, case-folded local part).

Theory of operation, per recipient (the Maildir protocol, as qmail defined it):

1. Create ``tmp/``, ``new/`` and ``cur/`` (mode 0700) if the folder does not exist yet,
   fsyncing the parent of every directory created so the folder itself is durable.
2. Write the message to ``tmp/<unique>`` (``O_CREAT|O_EXCL``, mode 0600) and fsync it.
   ``<unique>`` is ``<seconds>.M<usec>P<pid>Q<counter>.<hostname>,S=<size>,W=<vsize>``:
   unique per host by time, process and a per-process counter; ``S`` is the file size
   (Maildir++) and ``W`` the size with CRLF line ends (a Dovecot extension that spares it
   reading the file to answer RFC822.SIZE).
3. Rename it into ``new/`` and fsync ``new/``. Only then does the recipient count as
   delivered. A recipient group shares the directory syncs: every file is written and
   renamed first, then each distinct ``new/`` directory is fsynced once.

What is stored: like a local delivery agent (Postfix local, Dovecot LDA), two lines are
prepended to the message, ``Return-Path: <sender>`` (the envelope sender, ``<>`` for the
null sender) and ``Delivered-To: <recipient>``, and line ends are stored as LF, the Unix
mailbox convention that Maildir readers expect. The spooled message is not changed.

Failures never leave a file in ``new/`` that the agent has not reported as delivered:
the temporary file is removed on any error, and if the final directory fsync fails the
renamed files in that directory are removed again and the recipients get a 4xx (a retry
must not produce a duplicate that was never durable anyway). Disk full or over quota
(ENOSPC, EDQUOT) is 452 4.3.1, any other OS error 451 4.3.0, both retried by the queue.
Addresses that could escape the root (a ``/`` or NUL byte, ``.``/``..``, a leading dot,
control characters) are refused with 550 5.1.3.

All file work for one job runs in one ``asyncio.to_thread`` call, so the event loop never
blocks on the disk. :func:`_write_all` is the single function that writes message bytes;
tests replace it to inject faults.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.delivery import DeliveryJob, Outcome

__all__ = ["MaildirAgent"]

log = logging.getLogger(__name__)

REMOTE = "maildir"
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_NAME_MAX = 255  # octets in one path component on common filesystems
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

_counter_lock = threading.Lock()
_counter = 0


def _next_counter() -> int:
    global _counter
    with _counter_lock:
        _counter += 1
        return _counter


def _safe_hostname() -> str:
    """The host name as the Maildir spec wants it in file names ('/' and ':' escaped)."""
    name = socket.gethostname() or "localhost"
    return name.replace("/", "\\057").replace(":", "\\072")


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``: the one place message bytes reach the disk."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_part(part: str) -> bool:
    """Whether one address part can safely be a directory name under the root."""
    if not part or part in (".", "..") or part.startswith("."):
        return False
    if any(ch in part for ch in "/\0") or any(ord(ch) < 32 or ord(ch) == 127 for ch in part):
        return False
    try:
        encoded = part.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return len(encoded) <= _NAME_MAX


def _refused(reason: str) -> Outcome:
    return Outcome(550, "5.1.3", reason, REMOTE)


def _os_error_outcome(exc: OSError) -> Outcome:
    if exc.errno in _FULL_ERRNOS:
        return Outcome(452, "4.3.1", "Insufficient mailbox storage, try again later", REMOTE)
    return Outcome(451, "4.3.0", "Local mailbox storage error, try again later", REMOTE)


@dataclass
class _Item:
    """One recipient's delivery inside a job, filled in as the steps run."""

    index: int
    address: str
    folder: Path
    data: bytes
    tmp_path: Path | None = None
    new_path: Path | None = None
    outcome: Outcome | None = None
    name: str = field(default="")


class MaildirAgent:
    """Delivers each recipient to ``<root>/<domain>/<local>/`` as a Maildir message."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._hostname = _safe_hostname()

    async def deliver(self, job: DeliveryJob) -> list[Outcome]:
        """One outcome per recipient, in order; never raises for delivery problems."""
        if not job.recipients:
            return []
        if any(ch in job.sender for ch in "\r\n\0"):
            return [
                Outcome(550, "5.1.7", "Invalid sender address", REMOTE) for _ in job.recipients
            ]
        return await asyncio.to_thread(self._deliver_sync, job.sender, job.recipients,
                                       job.message)

    async def aclose(self) -> None:
        """Nothing to release: every delivery opens and closes its own files."""

    # -- blocking part, runs in a worker thread ------------------------------------------

    def _deliver_sync(
        self, sender: str, recipients: Sequence[str], message: bytes
    ) -> list[Outcome]:
        body = message.replace(b"\r\n", b"\n")
        items: list[_Item] = []
        outcomes: list[Outcome | None] = [None] * len(recipients)
        for index, address in enumerate(recipients):
            local, at, domain = address.rpartition("@")
            if not at or not _check_part(local) or not _check_part(domain):
                outcomes[index] = _refused("Invalid mailbox name")
                continue
            prefix = f"Return-Path: <{sender}>\nDelivered-To: {address}\n".encode(
                "utf-8", errors="replace"
            )
            items.append(_Item(index, address, self.root / domain / local, prefix + body))

        for item in items:
            self._write_tmp(item)
        for item in items:
            if item.outcome is None:
                self._rename_into_new(item)
        self._sync_new_dirs([item for item in items if item.outcome is None])

        for item in items:
            outcomes[item.index] = item.outcome or Outcome(
                250, "2.0.0", f"Delivered to maildir as {item.name}", REMOTE
            )
        return [outcome for outcome in outcomes if outcome is not None]

    def _unique_name(self, size: int, vsize: int) -> str:
        now = time.time()
        seconds = int(now)
        usec = int((now - seconds) * 1_000_000)
        counter = _next_counter()
        pid = os.getpid()  # not cached: worker processes may be forked after __init__
        return f"{seconds}.M{usec}P{pid}Q{counter}.{self._hostname},S={size},W={vsize}"

    def _write_tmp(self, item: _Item) -> None:
        vsize = len(item.data) + item.data.count(b"\n")
        item.name = self._unique_name(len(item.data), vsize)
        tmp_path = item.folder / "tmp" / item.name
        try:
            try:
                fd = self._open_new_file(tmp_path)
            except FileNotFoundError:
                self._make_maildir(item.folder)
                fd = self._open_new_file(tmp_path)
        except OSError as exc:
            log.warning("maildir: cannot create %s: %s", tmp_path, exc)
            item.outcome = _os_error_outcome(exc)
            return
        item.tmp_path = tmp_path
        try:
            try:
                _write_all(fd, item.data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("maildir: writing %s failed: %s", tmp_path, exc)
            item.outcome = _os_error_outcome(exc)
            self._discard(item)

    def _rename_into_new(self, item: _Item) -> None:
        assert item.tmp_path is not None
        new_path = item.folder / "new" / item.name
        try:
            try:
                os.rename(item.tmp_path, new_path)
            except FileNotFoundError:  # new/ was removed behind our back: recreate it
                self._make_maildir(item.folder)
                os.rename(item.tmp_path, new_path)
        except OSError as exc:
            log.warning("maildir: moving %s into new/ failed: %s", item.tmp_path, exc)
            item.outcome = _os_error_outcome(exc)
            self._discard(item)
            return
        item.tmp_path = None
        item.new_path = new_path

    def _sync_new_dirs(self, items: Sequence[_Item]) -> None:
        if not self.fsync:
            return
        by_dir: dict[Path, list[_Item]] = {}
        for item in items:
            by_dir.setdefault(item.folder / "new", []).append(item)
        for directory, members in by_dir.items():
            try:
                _fsync_dir(directory)
            except OSError as exc:
                log.warning("maildir: fsync of %s failed: %s", directory, exc)
                for item in members:
                    item.outcome = _os_error_outcome(exc)
                    self._discard(item)

    def _open_new_file(self, path: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(path, flags, _FILE_MODE)

    def _make_maildir(self, folder: Path) -> None:
        """Create the folder and its cur/new/tmp, fsyncing each created entry's parent.

        tmp/ comes last: a concurrent delivery that finds tmp/ may rely on new/ existing.
        """
        for sub in ("cur", "new", "tmp"):
            self._make_dirs(folder / sub)

    def _make_dirs(self, path: Path) -> None:
        missing: list[Path] = []
        probe = path
        while not probe.is_dir():
            missing.append(probe)
            if probe.parent == probe:
                break
            probe = probe.parent
        for directory in reversed(missing):
            try:
                os.mkdir(directory, _DIR_MODE)
            except FileExistsError:  # a concurrent delivery was faster
                if not directory.is_dir():
                    raise
            if self.fsync:
                _fsync_dir(directory.parent)

    def _discard(self, item: _Item) -> None:
        """Remove whatever file the item left behind (tmp or new); best effort."""
        for path in (item.tmp_path, item.new_path):
            if path is None:
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("maildir: cannot remove %s: %s", path, exc)
        item.tmp_path = None
        item.new_path = None
