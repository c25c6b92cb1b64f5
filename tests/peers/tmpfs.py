"""A small tmpfs for disk-full tests.

The spool promises that 250 means durable, so tests must see what it does when the disk
fills up: ENOSPC while writing a message, while writing its envelope, while renaming.
:func:`mount_tmpfs` mounts a tmpfs of a few MiB on a fresh temporary directory
(``mount -t tmpfs -o size=2m tmpfs DIR``), yields a :class:`Tmpfs` and unmounts it on exit
(lazily if something still holds a file open). Mounting needs root (CAP_SYS_ADMIN); where
that is not permitted the test is skipped with the reason, or :class:`TmpfsUnavailable` is
raised when ``skip=False``.

:meth:`Tmpfs.fill` writes filler files until only a given number of bytes is left free,
and :meth:`Tmpfs.release` deletes them again. tmpfs accounts in pages, so the space left
free is rounded down to a whole page (4096 bytes here); ``fill`` returns the exact number.
The filler files are named ``.mailedge-fill-*`` in the tmpfs root, so code under test
should get a subdirectory (``tmpfs.path / "spool"``) rather than the root itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["DEFAULT_SIZE", "Tmpfs", "TmpfsUnavailable", "mount_tmpfs"]

DEFAULT_SIZE = 2 * 1024 * 1024
_CHUNK = 64 * 1024
_FILL_PREFIX = ".mailedge-fill-"


class TmpfsUnavailable(RuntimeError):
    """A tmpfs cannot be mounted here (not root, or the mount is not permitted)."""


@dataclass
class Tmpfs:
    """A mounted tmpfs: its mount point, its size, and a way to fill it up."""

    path: Path
    size: int
    _fillers: list[Path] = field(default_factory=list, repr=False)

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer could still write (tmpfs reserves none for root)."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def free_inodes(self) -> int:
        return os.statvfs(self.path).f_favail

    def fill(self, leave_free: int = 0) -> int:
        """Write filler until at most ``leave_free`` bytes are free; return what is free.

        The result is ``leave_free`` rounded down to a whole page. Calling it again fills
        further; :meth:`release` frees everything it wrote.
        """
        if leave_free < 0:
            raise ValueError("leave_free must be >= 0")
        need = self.free_bytes() - leave_free
        if need <= 0:
            return self.free_bytes()
        filler = self.path / f"{_FILL_PREFIX}{len(self._fillers)}"
        self._fillers.append(filler)
        chunk = b"\0" * _CHUNK
        with open(filler, "wb", buffering=0) as fh:
            while need > 0:
                try:
                    need -= fh.write(chunk[: min(need, _CHUNK)])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        return self.free_bytes()

    def release(self) -> None:
        """Delete the filler files, giving their space back."""
        while self._fillers:
            with contextlib.suppress(FileNotFoundError):
                self._fillers.pop().unlink()


def _fail(reason: str, skip: bool) -> TmpfsUnavailable:
    if skip:
        pytest.skip(f"cannot mount a tmpfs for disk-full tests: {reason}")
    return TmpfsUnavailable(reason)


@contextlib.contextmanager
def mount_tmpfs(
    size: int = DEFAULT_SIZE, *, inodes: int | None = None, skip: bool = True
) -> Iterator[Tmpfs]:
    """Mount a tmpfs of ``size`` bytes (and at most ``inodes`` inodes) on a temp dir.

    Skips the calling test when mounting is not permitted (``skip=False``: raises
    :class:`TmpfsUnavailable` instead).
    """
    if os.geteuid() != 0:
        raise _fail("mounting needs root (CAP_SYS_ADMIN); run the tests as root", skip)
    mount = shutil.which("mount", path="/usr/bin:/bin:/usr/sbin:/sbin")
    umount = shutil.which("umount", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if mount is None or umount is None:
        raise _fail("the mount/umount commands are not installed", skip)
    options = f"size={size},mode=0755"
    if inodes is not None:
        options += f",nr_inodes={inodes}"
    mountpoint = Path(tempfile.mkdtemp(prefix="mailedge-tmpfs-"))
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)],
        capture_output=True, text=True, check=False, timeout=30,
    )
    if result.returncode != 0:
        mountpoint.rmdir()
        raise _fail(f"`mount -t tmpfs` failed: {result.stderr.strip()}", skip)
    try:
        yield Tmpfs(path=mountpoint, size=size)
    finally:
        done = subprocess.run([umount, str(mountpoint)], capture_output=True, check=False,
                              timeout=30)
        if done.returncode != 0:  # busy: detach now, the kernel frees it when unused
            subprocess.run([umount, "-l", str(mountpoint)], capture_output=True, check=True,
                           timeout=30)
        mountpoint.rmdir()
