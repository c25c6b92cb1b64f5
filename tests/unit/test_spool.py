"""The durable spool (gateway/spool.py): file format, state log, order of syncs, group commit.

"250 means durable" cannot be proven by killing the process (the page cache survives
kill -9), so these tests watch the spool's one file-system seam, `SpoolFS`, and check
the order of its operations against the moment `commit()` returns.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.spool import (
    Attempt,
    CorruptEntry,
    Done,
    Dropped,
    Envelope,
    Failed,
    QueueIdFactory,
    Spool,
    SpoolError,
    SpoolFS,
    SpoolFull,
    SpoolRecipient,
    parse_entry,
)

FACTORY = QueueIdFactory("mx1")


def envelope(queue_id: str | None = None, **overrides: object) -> Envelope:
    fields: dict[str, object] = {
        "id": queue_id or FACTORY.new(),
        "sender": "sender@example.org",
        "recipients": (
            SpoolRecipient(address="Alice+tag@Example.TEST", mailbox="alice@example.test",
                           tenant="acme"),
            SpoolRecipient(address="bob@example.net", mailbox="bob@example.net",
                           tenant="globex", kind="remote"),
        ),
        "received": 1_709_647_629.25,
        "client_ip": "2001:db8::1",
        "helo": "client.example.org",
        "smtputf8": True,
        "eight_bit": True,
        "header_size": 17,
    }
    fields.update(overrides)
    return Envelope(**fields)  # type: ignore[arg-type]


MESSAGE = (b"Subject: test\r\n\r\n"
           b"line one\r\n.\r\n..dots\r\nno final newline \xff\xfe\x00 bare\rCR bare\nLF")


@pytest.fixture
def spool_factory(tmp_path: Path) -> Iterator[Spool]:
    """Spools on tmp_path (one per call), closed at teardown."""
    made: list[Spool] = []

    def make(fs: SpoolFS | None = None, root: Path | None = None) -> Spool:
        spool = Spool(root or tmp_path / "spool", fs=fs)
        made.append(spool)
        return spool

    yield make  # type: ignore[misc]
    for spool in made:
        spool.close()


@pytest.fixture
def spool(spool_factory: object) -> Spool:
    return spool_factory()  # type: ignore[operator, no-any-return]


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- message files ---------------------------------------------------------------------------


async def test_commit_then_load_round_trips_exactly(spool: Spool) -> None:
    env = envelope()
    await spool.commit(env, MESSAGE)
    assert files(spool.queue_dir) == [f"{env.id}.msg"]
    assert files(spool.tmp_dir) == []
    loaded_env, loaded = spool.load_sync(env.id)
    assert loaded_env == env
    assert loaded == MESSAGE
    assert await spool.load(env.id) == (env, MESSAGE)


@settings(max_examples=50, deadline=None)
@given(message=st.binary(max_size=2000),
       sender=st.text(max_size=40),
       helo=st.text(max_size=40))
def test_entry_format_round_trips_any_bytes(tmp_path_factory: pytest.TempPathFactory,
                                            message: bytes, sender: str, helo: str) -> None:
    spool = Spool(tmp_path_factory.mktemp("spool"), fs=SpoolFS(fsync=False))
    try:
        env = envelope(sender=sender, helo=helo)
        asyncio.run(spool.commit(env, message))
        assert spool.load_sync(env.id) == (env, message)
    finally:
        spool.close()


async def test_empty_message_round_trips(spool: Spool) -> None:
    env = envelope(recipients=())
    await spool.commit(env, b"")
    assert spool.load_sync(env.id) == (env, b"")


async def test_commit_is_refused_for_an_existing_id(spool: Spool) -> None:
    env = envelope()
    await spool.commit(env, MESSAGE)
    (spool.tmp_dir / env.id).write_bytes(b"leftover")  # as if a crash left it
    with pytest.raises(SpoolError):
        await spool.commit(env, b"other")
    assert spool.load_sync(env.id) == (env, MESSAGE)


async def test_remove(spool: Spool) -> None:
    env = envelope()
    await spool.commit(env, MESSAGE)
    await spool.append_state(env.id, Attempt(at=1.0, next_at=2.0, count=1))
    await spool.remove(env.id)
    assert files(spool.queue_dir) == []
    await spool.remove(env.id)  # removing twice is harmless
    spool.remove_sync(env.id)


async def test_remove_without_state_log_skips_only_its_unlink(spool_factory: object) -> None:
    fs = RecordingFS(fsync=False)
    spool: Spool = spool_factory(fs)  # type: ignore[operator]

    def unlinked() -> list[str]:
        return [path.name for op, path in fs.ops if op == "unlink"]

    env = envelope()
    await spool.commit(env, MESSAGE)
    await spool.remove(env.id, state=False)
    assert unlinked() == [f"{env.id}.msg"]
    assert files(spool.queue_dir) == []
    logged = envelope()
    await spool.commit(logged, MESSAGE)
    await spool.append_state(logged.id, Attempt(at=1.0, next_at=2.0, count=1))
    await spool.remove(logged.id)
    assert unlinked()[1:] == [f"{logged.id}.msg", f"{logged.id}.state"]
    assert files(spool.queue_dir) == []


class ShortWritesFS(SpoolFS):
    """The kernel may write less than asked: here at most 7 bytes per call."""

    def write_synced(self, path: Path, chunks: Sequence[bytes]) -> None:
        real_write, real_writev = os.write, os.writev

        def short_write(fd: int, data: bytes) -> int:
            return real_write(fd, bytes(data[:7]))

        def short_writev(fd: int, buffers: Sequence[bytes]) -> int:
            return real_write(fd, b"".join(buffers)[:7])

        os.write, os.writev = short_write, short_writev  # type: ignore[assignment]
        try:
            super().write_synced(path, chunks)
        finally:
            os.write, os.writev = real_write, real_writev


async def test_short_writes_still_write_everything(spool_factory: object) -> None:
    spool: Spool = spool_factory(ShortWritesFS(fsync=False))  # type: ignore[operator]
    env = envelope()
    await spool.commit(env, MESSAGE)
    spool.fs = SpoolFS(fsync=False)
    loaded_env, loaded = await spool.load(env.id)
    assert loaded == MESSAGE and loaded_env == env


# -- the state log ---------------------------------------------------------------------------

RECORDS = [
    Attempt(at=10.0, next_at=70.0, count=1, last_error="451 4.4.3 backend down"),
    Done(index=0, code=250, status="2.0.0", text="Ok: queued as 123", at=11.5),
    Failed(index=1, code=550, status="5.1.1", text="no such user", remote="lmtp:[::1]:24",
           at=12.0),
    Dropped(at=13.0, reason="operator"),
]


async def test_state_log_append_and_replay(spool: Spool) -> None:
    env = envelope()
    await spool.commit(env, MESSAGE)
    assert spool.load_state_sync(env.id) == []
    await spool.append_state(env.id, RECORDS[0])
    await spool.append_state(env.id, *RECORDS[1:3])
    await spool.append_state(env.id, RECORDS[3])
    assert spool.load_state_sync(env.id) == RECORDS


async def test_state_log_ignores_torn_last_line(spool: Spool) -> None:
    env = envelope()
    await spool.commit(env, MESSAGE)
    await spool.append_state(env.id, *RECORDS[:2])
    with spool.state_path(env.id).open("ab") as f:
        f.write(b'{"t":"failed","index":1,"co')  # the crash came mid-append
    assert spool.load_state_sync(env.id) == RECORDS[:2]


async def test_state_log_ignores_zero_filled_tail(spool: Spool) -> None:
    # Some file systems persist the new size before the data: a tail of NUL bytes.
    env = envelope()
    await spool.append_state(env.id, RECORDS[1])
    with spool.state_path(env.id).open("ab") as f:
        f.write(b"\x00" * 40)
    assert spool.load_state_sync(env.id) == [RECORDS[1]]


async def test_state_log_append_after_torn_line_is_kept(spool: Spool) -> None:
    # After a restart the queue appends again; the torn fragment must not swallow the
    # next record (losing a "done" would deliver that recipient twice).
    env = envelope()
    await spool.append_state(env.id, RECORDS[0])
    with spool.state_path(env.id).open("ab") as f:
        f.write(b'{"t":"done","ind')
    await spool.append_state(env.id, RECORDS[1], RECORDS[2])
    assert spool.load_state_sync(env.id) == RECORDS[:3]


# -- start-up scan ---------------------------------------------------------------------------


async def test_queued_ids_cleans_tmp_and_orphan_state(spool: Spool) -> None:
    first, second = envelope(), envelope()
    await spool.commit(first, MESSAGE)
    await spool.commit(second, MESSAGE)
    await spool.append_state(first.id, RECORDS[0])
    (spool.tmp_dir / "0633A6E2F1C40-1F2A-0001B.mx1").write_bytes(b"half a message")
    (spool.queue_dir / "0633A6E2F1C3F-1F2A-0001A.mx1.state").write_bytes(b"{}\n")
    assert list(spool.queued_ids()) == sorted([first.id, second.id])
    assert files(spool.tmp_dir) == []
    assert files(spool.queue_dir) == sorted(
        [f"{first.id}.msg", f"{first.id}.state", f"{second.id}.msg"])


async def test_queued_ids_oldest_first(spool: Spool) -> None:
    ids = []
    for _ in range(3):
        env = envelope()
        ids.append(env.id)
        await spool.commit(env, b"x")
        await asyncio.sleep(0.002)
    assert list(spool.queued_ids()) == ids


# -- corrupt entries ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"",
    b"garbage",
    b"MAILEDGE-SPOOL 1 ",
    b"MAILEDGE-SPOOL 1 abc\n{}\n",
    b"MAILEDGE-SPOOL 1 5\n{}\n",
    b"MAILEDGE-SPOOL 1 2\n{}\nbody",  # envelope without required fields
    b'MAILEDGE-SPOOL 1 9\n{"id":"x"\nbody',
    b"MAILEDGE-SPOOL 2 2\n{}\nbody",
])
def test_parse_entry_refuses_corrupt_data(raw: bytes) -> None:
    with pytest.raises(CorruptEntry):
        parse_entry(raw, "ID")


async def test_corrupt_file_and_quarantine(spool: Spool) -> None:
    good, bad = envelope(), envelope()
    await spool.commit(good, MESSAGE)
    await spool.commit(bad, MESSAGE)
    await spool.append_state(bad.id, RECORDS[0])
    path = spool.msg_path(bad.id)
    raw = path.read_bytes()
    path.write_bytes(raw[:30])  # truncated inside the envelope
    with pytest.raises(CorruptEntry):
        spool.load_sync(bad.id)
    with pytest.raises(CorruptEntry):
        await spool.load(bad.id)
    spool.quarantine_corrupt(bad.id)
    assert files(spool.corrupt_dir) == sorted([f"{bad.id}.msg", f"{bad.id}.state"])
    assert list(spool.queued_ids()) == [good.id]
    assert spool.load_sync(good.id) == (good, MESSAGE)
    spool.quarantine_corrupt(bad.id)  # nothing left to move: harmless


# -- order of file operations --------------------------------------------------------------------


class RecordingFS(SpoolFS):
    """Records every operation of the seam, in order, as (op, path)."""

    def __init__(self, fsync: bool = True) -> None:
        super().__init__(fsync)
        self.ops: list[tuple[str, Path]] = []

    def write_synced(self, path: Path, chunks: Sequence[bytes]) -> None:
        self.ops.append(("write_synced", path))
        super().write_synced(path, chunks)

    def rename(self, source: Path, target: Path) -> None:
        self.ops.append(("rename", source))
        self.ops.append(("renamed_to", target))
        super().rename(source, target)

    def fsync_dir(self, path: Path) -> None:
        self.ops.append(("fsync_dir", path))
        super().fsync_dir(path)

    def unlink(self, path: Path) -> None:
        self.ops.append(("unlink", path))
        super().unlink(path)


async def test_one_commit_writes_renames_then_syncs_directory(spool_factory: object) -> None:
    fs = RecordingFS()
    spool: Spool = spool_factory(fs)  # type: ignore[operator]
    env = envelope()
    await spool.commit(env, MESSAGE)
    ops_at_return = list(fs.ops)  # commit() has returned: this is what preceded the 250
    assert ops_at_return == [
        ("write_synced", spool.tmp_dir / env.id),
        ("rename", spool.tmp_dir / env.id),
        ("renamed_to", spool.queue_dir / f"{env.id}.msg"),
        ("fsync_dir", spool.queue_dir),
    ]


class SyncedFileFS(SpoolFS):
    """Checks that write_synced really syncs the file before returning."""

    def __init__(self) -> None:
        super().__init__(fsync=True)
        self.synced: list[int] = []

    def write_synced(self, path: Path, chunks: Sequence[bytes]) -> None:
        real_fsync = os.fsync
        synced = self.synced

        def fsync(fd: int) -> None:
            synced.append(fd)
            real_fsync(fd)

        os.fsync = fsync  # type: ignore[assignment]
        try:
            super().write_synced(path, chunks)
        finally:
            os.fsync = real_fsync


async def test_write_synced_fsyncs_the_file(spool_factory: object) -> None:
    fs = SyncedFileFS()
    spool: Spool = spool_factory(fs)  # type: ignore[operator]
    await spool.commit(envelope(), MESSAGE)
    assert len(fs.synced) == 1


class TimelineFS(SpoolFS):
    """Records start and end of every operation with one global sequence counter.

    fsync_dir sleeps (in its worker thread) like a slow disk, so commits pile up
    behind it and must share directory syncs.
    """

    def __init__(self, dir_sync_seconds: float) -> None:
        super().__init__(fsync=False)  # the order is the point here, not the disk
        self.dir_sync_seconds = dir_sync_seconds
        self.lock = threading.Lock()
        self.counter = itertools.count()
        self.events: list[tuple[int, str, str]] = []  # (sequence, event, name)

    def event(self, what: str, name: str = "") -> int:
        with self.lock:
            sequence = next(self.counter)
            self.events.append((sequence, what, name))
            return sequence

    def rename(self, source: Path, target: Path) -> None:
        super().rename(source, target)
        self.event("renamed", target.name[:-len(".msg")])

    def fsync_dir(self, path: Path) -> None:
        self.event("dir_sync_start")
        time.sleep(self.dir_sync_seconds)
        super().fsync_dir(path)
        self.event("dir_sync_end")


async def test_group_commit_shares_directory_syncs_and_keeps_the_promise(
        spool_factory: object) -> None:
    fs = TimelineFS(dir_sync_seconds=0.02)
    spool: Spool = spool_factory(fs)  # type: ignore[operator]
    envelopes = [envelope() for _ in range(50)]
    returned: dict[str, int] = {}

    async def commit(env: Envelope) -> None:
        await spool.commit(env, MESSAGE)
        returned[env.id] = fs.event("commit_returned", env.id)

    await asyncio.gather(*(commit(env) for env in envelopes))

    starts = [seq for seq, what, _ in fs.events if what == "dir_sync_start"]
    ends = [seq for seq, what, _ in fs.events if what == "dir_sync_end"]
    assert 1 <= len(starts) < 50, f"{len(starts)} directory syncs for 50 commits"
    assert len(starts) == len(ends)
    # directory syncs never overlap: each ends before the next starts
    syncs = list(zip(starts, ends, strict=True))
    assert all(start < end for start, end in syncs)
    assert all(end < next_start for (_, end), (next_start, _) in itertools.pairwise(syncs))

    renamed = {name: seq for seq, what, name in fs.events if what == "renamed"}
    assert set(renamed) == set(returned) == {env.id for env in envelopes}
    for env in envelopes:
        covering = [(start, end) for start, end in syncs
                    if renamed[env.id] < start and end < returned[env.id]]
        assert covering, (f"commit of {env.id} returned at {returned[env.id]} without a "
                          f"directory sync started after its rename at {renamed[env.id]}")
    assert sorted(files(spool.queue_dir)) == sorted(f"{env.id}.msg" for env in envelopes)


async def test_dir_sync_failure_fails_the_commit(spool_factory: object) -> None:
    class BrokenDirFS(SpoolFS):
        def fsync_dir(self, path: Path) -> None:
            raise OSError(errno.EIO, "I/O error")

    spool: Spool = spool_factory(BrokenDirFS(fsync=False))  # type: ignore[operator]
    results = await asyncio.gather(*(spool.commit(envelope(), b"x") for _ in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, SpoolError) for r in results), results
    # and the spool recovers once the disk does
    spool.fs = SpoolFS(fsync=False)
    await spool.commit(envelope(), b"x")


# -- full disk -----------------------------------------------------------------------------------


class FullDiskFS(SpoolFS):
    """Fault injection: the disk fills up while the message is being written.

    The bytes before the failure really reach tmp/ (through the real write_synced), so
    this checks the clean-up as well. The real full-disk test on a small tmpfs is in the
    integration suite.
    """

    def __init__(self, errno_: int = errno.ENOSPC) -> None:
        super().__init__(fsync=False)
        self.errno = errno_

    def write_synced(self, path: Path, chunks: Sequence[bytes]) -> None:
        error = self.errno
        real_writev = os.writev

        def filling_up(fd: int, buffers: Sequence[bytes]) -> int:
            os.write(fd, buffers[0])  # the header line really reaches tmp/
            raise OSError(error, os.strerror(error), str(path))

        os.writev = filling_up  # type: ignore[assignment]
        try:
            super().write_synced(path, chunks)
        finally:
            os.writev = real_writev


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
async def test_disk_full_during_write(spool_factory: object, code: int) -> None:
    spool: Spool = spool_factory(FullDiskFS(code))  # type: ignore[operator]
    env = envelope()
    with pytest.raises(SpoolFull):
        await spool.commit(env, MESSAGE)
    assert files(spool.queue_dir) == []
    assert files(spool.tmp_dir) == []


async def test_other_write_error_is_a_spool_error(spool_factory: object) -> None:
    spool: Spool = spool_factory(FullDiskFS(errno.EIO))  # type: ignore[operator]
    with pytest.raises(SpoolError) as info:
        await spool.commit(envelope(), MESSAGE)
    assert not isinstance(info.value, SpoolFull)
    assert files(spool.queue_dir) == [] and files(spool.tmp_dir) == []


# -- queue ids -----------------------------------------------------------------------------------


def test_queue_ids_unique_and_name_the_node() -> None:
    factory = QueueIdFactory("mx7-b")
    ids = [factory.new() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(i.endswith(".mx7-b") for i in ids)
    assert all(len(i.split(".", 1)[0]) == len(ids[0].split(".", 1)[0]) for i in ids)


def test_queue_ids_unique_across_counter_wrap() -> None:
    factory = QueueIdFactory("mx1")
    factory._counter = 0xFFFFF - 5
    ids = [factory.new() for _ in range(20)]
    assert len(set(ids)) == 20


def test_queue_ids_unique_across_threads() -> None:
    factory = QueueIdFactory("mx1")
    out: list[list[str]] = [[] for _ in range(8)]

    def work(bucket: list[str]) -> None:
        bucket.extend(factory.new() for _ in range(1000))

    threads = [threading.Thread(target=work, args=(bucket,)) for bucket in out]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [i for bucket in out for i in bucket]
    assert len(set(everything)) == 8000


def test_queue_ids_sort_by_time() -> None:
    factory = QueueIdFactory("mx1")
    batches = []
    for _ in range(5):
        batches.append([factory.new() for _ in range(50)])
        time.sleep(0.002)
    # every id of a later batch sorts after every id of an earlier one
    for earlier, later in itertools.pairwise(batches):
        assert max(earlier) < min(later)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat, key=lambda i: i.split("-", 1)[0]) == flat
