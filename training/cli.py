"""python -m training: load data, fit, publish a verified checkpoint, write a report.

stdout carries one line, the published version (for scripts); progress, logs and
the human summary go to stderr. A mistake the user can fix ends with one
``error: …`` line and exit code 2, before anything is published.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import structlog
import torch
from pydantic import ValidationError
from pydantic_settings import SettingsError

from training.config import TrainConfig
from training.fit import DataError, FitResult, calibration_rows, fit, split_holdout
from training.report import build_report, write_report
from training.settings import (
    PROG,
    REPORTS_DIRNAME,
    FlagError,
    TrainerSettings,
    parse_cli,
    settings_error_message,
    train_config_error_message,
)
from training.tail import check_target
from worker.checkpoint import list_versions, publish
from worker.datafile import Dataset, load_dataset
from worker.logs import configure_logging
from worker.scoring import Scorer, load_scorer

EXIT_USAGE = 2
EXIT_FAILED = 1
# How long the model topic may take to connect and acknowledge a version.
TOPIC_TIMEOUT_S = 60.0
LOG_EVERY_EPOCHS = 10
SCORE_CHUNK_ROWS = 65_536

log = structlog.get_logger("training")


class UsageError(Exception):
    """A mistake in the command line, settings or paths; the message is one line."""


class TopicPublishError(Exception):
    """The model topic did not take a version (broker away, record too large); the
    version was not published anywhere. The message is one line."""


def main(argv: list[str] | None = None) -> int:
    interactive = sys.stderr.isatty()
    # The worker's set-up: readable on a terminal, JSON lines otherwise, and the same
    # filters on kafka-python's lines (--from-kafka).
    configure_logging(json=not interactive)
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv)
        config = train_config(settings)
        torch.set_num_threads(settings.torch_threads)
        if settings.from_kafka:
            ensure_writable(settings.out, "--out")
            return run_from_kafka(settings, config, interactive)
        dataset = load_dataset(settings.data, settings.label_column, settings.id_column)
        dataset.require_training_rows(settings.data)
        check_target(config.target_fpr, calibration_rows(len(dataset.normal_rows), config))
        ensure_writable(settings.out, "--out")
        if settings.report_dir is not None:
            ensure_writable(settings.report_dir, "--report-dir")
        version = train_and_publish(settings, config, dataset, interactive)
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TopicPublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("error: interrupted; nothing was published", file=sys.stderr)
        return 130
    print(version)
    return 0


def parse_settings(argv: list[str]) -> TrainerSettings:
    try:
        settings = parse_cli(argv)
    except FlagError as e:
        raise UsageError(f"{e} (see {PROG} --help)") from None
    except SettingsError as e:  # a variable that cannot be decoded
        raise UsageError(str(e)) from None
    except ValidationError as e:
        raise UsageError(settings_error_message(e)) from None
    return settings


def train_config(settings: TrainerSettings) -> TrainConfig:
    try:
        return settings.train_config()
    except ValidationError as e:
        raise UsageError(train_config_error_message(e)) from None


def ensure_writable(directory: Path, flag: str) -> None:
    """Create `directory` if needed and prove a file can be written there."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UsageError(f"{flag} {directory} is not a writable directory: {reason}") from None


def train_and_publish(
    settings: TrainerSettings,
    config: TrainConfig,
    dataset: Dataset,
    interactive: bool,
    accept: Callable[[FitResult, np.ndarray], bool] | None = None,
) -> str | None:
    """Fit, publish (verified before LATEST moves), report. With `accept`, a candidate
    it refuses (given the fit and its held-out rows) is not published: returns None."""
    normal = dataset.normal_rows
    log.info(
        "data loaded",
        path=str(settings.data),
        rows=len(dataset),
        features=len(dataset.feature_names),
        labelled=dataset.labels is not None,
        normal_rows=len(normal),
    )
    extra_metrics = {"data_rows": len(dataset), "anomaly_rows_excluded": len(dataset) - len(normal)}
    with EpochProgress(config.max_epochs, interactive) as progress:
        result = fit(normal, dataset.feature_names, config, extra_metrics, on_epoch=progress.update)
    if accept is not None:
        holdout = normal[split_holdout(len(normal), config.holdout_fraction, config.seed)[1]]
        if not accept(result, holdout):
            return None

    verified: list[Scorer] = []

    def verify(version_dir: Path) -> None:
        """Before LATEST moves: the worker's own checks, then the model topic (a
        version the topic did not take is not published at all)."""
        verified.append(load_scorer(version_dir))
        if settings.model_topic:
            publish_to_topic(settings, version_dir)

    version = publish(
        settings.out, result.model, result.manifest, keep=settings.keep, verify=verify
    )
    scorer = verified[0]
    result.manifest = scorer.manifest  # as published: version, created_at, sha256
    log.info("published", version=version, out=str(settings.out), threshold=scorer.threshold)

    report_dir = settings.report_dir_for(version)
    scores = score_rows(scorer, dataset.x) if dataset.labels is not None else None
    summary = {
        "path": str(settings.data),
        "rows": len(dataset),
        "normal_rows_fit": len(normal),
        "features": dataset.feature_names,
        "label_column": dataset.labels is not None,
    }
    report = build_report(result, config, version, summary, scores, dataset.labels)
    write_report(report_dir, report, result, scores, dataset.labels)
    if settings.report_dir is None:
        prune_reports(settings.out)
    print(human_summary(version, settings.out, result, report, report_dir), file=sys.stderr)
    return version


