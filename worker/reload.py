"""CheckpointWatcher: verifies each new version in the background; the loop swaps it in.

Versions come from a source: the model directory's LATEST (DirectorySource, the
default) or the model topic (worker.model_topic.ModelTopicSource, WORKER_MODEL_TOPIC).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import structlog

from worker.checkpoint import CheckpointError, read_latest
from worker.metrics import WorkerMetrics
from worker.scoring import Precision, Scorer, load_scorer
from worker.settings import WorkerSettings

log = structlog.get_logger("worker.reload")

RETRY_AFTER_S = 30.0


class CheckpointSource(Protocol):
    """Where versions come from. `latest()` names the version on offer (None: none
    yet); `open(version)` returns a local directory holding its files (raises a
    CheckpointError for one that must not be served); `verified` and `refused` tell
    the source how the watcher's verification of it ended."""

    where: str

    def latest(self) -> str | None: ...
    def open(self, version: str) -> Path: ...
    def verified(self, version: str) -> None: ...
    def refused(self, version: str, final: bool) -> None: ...
    def close(self) -> None: ...


class DirectorySource:
    """The model directory: LATEST names the version, its directory holds it. LATEST
    may name an older version again (a rollback): it is loaded like any other."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.where = str(self.model_dir)

    def latest(self) -> str | None:
        return read_latest(self.model_dir)

    def open(self, version: str) -> Path:
        return self.model_dir / version

    def verified(self, version: str) -> None:
        pass

    def refused(self, version: str, final: bool) -> None:
        pass

    def close(self) -> None:
        pass


def source_for(settings: WorkerSettings) -> CheckpointSource:
    """The model topic when WORKER_MODEL_TOPIC is set, else the model directory."""
    if settings.model_topic:
        from worker.model_topic import ModelTopicSource

        return ModelTopicSource(settings.kafka, settings.model_topic, settings.model_cache_dir)
    return DirectorySource(settings.model_dir)


class CheckpointWatcher:
    """Polls the source; a changed version is read, verified and golden-checked on the
    worker's device in this thread (with CUDA graphs, every bucket's graph is captured
    and checked here, so the loop never stalls on a capture). A verified scorer waits
    in `pending` until the
    loop takes it between two batches; a refused one is logged, counted, and the
    serving model stays.

    Every failure to load a version refuses that version, whatever raised: a
    checkpoint error is the file's fault; anything else (out of memory, a driver
    error, a file pruned between LATEST and the read) is logged with its traceback.
    No version ends the watching; `alive` says whether the thread still runs.
    """

    def __init__(
        self,
        source: CheckpointSource | str | Path,
        device,
        precision: Precision,
        poll_s: float,
        metrics: WorkerMetrics,
        cuda_graphs: bool = True,
        top_k: int = 3,
    ):
        self.source = source if hasattr(source, "latest") else DirectorySource(source)
        self.device = device
        self.precision = precision
        self.poll_s = poll_s
        self.metrics = metrics
        self.cuda_graphs = cuda_graphs
        self.top_k = top_k
        self._seen: str | None = None
        self._pending: Scorer | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint-watcher", daemon=True)
        self.refused: dict[str, str] = {}
        # A version refused for the machine's sake (out of memory, a driver error, a
        # file pruned mid-read), not the file's, is tried again after this long.
        self.retry_after_s = RETRY_AFTER_S
        self._retry_at = float("inf")

    @property
    def where(self) -> str:
        return self.source.where

    def check_once(self) -> Scorer | None:
        """Look at the source once; return a newly verified scorer, if any."""
        try:
            version = self.source.latest()
        except Exception as e:  # LATEST unreadable, or not a version name
            if self._seen != "<invalid LATEST>":
                self._seen = "<invalid LATEST>"
                self._refuse("<LATEST>", e)
            return None
        if version is None or (version == self._seen and time.monotonic() < self._retry_at):
            return None
        self._seen, self._retry_at = version, float("inf")
        t0 = time.perf_counter()
        try:
            scorer = load_scorer(
                self.source.open(version),
                self.device,
                self.precision,
                self.cuda_graphs,
                top_k=self.top_k,
            )
        except Exception as e:
            self._refuse(version, e)
            final = isinstance(e, CheckpointError)
            if not final:  # the machine's fault: may pass later
                self._retry_at = time.monotonic() + self.retry_after_s
            self.source.refused(version, final)
            return None
        self.source.verified(version)
        log.info("model_verified", version=version, seconds=round(time.perf_counter() - t0, 3))
        return scorer

    def _refuse(self, version: str, e: Exception) -> None:
        reason = type(e).__name__
        self.refused[version] = reason
        self.metrics.reloads.labels(result="refused", reason=reason).inc()
        log.error(
            "model_refused",
            version=version,
            reason=reason,
            detail=str(e),
            action="keeping the serving model",
            # not the file's fault (a bug, the machine): keep the traceback
            exc_info=None if isinstance(e, CheckpointError) else e,
        )

    def wait_for_first(
        self,
        timeout_s: float,
        stop: threading.Event | None = None,
        beat: Callable[[], None] = lambda: None,
    ) -> Scorer | None:
        """The first verified scorer, waiting up to timeout_s; `beat` is called while
        waiting (waiting for a model is alive, not stalled)."""
        deadline = time.monotonic() + timeout_s
        announced = False
        while True:
            beat()
            scorer = self.check_once()
            if scorer is not None:
                return scorer
            if time.monotonic() >= deadline or (stop is not None and stop.is_set()):
                return None
            if not announced:
                log.warning("waiting_for_model", source=self.where, timeout_s=timeout_s)
                announced = True
            time.sleep(min(self.poll_s, 0.5))

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                scorer = self.check_once()
            except Exception:  # counting or logging a refusal failed: look again next poll
                log.exception("checkpoint_watch_failed", source=self.where)
                continue
            if scorer is not None:
                with self._lock:
                    self._pending = scorer

    @property
    def alive(self) -> bool:
        """False once the watcher's thread has ended while it should be running
        (True before start and after stop)."""
        return self._stop.is_set() or not self._thread.ident or self._thread.is_alive()

    def take(self) -> Scorer | None:
        with self._lock:
            scorer, self._pending = self._pending, None
        return scorer

    def start(self) -> CheckpointWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.source.close()
