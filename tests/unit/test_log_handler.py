"""The node's stderr log handler: warnings written at once, info lines soon, all at close."""

from __future__ import annotations

import logging
import time

import pytest

from gateway.cli import BufferedStderrHandler


def test_buffered_handler(capfd: pytest.CaptureFixture[str]) -> None:
    handler = BufferedStderrHandler(interval=0.05)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.Logger("buffered-test")
    logger.addHandler(handler)
    try:
        logger.info("queued one")
        logger.warning("storage paused")
        # A warning is written before emit returns, and with it what was buffered before.
        assert capfd.readouterr().err == "INFO queued one\nWARNING storage paused\n"
        logger.info("delivered one")
        seen = ""
        deadline = time.monotonic() + 10  # the flush thread writes it out; bounded wait
        while "delivered one" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
            seen += capfd.readouterr().err
        assert seen == "INFO delivered one\n"
        logger.info("last words")
    finally:
        handler.close()
    assert capfd.readouterr().err == "INFO last words\n"  # close() writes the rest
