import io
import logging
import sys

import orjson
import structlog

from worker.logs import RepeatFilter, fold_traceback, stderr_lines


def record(msg, *args, name="kafka.net", exc_info=None):
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, exc_info)


def attribute_error():
    """The exc_info of kafka-python's shutdown race: a read on a socket it closed."""
    try:
        None.recv(4096)
    except AttributeError:
        return sys.exc_info()


def test_repeated_messages_pass_once_per_interval_and_report_what_was_held():
    t = [0.0]
    f = RepeatFilter(interval_s=10, clock=lambda: t[0])
    assert f.filter(record("Connection lost: %s", "a"))
    assert not f.filter(record("Connection lost: %s", "b"))
    assert not f.filter(record("Connection lost: %s", "c"))
    assert f.filter(record("Metadata refresh failed"))  # another message is not held
    t[0] = 10.5
    r = record("Connection lost: %s", "d")
    assert f.filter(r)
    assert "2 similar lines held back" in r.getMessage() and r.getMessage().startswith(
        "Connection lost: d"
    )


def emitted(r: logging.LogRecord) -> str:
    """What a stderr handler with the fold filter writes for `r`."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(fold_traceback)
    handler.handle(r)
    return out.getvalue()


def test_kafka_tracebacks_fold_into_one_line_with_the_error():
    r = record(
        "%s: Error receiving", "conn", name="kafka.net.transport", exc_info=attribute_error()
    )
    text = emitted(r)
    assert "Traceback" not in text and text.count("\n") == 1
    assert "conn: Error receiving (AttributeError:" in text and "recv" in text


def test_our_own_tracebacks_are_kept():
    try:
        raise ValueError("ours")
    except ValueError:
        r = record("boom", name="worker", exc_info=sys.exc_info())
    assert "Traceback" in emitted(r)


def test_errors_of_an_already_closed_kafka_transport_are_not_shown():
    class Transport:
        def __str__(self):
            return "<KafkaTCPTransport [none] (closed)>"

    info = attribute_error()
    closed = record("%s: Error receiving", Transport(), name="kafka.net.transport", exc_info=info)
    open_ = record("%s: Error receiving", "<T [b:9092]>", name="kafka.net.transport", exc_info=info)
    assert fold_traceback(closed) is False
    assert fold_traceback(open_) is True


class Writes(io.StringIO):
    def __init__(self):
        super().__init__()
        self.calls = []

    def write(self, s):
        self.calls.append(s)
        return super().write(s)


def test_each_structured_line_is_one_write_to_the_current_stderr(monkeypatch):
    """A line written in two parts can be torn by another thread's log line."""
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()], logger_factory=stderr_lines
    )
    try:
        for _ in range(2):  # sys.stderr is looked up at each line, not once
            stream = Writes()
            monkeypatch.setattr(sys, "stderr", stream)
            structlog.get_logger().info("batch_scored", n=3)
            assert len(stream.calls) == 1 and stream.calls[0].endswith("\n")
            assert orjson.loads(stream.calls[0]) == {"event": "batch_scored", "n": 3}
    finally:
        structlog.reset_defaults()


def test_the_trainer_configures_the_same_filters_as_the_worker(monkeypatch, capsys):
    """--from-kafka runs kafka-python in the trainer: its lines need the same filters."""
    from training.cli import main

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # basicConfig adds a handler only to a bare root
    try:
        assert main(["--no-such-flag"]) == 2
        filters = [f for h in root.handlers for f in h.filters]
        assert any(isinstance(f, RepeatFilter) for f in filters) and fold_traceback in filters
    finally:
        for h in root.handlers:
            h.close()
        structlog.reset_defaults()
    assert capsys.readouterr().err.startswith("error: unrecognized arguments: --no-such-flag")