def publish_to_topic(settings: TrainerSettings, version_dir: Path) -> None:
    from kafka.errors import KafkaError

    from worker.model_topic import publish_version

    try:
        publish_version(
            settings.kafka,
            settings.model_topic,
            version_dir,
            settings.model_chunk_bytes,
            keep=settings.keep,
            timeout_s=TOPIC_TIMEOUT_S,
        )
    except KafkaError as e:
        raise TopicPublishError(
            f"publishing {version_dir.name} to topic {settings.model_topic!r}: "
            f"{str(e) or type(e).__name__}; nothing was published"
        ) from None


def run_from_kafka(settings: TrainerSettings, config: TrainConfig, interactive: bool) -> int:
    """One retraining cycle from the input topic, or one every --every-seconds until
    SIGTERM; with --incident-topic also one when a drift incident opens (after
    --drift-delay-seconds, on every record since it opened; at most one per
    --drift-min-interval-seconds)."""
    from kafka.errors import KafkaError

    from training.from_kafka import DriftIncidents, SnapshotError

    # Periodic mode logs a failed cycle and goes on (a model-topic publication too);
    # one cycle ends in one line, or TopicPublishError's own.
    failures = (SnapshotError, DataError, KafkaError, OSError, TopicPublishError)
    if settings.every_seconds is None:
        try:
            version = kafka_cycle(settings, config, interactive)
        except (SnapshotError, DataError, KafkaError, OSError) as e:
            raise UsageError(f"retraining from {settings.input_topic!r}: {e}") from None
        if version:
            print(version, flush=True)
        return 0

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    incidents = None
    if settings.retrain_on_drift:
        try:
            incidents = DriftIncidents(
                settings.kafka, settings.incident_topic, settings.input_topic
            )
        except failures as e:
            raise UsageError(f"watching {settings.incident_topic!r} for drift: {e}") from None
    plan = RetrainPlan(
        settings.every_seconds,
        settings.drift_delay_seconds,
        settings.drift_min_interval_seconds,
        time.monotonic(),
    )
    try:
        while not stop.is_set():
            due = plan.due(time.monotonic())
            if due is not None:
                reason, since_ms = due
                log.info("retraining", reason=reason, since_ms=since_ms)
                try:
                    version = kafka_cycle(settings, config, interactive, since_ms=since_ms)
                    if version:
                        print(version, flush=True)
                    plan.done(reason, time.monotonic(), ok=True)
                except failures as e:
                    log.warning(
                        "retraining cycle skipped", reason=reason, error=str(e) or type(e).__name__
                    )
                    plan.done(reason, time.monotonic(), ok=False)
                continue
            wait_s = max(0.0, min(plan.next_at(time.monotonic()), 1.0 if incidents else 3600.0))
            if incidents is None:
                stop.wait(wait_s)
                continue
            try:
                opened = incidents.poll(wait_s)
            except KafkaError as e:
                log.warning("incident poll failed", error=str(e) or type(e).__name__)
                stop.wait(1.0)
                continue
            for started_ms in opened:
                log.info("drift_opened", topic=settings.input_topic, started_at_ms=started_ms)
                plan.drift(started_ms, time.monotonic())
    finally:
        if incidents is not None:
            incidents.close()
    return 0


class RetrainPlan:
    """When the periodic trainer retrains next: every `every_s`, and `delay_s` after a
    drift incident opens, at most once per `min_interval_s` of drift retrains; a drift
    retrain takes only the records since the incident opened. A failed drift retrain
    (too few rows since the shift, for example) is tried again after `delay_s`."""

    def __init__(self, every_s: float, delay_s: float, min_interval_s: float, now: float):
        self.every_s, self.delay_s, self.min_interval_s = every_s, delay_s, min_interval_s
        self.timer_at = now  # the first cycle at once, as without drift
        self.drift_since_ms: int | None = None
        self.drift_at = float("inf")
        self.last_drift_retrain = -float("inf")

    def drift(self, started_at_ms: int, now: float) -> None:
        if self.drift_since_ms is None:
            self.drift_at = max(now + self.delay_s, self.last_drift_retrain + self.min_interval_s)
        # a later opening moves the snapshot's start on: records after the newest shift
        self.drift_since_ms = max(started_at_ms, self.drift_since_ms or started_at_ms)

    def due(self, now: float) -> tuple[str, int | None] | None:
        if self.drift_since_ms is not None and now >= self.drift_at:
            return "drift", self.drift_since_ms
        if now >= self.timer_at:
            return "timer", None
        return None

    def next_at(self, now: float) -> float:
        """Seconds until the next cycle may be due."""
        return min(self.timer_at, self.drift_at) - now

    def done(self, reason: str, now: float, ok: bool) -> None:
        self.timer_at = now + self.every_s
        if reason != "drift":
            return
        if ok:
            self.last_drift_retrain = now
            self.drift_since_ms, self.drift_at = None, float("inf")
        else:
            self.drift_at = now + self.delay_s


