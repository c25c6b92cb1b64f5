"""Which messages of a shared spool belong to this process.

Several worker processes of one node share one spool. Every queue id names the slot
of the worker that wrote it (`QueueIdFactory(slot=k)` adds `-w<k>`; ids without it are
slot 0), and a process recovers, retries and cleans up only the messages of the slots
it owns: with N workers, worker k owns every slot s with s mod N == k, so a node
restarted with fewer workers still has an owner for each message.

Ownership is held with POSIX byte-range locks, one byte per slot, on
`<spool>/slots.lock`, for the life of the process. The kernel drops them when the
process dies, however it dies, so a restarted worker takes over exactly what its
predecessor held, and no two live processes can deliver the same message. A node of
one process owns every slot, which also keeps a second node off the same spool.

POSIX record locks belong to the process and are released when *any* descriptor of
the file is closed in it, so the lock file is opened here and nowhere else.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

SLOTS = 64  # the most workers a node can have (config: node.workers <= 64)


class SpoolBusy(Exception):
    """Another live process holds a slot this process must own."""


def slot_of(queue_id: str) -> int:
    """The ownership slot named by a queue id (0 for ids without a `-w<k>` field)."""
    fields = queue_id.split(".", 1)[0].split("-")
    if len(fields) == 4 and fields[3].startswith("w") and fields[3][1:].isdigit():
        return int(fields[3][1:]) % SLOTS
    return 0


class SlotOwnership:
    """The slots of worker `worker` of `workers`, locked by `acquire()`."""

    def __init__(self, spool_root: Path, worker: int = 0, workers: int = 1) -> None:
        if not 1 <= workers <= SLOTS or not 0 <= worker < workers:
            raise ValueError(f"worker {worker} of {workers}: out of range (1-{SLOTS})")
        self.path = spool_root / "slots.lock"
        self.worker = worker
        self.workers = workers
        self.slots = frozenset(s for s in range(SLOTS) if s % workers == worker)
        self._fd: int | None = None

    def acquire(self, timeout: float = 10.0) -> None:
        """Lock every owned slot, waiting up to `timeout` for a dying holder to go."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + timeout
        try:
            for slot in sorted(self.slots):
                while True:
                    try:
                        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
                        break
                    except OSError:  # EACCES or EAGAIN: held by another process
                        if time.monotonic() >= deadline:
                            raise SpoolBusy(
                                f"{self.path.parent}: another mailedge process holds spool "
                                f"slot {slot}; is a node already running on this spool?"
                            ) from None
                        time.sleep(0.05)
        except BaseException:
            os.close(fd)  # releases whatever was locked so far
            raise
        self._fd = fd

    def owns(self, queue_id: str) -> bool:
        return slot_of(queue_id) in self.slots

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
