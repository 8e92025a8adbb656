"""Log lines while serving are written by a thread of their own, in batches, with the same content as written
directly."""

from __future__ import annotations

import io
import logging
import threading

import orjson
import pytest

from gateway import logs


class Recording(io.StringIO):
    """A log stream that remembers which thread wrote each line."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def write(self, s: str) -> int:
        self.threads += [threading.current_thread().name] * len(s.strip().splitlines())
        return super().write(s)


@pytest.fixture
def root_logging():
    root = logging.getLogger()
    handlers, level, writer = root.handlers[:], root.level, logs._writer
    yield
    root.handlers[:], logs._writer = handlers, writer
    root.setLevel(level)


def decision_lines(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def emit_some(log: logging.Logger) -> None:
    log.info("decision", extra={"fields": {"event": "decision", "tenant": "acme", "risk": 85,
                                           "categories": ["VIO"], "threshold": 40, "outcome": "block"}})
    try:
        raise ValueError("boom")
    except ValueError:
        log.error("unhandled error", exc_info=True, extra={"fields": {"event": "internal_error"}})
    log.debug("below the level: never written")


def test_while_serving_lines_are_written_off_the_callers_thread_with_the_same_content(root_logging):
    direct = Recording()
    logs.configure_logging("info", stream=direct)
    emit_some(logging.getLogger("guardgate"))

    queued = Recording()
    logs.configure_logging("info", stream=queued)
    with logs.logs_off_the_loop():
        emit_some(logging.getLogger("guardgate"))
    # Everything queued is written by the time the context has ended.
    assert len(queued.threads) == 2
    assert threading.current_thread().name not in queued.threads
    assert direct.threads == [threading.current_thread().name] * 2

    def without_time(lines: list[dict]) -> list[dict]:
        return [{k: v for k, v in line.items() if k != "ts"} for line in lines]

    assert without_time(decision_lines(queued)) == without_time(decision_lines(direct))
    exc = decision_lines(queued)[1]
    assert exc["event"] == "internal_error" and "ValueError: boom" in exc["exc"] and exc["msg"] == "unhandled error"


def test_after_serving_lines_are_written_directly_again(root_logging):
    stream = Recording()
    logs.configure_logging("info", stream=stream)
    with logs.logs_off_the_loop():
        pass
    logging.getLogger("guardgate").info("after", extra={"fields": {"event": "x"}})
    assert stream.threads == [threading.current_thread().name]
    assert logging.getLogger().handlers == [logs._writer]


def test_without_configured_logging_the_handlers_are_left_alone(root_logging):
    logs._writer = None
    before = logging.getLogger().handlers[:]
    with logs.logs_off_the_loop():
        assert logging.getLogger().handlers == before
