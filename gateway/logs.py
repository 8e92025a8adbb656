"""Structured logs, one line per event, fields passed with `extra={"fields": {...}}`: JSON objects
(`server.log_format: json`, for collectors) or `key=value` text (`text`, for a person at a terminal)."""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator
from logging.handlers import QueueHandler
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


_BARE = re.compile(r"[^\s\"'=]+")


def _text_value(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(_text_value(x) for x in v) or "-"
    if isinstance(v, dict):
        return ",".join(f"{k}:{_text_value(x)}" for k, x in v.items()) or "-"
    s = str(v)
    # Quoted (JSON-escaped) when it holds spaces, quotes or control characters: one event, one line.
    return s if _BARE.fullmatch(s) and s.isprintable() else orjson.dumps(s).decode()


class TextFormatter(logging.Formatter):
    """`2026-12-04 02:43:46.123 INFO  decision  tenant=kids-app stage=prompt outcome=block risk=85 …`"""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}"
        fields = dict(getattr(record, "fields", None) or {})
        fields.pop("event", None)  # the message says it
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        line = f"{ts} {record.levelname:<7} {record.getMessage()}" + (f"  {pairs}" if pairs else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_writer: logging.StreamHandler | None = None  # the handler configure_logging installed, if it ran


def configure_logging(level: str, fmt: str = "json", stream: IO[str] | None = None) -> None:
    global _writer
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    _writer = handler
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Our lines carry none of these; looking them up is a good part of what creating a record costs.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # uvicorn's own loggers go through the same handler.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class _Enqueue(QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Same process, so no pickling: the writer's JsonFormatter formats the record as it was, fields
        # and traceback included (QueueHandler's own prepare would flatten them into the message).
        return record


class _BatchWriter(threading.Thread):
    """Every `every` seconds, formats what the queue holds and writes it in one go.

    It polls rather than waiting on the queue: a waiting reader would be woken by every record, one
    thread switch per log line, which costs the event loop more than writing the line itself."""

    def __init__(self, q: queue.SimpleQueue[logging.LogRecord], writer: logging.StreamHandler, every: float) -> None:
        super().__init__(name="guardgate-log-writer", daemon=True)
        self.q, self.writer, self.every = q, writer, every
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            self.drain()
        self.drain()

    def drain(self) -> None:
        lines = []
        while True:
            try:
                record = self.q.get_nowait()
            except queue.Empty:
                break
            if record.levelno >= self.writer.level:
                try:
                    lines.append(self.writer.format(record) + "\n")
                except Exception:
                    self.writer.handleError(record)
        if lines:
            self.writer.acquire()  # the handler's own lock: it may be writing directly at the hand-over
            try:
                self.writer.stream.write("".join(lines))
                self.writer.stream.flush()
            except Exception:
                pass  # a closed or broken stderr must not take the writer down
            finally:
                self.writer.release()

    def stop(self) -> None:
        self.stopping.set()
        self.join()


@contextlib.contextmanager
def logs_off_the_loop(every: float = 0.05) -> Iterator[None]:
    """While serving, a request only puts its log records on a queue; a thread of its own formats and
    writes them, in batches every `every` seconds. Records queued when this ends are written before it
    returns; before and after, configure_logging's handler writes directly. Without configure_logging
    (the app embedded, tests' log capture), nothing changes."""
    root = logging.getLogger()
    writer = _writer
    if writer is None or writer not in root.handlers:
        yield
        return
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    enqueue = _Enqueue(q)
    batches = _BatchWriter(q, writer, every)
    batches.start()
    root.handlers[root.handlers.index(writer)] = enqueue
    try:
        yield
    finally:
        # Direct writing first, so nothing is queued after the writer's last drain; then drain.
        if enqueue in root.handlers:
            root.handlers[root.handlers.index(enqueue)] = writer
        batches.stop()
