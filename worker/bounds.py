"""RunBounds: when a bounded run (WORKER_MAX_RECORDS, WORKER_IDLE_TIMEOUT_S) is done."""

from __future__ import annotations

import time
from collections.abc import Callable


class RunBounds:
    """When a bounded run (WORKER_MAX_RECORDS, WORKER_IDLE_TIMEOUT_S) is done.

    Idle means partitions held and nothing arriving: a worker joining or rejoining
    its group (a restart waits out the dead member's session) holds none and is not
    idle, and the clock restarts at each assignment.
    """

    def __init__(
        self,
        max_records: int | None,
        idle_timeout_s: float | None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_records = max_records
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self.partitions_held = 0
        self.last_arrival = clock()

    def held(self, partitions: int, assigned: bool = False) -> None:
        self.partitions_held = partitions
        if assigned:
            self.last_arrival = self.clock()

    def arrived(self) -> None:
        self.last_arrival = self.clock()

    def room(self, done: int, in_hand: int) -> int | None:
        """How many more records may be polled, or None when unbounded."""
        return None if self.max_records is None else self.max_records - done - in_hand

    def done(self, records_done: int, in_hand: int) -> bool:
        if self.max_records is not None and records_done >= self.max_records:
            return True
        if self.idle_timeout_s is None or in_hand or not self.partitions_held:
            return False
        return self.clock() - self.last_arrival >= self.idle_timeout_s
