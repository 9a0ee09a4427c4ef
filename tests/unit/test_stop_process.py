import signal
import subprocess
import sys

from deploy.embedded_broker import stop_process


def _child(code: str) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", code + "\nprint('up', flush=True)\nimport time\ntime.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "up"
    return p


def test_a_child_that_stops_on_the_signal_returns_its_status():
    assert stop_process(_child(""), timeout_s=10) == -signal.SIGTERM


def test_a_child_that_ignores_the_signal_is_killed_after_the_grace():
    p = _child("import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    assert stop_process(p, timeout_s=0.5) == -signal.SIGKILL


def test_an_exited_child_returns_its_status_without_a_signal():
    p = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    p.wait()
    assert stop_process(p, timeout_s=1) == 3
