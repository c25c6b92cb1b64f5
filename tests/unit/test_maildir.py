"""MaildirAgent: local delivery into temporary directories."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import stat
from pathlib import Path

import pytest

from gateway import maildir
from gateway.delivery import DeliveryJob
from gateway.maildir import MaildirAgent

MESSAGE = b"From: alice@example.org\r\nSubject: hi\r\n\r\nHello,\r\n.dot line\r\n"
NAME_RE = re.compile(
    r"^(?P<sec>\d+)\.M(?P<usec>\d+)P(?P<pid>\d+)Q(?P<q>\d+)\.(?P<host>[^,/:]+)"
    r",S=(?P<size>\d+),W=(?P<vsize>\d+)$"
)


def _job(*recipients: str, sender: str = "alice@example.org", message: bytes = MESSAGE,
         queue_id: str = "Q1") -> DeliveryJob:
    return DeliveryJob(queue_id=queue_id, sender=sender, recipients=list(recipients),
                       message=message)


def _walk(root: Path) -> list[Path]:
    return list(root.rglob("*"))


def _files(folder: Path, sub: str) -> list[Path]:
    directory = folder / sub
    return sorted(directory.iterdir()) if directory.exists() else []


async def test_delivers_one_recipient(tmp_path: Path) -> None:
    agent = MaildirAgent(tmp_path)
    [outcome] = await agent.deliver(_job("bob@example.com"))

    assert outcome.delivered
    assert (outcome.code, outcome.status, outcome.remote) == (250, "2.0.0", "maildir")
    folder = tmp_path / "example.com" / "bob"
    for sub in ("tmp", "new", "cur"):
        mode = (folder / sub).stat().st_mode
        assert stat.S_ISDIR(mode) and stat.S_IMODE(mode) == 0o700
    assert _files(folder, "tmp") == [] and _files(folder, "cur") == []
    [stored] = _files(folder, "new")
    content = stored.read_bytes()
    assert content == (
        b"Return-Path: <alice@example.org>\nDelivered-To: bob@example.com\n"
        + MESSAGE.replace(b"\r\n", b"\n")
    )
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    match = NAME_RE.match(stored.name)
    assert match is not None, stored.name
    assert int(match["size"]) == len(content) == stored.stat().st_size
    assert int(match["vsize"]) == len(content) + content.count(b"\n")
    assert int(match["pid"]) == os.getpid()
    assert stored.name in outcome.text
    await agent.aclose()


async def test_null_sender_and_multiple_recipients(tmp_path: Path) -> None:
    agent = MaildirAgent(tmp_path, fsync=False)
    recipients = ["bob@example.com", "carol@example.com", "dave@other.example", "bob@example.com"]
    outcomes = await agent.deliver(_job(*recipients, sender=""))

    assert [o.code for o in outcomes] == [250, 250, 250, 250]
    bob = _files(tmp_path / "example.com" / "bob", "new")
    assert len(bob) == 2  # a recipient listed twice gets two copies, each its own file
    assert len(_files(tmp_path / "example.com" / "carol", "new")) == 1
    [dave] = _files(tmp_path / "other.example" / "dave", "new")
    assert dave.read_bytes().startswith(
        b"Return-Path: <>\nDelivered-To: dave@other.example\nFrom: alice@example.org\n"
    )


@pytest.mark.parametrize(
    "address",
    [
        "../etc@example.com",
        "a/b@example.com",
        "..@example.com",
        ".@example.com",
        ".hidden@example.com",
        "bob@..",
        "bob@.",
        "bob@.example.com",
        "bob@exa/mple.com",
        "bo\0b@example.com",
        "bob@exam\0ple.com",
        "bob\r\nX-Injected: yes@example.com",
        "@example.com",
        "bob@",
        "no-at-sign",
        "x" * 300 + "@example.com",
    ],
)
async def test_path_tricks_are_refused(tmp_path: Path, address: str) -> None:
    root = tmp_path / "root"
    agent = MaildirAgent(root)
    [refused, fine] = await agent.deliver(_job(address, "ok@example.com"))

    assert (refused.code, refused.status, refused.remote) == (550, "5.1.3", "maildir")
    assert fine.delivered
    # nothing was created anywhere but the good recipient's folder
    created = sorted(str(p.relative_to(tmp_path)) for p in _walk(tmp_path))
    assert all(p in ("root", "root/example.com") or p.startswith("root/example.com/ok")
               for p in created), created
    assert [p.name for p in (root / "example.com").iterdir()] == ["ok"]


async def test_sender_with_line_break_is_refused(tmp_path: Path) -> None:
    agent = MaildirAgent(tmp_path)
    [outcome] = await agent.deliver(_job("bob@example.com", sender="a@b\r\nX-Evil: 1"))
    assert outcome.permanent
    assert not any(p.name == "new" for p in _walk(tmp_path))


async def test_disk_full_is_temporary_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: the one write function fails the way a full disk makes it fail.
    # A real full filesystem (a small tmpfs) is exercised by the disk-full tests elsewhere;
    # here only the agent's reaction matters.
    real_write = maildir._write_all
    calls: list[int] = []

    def write_fails_for_second(fd: int, data: bytes) -> None:
        calls.append(fd)
        if len(calls) == 2:
            os.write(fd, data[:10])  # a partial write before the disk fills up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(fd, data)

    monkeypatch.setattr(maildir, "_write_all", write_fails_for_second)
    agent = MaildirAgent(tmp_path)
    outcomes = await agent.deliver(_job("a@example.com", "b@example.com", "c@example.com"))

    assert [o.code for o in outcomes] == [250, 452, 250]
    assert outcomes[1].status == "4.3.1" and outcomes[1].temporary
    assert outcomes[1].remote == "maildir"
    b_folder = tmp_path / "example.com" / "b"
    assert _files(b_folder, "new") == [] and _files(b_folder, "tmp") == []
    assert len(_files(tmp_path / "example.com" / "a", "new")) == 1
    assert len(_files(tmp_path / "example.com" / "c", "new")) == 1


@pytest.mark.parametrize(
    ("err", "code", "status"),
    [(errno.EDQUOT, 452, "4.3.1"), (errno.EIO, 451, "4.3.0"), (errno.EROFS, 451, "4.3.0")],
)
async def test_other_write_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, code: int, status: str
) -> None:
    # Fault injection, as above.
    def failing_write(fd: int, data: bytes) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(maildir, "_write_all", failing_write)
    [outcome] = await MaildirAgent(tmp_path).deliver(_job("bob@example.com"))
    assert (outcome.code, outcome.status) == (code, status)
    folder = tmp_path / "example.com" / "bob"
    assert _files(folder, "new") == [] and _files(folder, "tmp") == []


async def test_failed_rename_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_rename(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "rename", failing_rename)  # the module calls os.rename
    [outcome] = await MaildirAgent(tmp_path).deliver(_job("bob@example.com"))
    assert (outcome.code, outcome.status) == (451, "4.3.0")
    folder = tmp_path / "example.com" / "bob"
    assert _files(folder, "new") == [] and _files(folder, "tmp") == []


async def test_failed_directory_sync_withdraws_the_delivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = MaildirAgent(tmp_path)
    await agent.deliver(_job("bob@example.com"))  # the folder exists from now on
    real_fsync_dir = maildir._fsync_dir

    def failing_fsync_dir(path: Path) -> None:
        if path.name == "new":
            raise OSError(errno.EIO, "injected")
        real_fsync_dir(path)

    monkeypatch.setattr(maildir, "_fsync_dir", failing_fsync_dir)
    [outcome] = await agent.deliver(_job("bob@example.com"))
    assert outcome.temporary
    assert len(_files(tmp_path / "example.com" / "bob", "new")) == 1  # only the first one


async def test_unwritable_root_is_temporary(tmp_path: Path) -> None:
    root = tmp_path / "file-not-dir"
    root.write_bytes(b"")
    [outcome] = await MaildirAgent(root).deliver(_job("bob@example.com"))
    assert (outcome.code, outcome.status) == (451, "4.3.0")


async def test_names_are_unique_under_concurrency(tmp_path: Path) -> None:
    agent = MaildirAgent(tmp_path, fsync=False)
    jobs = [_job("bob@example.com", "carol@example.com", queue_id=f"Q{i}") for i in range(60)]
    results = await asyncio.gather(*(agent.deliver(job) for job in jobs))

    assert all(o.delivered for outcomes in results for o in outcomes)
    bob = _files(tmp_path / "example.com" / "bob", "new")
    carol = _files(tmp_path / "example.com" / "carol", "new")
    assert len(bob) == len(carol) == 60
    names = [p.name for p in bob + carol]
    assert len(set(names)) == len(names) == 120
    counters = [int(m["q"]) for m in map(NAME_RE.match, names) if m is not None]
    assert len(set(counters)) == 120


async def test_delivery_runs_off_the_event_loop(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread: list[bool] = []
    real_write = maildir._write_all

    def recording_write(fd: int, data: bytes) -> None:
        try:
            asyncio.get_running_loop()
            loop_thread.append(True)
        except RuntimeError:
            loop_thread.append(False)
        real_write(fd, data)

    monkeypatch.setattr(maildir, "_write_all", recording_write)
    await MaildirAgent(tmp_path).deliver(_job("bob@example.com"))
    assert loop_thread == [False]


async def test_no_recipients(tmp_path: Path) -> None:
    assert await MaildirAgent(tmp_path).deliver(_job()) == []
