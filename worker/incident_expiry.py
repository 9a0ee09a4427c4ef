"""Which keys of the incident tracker (worker/incidents.py) expired, without looking
at every key: per input partition, a heap of lower bounds of its keys' deadlines, and
each key's place in the tracker's dict order, so that what expired together expires
in that order (the order a scan of the dict would find it in). Pure bookkeeping."""

from __future__ import annotations

import heapq
from collections.abc import Callable

FAR = 1 << 62  # no deadline


class Deadlines:
    """For each (partition, key) that has state, one live heap entry whose bound is at
    most the key's deadline; entries a lower one replaced, and entries of keys that
    left, are stale and dropped when they come up."""

    def __init__(self):
        self._heap: dict[int, list] = {}  # partition → [(bound, tick, (partition, key))]
        self._live: dict[tuple, tuple[int, int]] = {}  # key → (bound, tick) of its entry
        self._stamp: dict[tuple, int] = {}  # key → tick of its last move to the dict's end
        self._tick = 0

    def placed(self, sk: tuple, deadline: int, moved: bool = True) -> None:
        """sk holds state with this deadline now; `moved`: it went to the dict's end."""
        if moved:
            self._tick += 1
            self._stamp[sk] = self._tick
        live = self._live.get(sk)
        if live is None or deadline < live[0]:
            self._push(sk, deadline)

    def expired(self, p: int, stream: int, states: dict, deadline: Callable) -> list:
        """The keys of partition p whose deadline is at most `stream`, in dict order."""
        heap, live = self._heap.get(p, []), self._live
        out = []
        while heap and heap[0][0] <= stream:
            entry = heapq.heappop(heap)
            sk = entry[2]
            if live.get(sk) != entry[:2]:
                continue  # stale: the key has a lower entry
            del live[sk]
            state = states.get(sk)
            if state is None:
                continue  # the key left
            d = deadline(state)
            if d <= stream:
                out.append(sk)
            else:  # its deadline moved later
                self._push(sk, d)
        out.sort(key=self._stamp.__getitem__)
        return out

    def lower_bound(self, p: int) -> int:
        """At most the deadline of every key of partition p."""
        heap = self._heap.get(p)
        return heap[0][0] if heap else FAR

    def rebuild(self, states: dict, deadline: Callable) -> None:
        """From scratch, for states in dict order (after a rollback)."""
        self._heap.clear()
        self._live.clear()
        self._stamp.clear()
        for sk, state in states.items():
            self.placed(sk, deadline(state))

    def drop(self, partitions: set) -> None:
        for p in partitions:
            self._heap.pop(p, None)
        for d in (self._live, self._stamp):
            for sk in [sk for sk in d if sk[0] in partitions]:
                del d[sk]

    def prune(self, states: dict) -> None:
        """Forget the places of keys that left long ago."""
        if len(self._stamp) > 2 * len(states) + 1024:
            self._stamp = {sk: self._stamp[sk] for sk in states}

    def _push(self, sk: tuple, deadline: int) -> None:
        self._tick += 1
        self._live[sk] = (deadline, self._tick)
        heapq.heappush(self._heap.setdefault(sk[0], []), (deadline, self._tick, sk))
