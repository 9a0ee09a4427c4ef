"""`make demo`, the newcomer's first command, end to end at a small size: the first act
(alerts, incidents, a hot reload after shadow) and the drift act (drift → retrain →
shadow → promote → resolve)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "KAFKA_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _processes_with(marker: str) -> list[int]:
    """Pids whose environment carries `marker` (every process the demo started inherits it)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:
                continue  # gone, or not ours to read
    return found


def test_demo_scores_every_record_reloads_closes_the_drift_loop_and_reports(tmp_path):
    out = tmp_path / "demo-out"
    env = _env()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.demo",
            "--records",
            # the reload at 4000 serves after 2 000 rows in shadow (and the worker's poll
            # and verification: ~0.1 s), ~2 s before the shift: shadow sees no shifted row
            "8000",
            "--rate",
            "1000",
            # the default 8 000 training rows: with 3 000 the knn score's reference is
            # sparse and normal rows cluster into false incidents (3 measured, 1 with 8 000)
            "--train-rows",
            "8000",
            "--print-alerts",
            "3",
            # the drift act: the trainer retrains 5 s (5 000 records) after drift opened
            "--drift-delay-seconds",
            "5",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scored"] == summary["records"] > 8000  # none lost, the drift act's too
    drift = summary["drift"]
    assert len(summary["versions"]) == 3, "the half-way checkpoint, then the drift retrain"
    assert summary["versions"][2] == drift["retrained"]
    # far above chance: flagging 1 % of rows at random gives recall ~0.01 and precision
    # ~0.06 (the anomalous share of rows); this size measures ~0.61 and ~0.73
    first = summary["phases"]["before the shift"]
    assert first["records"] == 8000
    assert first["recall"] > 0.15 and first["precision"] > 0.3, first
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Traceback" not in r.stdout + r.stderr
    assert "precision / recall / F1" in r.stdout
    # incidents per machine: offline, this first act (python -m tests.bench.episodes's
    # score_stream(0, records=8000)) has 11 multi-record episodes on 4 keys, 8 detected,
    # each by one incident, and no false incident at the defaults (7 of 35 rows)
    incidents = summary["incidents_before_shift"]
    assert incidents["detected"] >= 1 and incidents["false_incidents"] <= 2, incidents
    assert "⚑ incident OPEN" in r.stdout and "⚑ incident RESOLVED" in r.stdout
    assert "multi-record episodes detected" in r.stdout

    # the drift act: the shift opens drift within a window and a step (2 000 + 200
    # records; measured ~1 000), the trainer's retrain passes shadow and serves, drift
    # resolves under it (a full window to refill, one of quiet tests: measured ~3 800
    # records after the promotion)
    assert drift["complete"], drift
    assert drift["false_openings_before_shift"] == 0
    assert drift["opened_after_records"] <= 3000, drift
    assert drift["shadow_verdicts"][drift["retrained"]][0] == "promoted", drift
    assert drift["promoted_at_record"] < drift["shift_at_record"] + drift["resolved_after_records"]
    # the shift is visible (measured 9 % false alarms under the old model) and gone
    # after the promotion (measured 0.2 %; the soak test's bound: 2× the 1 % target)
    shifted, after = summary["phases"]["shifted, old model"], summary["phases"]["after promotion"]
    assert shifted["false_alarm_rate"] > 0.03, shifted
    assert after["normal_rows"] >= 2000 and after["false_alarm_rate"] <= 0.02, after
    for line in ("⚠ DRIFT OPEN", "⚠ DRIFT RESOLVED", "trainer: published " + drift["retrained"]):
        assert line in r.stdout, line
    assert f"✔ shadow verdict: PROMOTE {drift['retrained']}" in r.stdout
    assert "drift loop             ✓ complete" in r.stdout


def test_ctrl_c_mid_stream_stops_everything_the_demo_started(tmp_path):
    marker = f"CAE_DEMO_TEST={uuid.uuid4().hex}"
    key, value = marker.split("=")
    demo = subprocess.Popen(
        [sys.executable, "-m", "deploy.demo", "--records", "100000", "--rate", "500"]
        + ["--train-rows", "3000", "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env=_env(**{key: value}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in demo.stdout:  # until the broker, the worker and the stream all run
            lines.append(line)
            if "▶ streaming" in line:
                break
        assert any("worker started" in ln for ln in lines), "".join(lines)
        assert len(_processes_with(marker)) >= 3, "demo, broker and worker should be running"
        time.sleep(2)
        demo.send_signal(signal.SIGINT)
        rest = demo.communicate(timeout=90)[0]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 130, rest[-2000:]
    assert "interrupted: stopping the worker and the broker" in rest
    deadline = time.monotonic() + 10
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_with(marker) == [], "processes left behind by the demo"