def kafka_cycle(
    settings: TrainerSettings, config: TrainConfig, interactive: bool, since_ms: int | None = None
) -> str | None:
    from training.from_kafka import compare_with_live, live_scorer, read_snapshot, snapshot_rows

    live = live_scorer(settings.out)
    records = read_snapshot(
        settings.kafka,
        settings.input_topic,
        settings.max_records,
        settings.max_seconds,
        since_ms=since_ms,
    )
    # After drift the live model is the one that no longer fits: what it flags is mostly
    # the new operating point's tail, and leaving that out would truncate the new model's
    # calibration (its live anomaly rate then overshoots the target and shadow refuses
    # it). A drift retrain keeps every row; the live model still names the features.
    snap = snapshot_rows(records, live, leave_out_anomalies=since_ms is None)
    log.info(
        "snapshot",
        topic=settings.input_topic,
        records=snap.records,
        since_ms=since_ms,
        rejected=snap.rejected,
        excluded_anomalies=snap.excluded_anomalies,
        rows=len(snap.rows),
        live_model=live.version if live else None,
    )
    dataset = Dataset(x=snap.rows, feature_names=snap.feature_names)
    dataset.require_training_rows(f"topic {settings.input_topic}")

    def not_worse(result: FitResult, holdout: np.ndarray) -> bool:
        if live is None:
            return True
        ok, new, old = compare_with_live(result.scorer(), live, holdout)
        log.info(
            "candidate vs live",
            candidate_error=new,
            live_error=old,
            publish=ok,
            live_model=live.version,
        )
        return ok

    # A drift retrain is not compared with the live model: the live model is the one that
    # no longer fits, and its reconstruction error on rows it knows from before the shift
    # (all a comparison on held-out rows can show for a score like knn) held back every
    # retrain after shifts along the sensors' correlations. Shadow scoring on live
    # traffic (worker/shadow.py) is the gate for these candidates.
    accept = not_worse
    if since_ms is not None and live is not None:
        log.info("drift retrain: not compared with the live model", live_model=live.version)
        accept = None
    version = train_and_publish(settings, config, dataset, interactive, accept=accept)
    if version is None:
        print(
            "candidate not published: worse than the live model on held-out normal rows",
            file=sys.stderr,
        )
    return version


def score_rows(scorer: Scorer, x: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [
            scorer.score_batch(x[i : i + SCORE_CHUNK_ROWS]).scores
            for i in range(0, len(x), SCORE_CHUNK_ROWS)
        ]
    )


def prune_reports(model_dir: Path) -> None:
    """Drop default-location reports whose version has been pruned."""
    reports = model_dir / REPORTS_DIRNAME
    live = set(list_versions(model_dir))
    for d in reports.iterdir() if reports.is_dir() else ():
        if d.is_dir() and d.name not in live:
            shutil.rmtree(d, ignore_errors=True)


def human_summary(
    version: str, out: Path, result: FitResult, report: dict, report_dir: Path
) -> str:
    m, h = result.manifest, result.history
    lines = [
        f"published {version} to {out}",
        f"  trained {len(h.train_loss)} epochs (best {h.best_epoch + 1}), "
        f"validation loss {h.val_loss[h.best_epoch]:.4g}, penalty weight {m.penalty_weight:g}",
        f"  threshold {m.threshold:.4g} for a target false-positive rate of {m.target_fpr:g}",
    ]
    ev = report.get("evaluation")
    if ev:
        lines.append(
            f"  on {ev['rows']} labelled rows ({ev['anomalies']} anomalies): ROC-AUC {_fmt(ev['roc_auc'])}, "
            f"PR-AUC {_fmt(ev['average_precision'])}, precision {_fmt(ev['precision'])}, "
            f"recall {_fmt(ev['recall'])}, FPR {_fmt(ev['fpr'])}"
        )
    lines.append(f"  report: {report_dir}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class EpochProgress:
    """A progress bar on a terminal; a structured log line every few epochs otherwise."""

    def __init__(self, max_epochs: int, interactive: bool):
        self._bar = None
        if interactive:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=max_epochs, unit="epoch", file=sys.stderr, leave=False)

    def update(self, epoch: int, train_loss: float, val_loss: float) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}", refresh=False)
        elif epoch % LOG_EVERY_EPOCHS == 0:
            log.info("epoch", epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss)

    def __enter__(self) -> EpochProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
