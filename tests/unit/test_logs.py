import logging

from worker.logs import RepeatFilter


def record(msg, *args):
    return logging.LogRecord("kafka.net", logging.ERROR, __file__, 1, msg, args, None)


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
