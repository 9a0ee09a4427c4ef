"""structlog configuration: JSON lines when stderr is not a terminal, readable otherwise."""

from __future__ import annotations

import logging
import sys
import time

import structlog


def configure_logging(level: str = "INFO", json: bool | None = None) -> None:
    json = (not sys.stderr.isatty()) if json is None else json
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info if json else structlog.dev.set_exc_info,
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=stderr_lines,
        cache_logger_on_first_use=False,
    )
    # kafka-python logs through the standard library; keep its warnings, in our stream,
    # but at most one line per message per interval: a broker outage makes it repeat
    # the same connection error thousands of times a minute.
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:  # handler filters see child loggers' records
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(RepeatFilter())
            handler.addFilter(fold_traceback)


def stderr_lines(*_args) -> structlog.WriteLogger:
    """One write per line, to whatever sys.stderr is when the line is logged.

    structlog's PrintLogger print()s the line, then the newline, in two writes, and
    kafka-python's threads log to the same stream in between (a torn JSON line)."""
    return structlog.WriteLogger(sys.stderr)


def fold_traceback(record: logging.LogRecord) -> bool:
    """kafka-python logs, with a traceback, errors it handles itself (a reset
    connection it will redial). The traceback is not actionable for an operator: keep
    one line with the error. An error reported by a transport that is already closed
    is the client's own shutdown race (a read still running on a socket it closed):
    nothing is lost or retried there, so it is not shown at all."""
    if not record.name.startswith("kafka") or not record.exc_info:
        return True
    message = record.getMessage()
    if "(closed)>" in message:
        return False
    if record.exc_info[1]:
        exc = record.exc_info[1]
        record.msg = f"{message} ({type(exc).__name__}: {exc})"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
    return True


class RepeatFilter(logging.Filter):
    """Passes a record unless the same message template passed within `interval_s`;
    the next one that passes says how many were held back."""

    def __init__(self, interval_s: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[tuple[str, object], float] = {}
        self._held: dict[tuple[str, object], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("kafka"):
            return True
        key = (record.name, record.msg)
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = (
                f"{record.msg} [{held} similar lines held back in the last {self.interval_s:.0f}s]"
            )
        return True
