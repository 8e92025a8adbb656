"""Structured JSON logs: one object per line; fields passed with `extra={"fields": {...}}`."""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import time
from collections.abc import Iterator
from logging.handlers import QueueHandler, QueueListener
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import orjson


def redact_url(url: str) -> str:
    """A URL fit for a log line: without credentials or query (which may carry ?password= or a token)."""
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        netloc = f"***@{host}" if "@" in parts.netloc else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<unparsable url>"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


_writer: logging.Handler | None = None  # the JSON handler configure_logging installed, if it ran


def configure_logging(level: str, stream: IO[str] | None = None) -> None:
    global _writer
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    _writer = handler
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers go through the same JSON handler.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class _Enqueue(QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Same process, so no pickling: the listener's JsonFormatter formats the record as it was, fields
        # and traceback included (QueueHandler's own prepare would flatten them into the message).
        return record


@contextlib.contextmanager
def logs_off_the_loop() -> Iterator[None]:
    """While serving, log lines are formatted and written by a thread of their own: a request only puts
    its record on a queue. Lines queued when this ends are written before it returns; before and after,
    configure_logging's handler writes directly. Without configure_logging (the app embedded, tests'
    log capture), nothing changes."""
    root = logging.getLogger()
    writer = _writer
    if writer is None or writer not in root.handlers:
        yield
        return
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    enqueue = _Enqueue(q)
    listener = QueueListener(q, writer, respect_handler_level=True)
    listener.start()
    root.handlers[root.handlers.index(writer)] = enqueue
    try:
        yield
    finally:
        # Direct writing first, so nothing is queued after the listener's last read; then drain.
        if enqueue in root.handlers:
            root.handlers[root.handlers.index(enqueue)] = writer
        listener.stop()
