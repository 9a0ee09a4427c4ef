"""Pipeline: micro-batches whose outputs are in flight, oldest first.

Pure logic over producer futures (anything with `is_done`, `exception` and
`get(timeout)`), so the commit rule is tested with fakes:

* a batch is **acknowledged** when every one of its outputs is;
* only a run of acknowledged batches at the head may be committed: never a batch
  behind an unfinished or failed one;
* a failed output fails its batch; the failed batch and everything behind it stay
  until `abandon`, which hands back their records so the consumer can rewind
  (`Abandoned`: also the outputs that must go out with the next batch instead);
* a batch added unflushed (its incident state's changelog records held back, to be
  sent coalesced with later batches') is not committed before `flushed` hands it the
  futures of those records and they too are acknowledged.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka.structs import OffsetAndMetadata, TopicPartition

from worker.step import BatchOutcome


class PublishError(Exception):
    """The broker did not acknowledge every output of a batch; nothing was committed."""


@dataclass(slots=True)
class Finished:
    """A batch whose outputs were all acknowledged, and how long that took."""

    outcome: BatchOutcome
    publish_s: float


@dataclass(slots=True)
class Settled:
    """What one settling step finished, and the failure that stopped it, if any."""

    finished: list[Finished] = field(default_factory=list)
    error: Exception | None = None


@dataclass(slots=True)
class Abandoned:
    """What a failed delivery hands back, oldest first: the records to read and score
    again, and the outputs to send with the next batch instead, because they are not
    derived from those records alone (drift incidents: the drift monitor is not rolled
    back, so scoring the records again does not announce them again)."""

    records: list = field(default_factory=list)
    carried: list = field(default_factory=list)

    @classmethod
    def of(cls, outcomes: list[BatchOutcome]) -> Abandoned:
        return cls([r for o in outcomes for r in o.records], [d for o in outcomes for d in o.drift])


@dataclass(slots=True)
class _InFlight:
    outcome: BatchOutcome
    futures: list
    sent_at: float
    flushed: bool = True  # False: outputs still held back, and with them the commit
    checked: int = 0  # futures before this index are done and succeeded

    def state(self) -> str:
        """'acked', 'failed' or 'pending'; scans each future once over the batch's life."""
        futures, i = self.futures, self.checked
        while i < len(futures) and futures[i].is_done:
            if futures[i].exception is not None:
                self.checked = i
                return "failed"
            i += 1
        self.checked = i
        return "acked" if i == len(futures) else "pending"

    def wait(self, deadline: float, clock: Callable[[], float]) -> None:
        for f in self.futures[self.checked :]:
            if f.is_done:
                if f.exception is not None:
                    return
                continue
            try:
                f.get(timeout=max(0.0, deadline - clock()))
            except Exception:  # failed or timed out: state() tells which
                return


def merge_offsets(outcomes: list[BatchOutcome]) -> dict[TopicPartition, OffsetAndMetadata]:
    """The offsets that commit `outcomes`, oldest first: the newest per partition."""
    merged: dict[TopicPartition, OffsetAndMetadata] = {}
    for outcome in outcomes:
        merged.update(outcome.offsets)
    return merged


class Pipeline:
    """At most `depth` batches in flight, oldest first."""

    def __init__(self, depth: int, clock: Callable[[], float] = time.perf_counter):
        self.depth = depth
        self.clock = clock
        self._batches: deque[_InFlight] = deque()
        self._records = 0

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def records(self) -> int:
        """Consumer records whose batches are in flight."""
        return self._records

    def full(self) -> bool:
        return len(self._batches) >= self.depth

    def add(self, outcome: BatchOutcome, futures: list, flushed: bool = True) -> None:
        self._batches.append(_InFlight(outcome, futures, self.clock(), flushed))
        self._records += len(outcome.records)

    def unflushed(self) -> tuple[int, float]:
        """Batches added unflushed and not flushed yet, and the age of the oldest (s)."""
        waiting = [b for b in self._batches if not b.flushed]
        return len(waiting), (self.clock() - waiting[0].sent_at if waiting else 0.0)

    def flushed(self, futures: list) -> None:
        """The held-back outputs of every unflushed batch went out as `futures`: each of
        those batches is acknowledged only once they are too."""
        for b in self._batches:
            if not b.flushed:
                b.futures = b.futures + futures
                b.flushed = True

    def wait_head(self, timeout_s: float) -> None:
        """Block until the oldest batch is acknowledged, has failed, or `timeout_s` passed."""
        if self._batches:
            self._batches[0].wait(self.clock() + timeout_s, self.clock)

    def take_acknowledged(self) -> Settled:
        """Pop the acknowledged batches at the head, oldest first, up to the first
        unfinished or failed one. A failed head batch is reported as the error and
        stays, with everything behind it, for `abandon`."""
        settled = Settled()
        now = self.clock()
        while self._batches:
            head = self._batches[0]
            state = head.state()
            if state == "pending" or state == "acked" and not head.flushed:
                break
            if state == "failed":
                failed = head.futures[head.checked]
                bad = sum(1 for f in head.futures if f.is_done and f.exception is not None)
                settled.error = PublishError(
                    f"{bad} of {len(head.futures)} outputs not acknowledged: {failed.exception}"
                )
                break
            self._batches.popleft()
            self._records -= len(head.outcome.records)
            settled.finished.append(Finished(head.outcome, now - head.sent_at))
        return settled

    def head_age_s(self) -> float:
        """How long ago the oldest batch in flight was sent (0 when empty)."""
        return self.clock() - self._batches[0].sent_at if self._batches else 0.0

    def unfinished(self) -> int:
        """Outputs of the head batch not acknowledged yet (0 when empty)."""
        if not self._batches:
            return 0
        head = self._batches[0]
        return sum(1 for f in head.futures if not f.is_done)

    def abandon(self) -> Abandoned:
        """Drop every batch in flight; their records, oldest first, to rewind to."""
        abandoned = Abandoned.of([b.outcome for b in self._batches])
        self._batches.clear()
        self._records = 0
        return abandoned
