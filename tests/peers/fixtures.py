"""Pytest fixtures for the real peers; ``tests/conftest.py`` star-imports this module.

* ``dovecot`` - a started :class:`~tests.peers.dovecot.DovecotLmtp` (function scope) with
  the mailboxes alice@example.test, bob@example.test, carol@example.org and
  dave@example.test, dave over quota (refused at RCPT with 552 5.2.2).
* ``dovecot_factory`` - ``make(mailboxes=..., **options)`` starts further instances with
  other mailboxes or options (``quota_tempfail``, ``quotas``, ``extra_config``, ...); all
  are stopped and removed at teardown.
* ``tmpfs`` - a mounted 2 MiB :class:`~tests.peers.tmpfs.Tmpfs` (skips where mounting is
  not permitted).

A missing Dovecot skips the test on a developer's machine (with the hint to run
``make peers``) but fails it under CI (``CI`` set), where ``make test`` installs the peers
first and a skip would hide a broken install.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from tests.peers.missing import missing_peer

from .dovecot import DEFAULT_MAILBOXES, DEFAULT_OVER_QUOTA, DovecotLmtp, DovecotNotInstalled
from .tmpfs import Tmpfs, mount_tmpfs

__all__ = ["dovecot", "dovecot_factory", "tmpfs"]

DovecotFactory = Callable[..., DovecotLmtp]


@pytest.fixture
def dovecot_factory() -> Iterator[DovecotFactory]:
    """Start private Dovecot LMTP instances on demand; stop and remove them afterwards."""
    instances: list[DovecotLmtp] = []

    def make(
        mailboxes: Iterable[str] = DEFAULT_MAILBOXES,
        **options: Any,
    ) -> DovecotLmtp:
        instance = DovecotLmtp(mailboxes, **options)
        instances.append(instance)
        try:
            instance.start()
        except DovecotNotInstalled as exc:
            missing_peer(exc)
        return instance

    try:
        yield make
    finally:
        errors: list[Exception] = []
        for instance in reversed(instances):
            try:
                instance.close()
            except Exception as exc:  # stop the others all the same
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def dovecot(dovecot_factory: DovecotFactory) -> DovecotLmtp:
    """A running Dovecot LMTP with the default mailboxes; dave@example.test is over quota."""
    return dovecot_factory(DEFAULT_MAILBOXES, over_quota=DEFAULT_OVER_QUOTA)


@pytest.fixture
def tmpfs() -> Iterator[Tmpfs]:
    """A 2 MiB tmpfs mounted on a temporary directory, unmounted afterwards."""
    with mount_tmpfs() as mounted:
        yield mounted
