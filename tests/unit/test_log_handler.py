"""The node's stderr log handler: warnings written at once, info lines soon, all at close."""

from __future__ import annotations

import logging
import sys
import time

import pytest

from gateway.cli import BufferedStderrHandler, LineFormatter


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


@pytest.mark.parametrize("tag", ["", "[w1] "])
@pytest.mark.parametrize(("message", "args"), [
    ("queue=%s to=<%s> status=delivered", ("0633A6E2F1C40-1F2A-0001B.mx1", "a@example.test")),
    ("plain text", ()),
    ("100%% done: %d of %s", (3, "é\u2028")),
    ("a %(key)s mapping", ({"key": "value"},)),
])
def test_line_formatter_writes_what_the_standard_formatter_writes(
        tag: str, message: str, args: tuple[object, ...]) -> None:
    standard = logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")
    ours = LineFormatter(tag)
    for created in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.5005):
        record = logging.LogRecord("mailedge.queue", logging.INFO, __file__, 1, message,
                                   args, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == standard.format(record)


def test_line_formatter_keeps_tracebacks() -> None:
    standard = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("mailedge", logging.ERROR, __file__, 1, "failed %s",
                                   ("x",), sys.exc_info())
    text = LineFormatter().format(record)
    assert text == standard.format(record)
    assert "ValueError: boom" in text
