"""MicroBatcher: release a batch when it is full (records or bytes) or its oldest record
has waited long enough."""

from __future__ import annotations

import time
from collections.abc import Callable


class MicroBatcher:
    """Accumulates polled records; pure logic, the clock is injectable for tests.

    A batch is due when it holds `max_size` records or `max_bytes` bytes of record
    values, or when the oldest record in it has waited `max_wait_s` since it could first
    have been received: since the loop stopped listening before it came
    (`add(records, since)`), else since it was polled. A batch is at most `max_size`
    records and, but for its first record, `max_bytes` bytes: many small records make
    large batches (the loop's fixed cost per batch is spread over more of them), large
    multi-row records no larger ones than `max_bytes` allows (memory).

    Why `since`: while the loop scores and sends a batch it does not poll, so the next
    batch's records wait in the broker for that long before they reach the batcher.
    Counting their wait from the poll that brought them would add the whole scoring
    time to the deadline (a batch every deadline + scoring time, and records waiting
    both); counting it from when the loop stopped listening starts a batch every
    deadline at moderate load, as a trigger interval does, and a record waits at most
    one deadline for its batch to start.
    """

    def __init__(
        self,
        max_size: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int | None = None,
    ):
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.max_bytes = max_bytes
        self.clock = clock
        self._records: list = []
        self._sizes: list[int] = []  # each record's value bytes, with max_bytes
        self._bytes = 0
        self._oldest: float | None = None

    @classmethod
    def of(cls, settings) -> MicroBatcher:
        """The batcher of WorkerSettings' batch bounds (records, bytes, deadline)."""
        return cls(
            settings.max_batch_size,
            settings.max_batch_wait_ms / 1000,
            max_bytes=settings.max_batch_bytes,
        )

    def __len__(self) -> int:
        return len(self._records)

    @property
    def oldest_received(self) -> float | None:
        return self._oldest

    def room(self) -> int:
        return max(0, self.max_size - len(self._records))

    def add(self, records: list, since: float | None = None) -> None:
        """Take polled records; `since`: when the loop last stopped listening before
        they came (no later than now), which starts the wait of an empty batcher."""
        if records and self._oldest is None:
            now = self.clock()
            self._oldest = now if since is None else min(since, now)
        self._records.extend(records)
        if self.max_bytes is not None:
            sizes = [0 if r.value is None else len(r.value) for r in records]
            self._sizes.extend(sizes)
            self._bytes += sum(sizes)

    def due(self) -> bool:
        if not self._records:
            return False
        return (
            len(self._records) >= self.max_size
            or (self.max_bytes is not None and self._bytes >= self.max_bytes)
            or self.clock() - self._oldest >= self.max_wait_s
        )

    def wait_s(self, idle_s: float) -> float:
        """How long the next poll may block: until the batch is due, or `idle_s` when empty."""
        if not self._records:
            return idle_s
        return max(0.0, self._oldest + self.max_wait_s - self.clock())

    def take(self) -> list:
        """Up to max_size records and max_bytes bytes (at least one record), oldest
        first; the rest start the next batch."""
        n = min(self.max_size, len(self._records))
        if self.max_bytes is not None:
            if self._bytes > self.max_bytes:
                total, n = 0, 0
                for size in self._sizes[: self.max_size]:
                    if n and total + size > self.max_bytes:
                        break
                    total, n = total + size, n + 1
            taken, self._sizes = self._sizes[:n], self._sizes[n:]
            self._bytes -= sum(taken)
        batch, self._records = self._records[:n], self._records[n:]
        self._oldest = self.clock() if self._records else None
        return batch

    def clear(self) -> list:
        """Everything in hand, oldest first; the batcher is empty afterwards."""
        records, self._records, self._oldest = self._records, [], None
        self._sizes, self._bytes = [], 0
        return records
