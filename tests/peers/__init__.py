"""Real peers for integration tests, each started privately on loopback.

* :mod:`tests.peers.ports` - free loopback ports and waiting for a listener.
* :mod:`tests.peers.dovecot` - :class:`DovecotLmtp`, a private Dovecot LMTP server.
* :mod:`tests.peers.tmpfs` - a small tmpfs for disk-full tests.
* :mod:`tests.peers.fixtures` - the pytest fixtures built on them; ``tests/conftest.py``
  imports them with ``from tests.peers.fixtures import *``.
"""

from .dovecot import (
    DEFAULT_MAILBOXES,
    DEFAULT_OVER_QUOTA,
    DovecotError,
    DovecotLmtp,
    DovecotNotInstalled,
)
from .ports import free_port, port_is_open, wait_port
from .tmpfs import Tmpfs, TmpfsUnavailable, mount_tmpfs

__all__ = [
    "DEFAULT_MAILBOXES",
    "DEFAULT_OVER_QUOTA",
    "DovecotError",
    "DovecotLmtp",
    "DovecotNotInstalled",
    "Tmpfs",
    "TmpfsUnavailable",
    "free_port",
    "mount_tmpfs",
    "port_is_open",
    "wait_port",
]
