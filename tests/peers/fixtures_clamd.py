"""Pytest fixtures for a private clamd (tests/peers/clamd.py).

``tests/conftest.py`` star-imports this module:

* ``clamd`` - a started :class:`~tests.peers.clamd.Clamd` (function scope: it starts in
  about 0.1 s) with the test signature database: EICAR (hash and body signatures) and
  :data:`~tests.peers.clamd.TEST_VIRUS_MARKER`, and clamd's default StreamMaxLength of
  25 MiB. Endpoints: ``clamd.unix_endpoint`` (``unix:/...``), ``clamd.tcp_endpoint``.
* ``clamd_factory`` - ``make(**options)`` starts further instances
  (``stream_max_length=``, ``extra_signatures=``, ...); all are stopped and removed at
  teardown.

A missing clamd skips the test on a developer's machine (with the hint to run ``make
peers``) but fails it under CI (``CI`` set), where ``make test`` installs the peers first
and a skip would hide a broken install.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.peers.missing import missing_peer

from .clamd import Clamd, ClamdNotInstalled

__all__ = ["clamd", "clamd_factory"]

ClamdFactory = Callable[..., Clamd]


@pytest.fixture
def clamd_factory() -> Iterator[ClamdFactory]:
    """Start private clamd instances on demand; stop and remove them afterwards."""
    instances: list[Clamd] = []

    def make(**options: Any) -> Clamd:
        instance = Clamd(**options)
        instances.append(instance)
        try:
            instance.start()
        except ClamdNotInstalled as exc:
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
def clamd(clamd_factory: ClamdFactory) -> Clamd:
    """A running clamd with the test signatures and a 25 MiB StreamMaxLength."""
    return clamd_factory()
