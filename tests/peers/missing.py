"""What a fixture does when its peer's binary is not installed.

On a developer's machine the test is skipped with the reason (run `make peers`); under
CI (`CI` set) it fails, because `make test` installs the peers first and a skip there
would hide a broken install.
"""

from __future__ import annotations

import os

import pytest


def missing_peer(exc: Exception) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{exc} (CI is set, so a missing peer is an error)", pytrace=False)
    pytest.skip(str(exc))
