"""What the small deploy/ tools share: their Kafka settings and a stop signal."""

from __future__ import annotations

import signal
import sys
import threading

from pydantic import ValidationError

from worker.logs import configure_logging
from worker.settings import KafkaSettings, settings_error_line


def start_tool() -> KafkaSettings:
    """Configure logging and read KAFKA_*; an invalid setting ends the tool with one
    line and exit code 2."""
    configure_logging()
    try:
        return KafkaSettings()
    except ValidationError as e:
        print(f"error: {settings_error_line(e, 'KAFKA_')}", file=sys.stderr)
        raise SystemExit(2) from None


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: the tool finishes what it is doing and exits."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop
