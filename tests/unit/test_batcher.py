from worker.batcher import MicroBatcher


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_batch_is_due_when_full():
    b = MicroBatcher(max_size=3, max_wait_s=1.0, clock=Clock())
    b.add([1, 2])
    assert not b.due() and b.room() == 1
    b.add([3, 4])
    assert b.due()
    assert b.take() == [1, 2, 3]
    assert list(b.take()) == [4]


def test_batch_is_due_when_oldest_record_has_waited():
    clock = Clock()
    b = MicroBatcher(max_size=100, max_wait_s=0.5, clock=clock)
    assert b.wait_s(idle_s=2.0) == 2.0  # empty: poll may block for the idle interval
    b.add(["a"])
    clock.t += 0.25
    b.add(["b"])  # a later record does not restart the clock
    assert not b.due()
    assert b.wait_s(idle_s=2.0) == 0.25
    clock.t += 0.25
    assert b.due()
    assert b.take() == ["a", "b"] and not b.due() and b.oldest_received is None


def test_leftover_after_take_starts_a_new_wait():
    clock = Clock()
    b = MicroBatcher(max_size=2, max_wait_s=1.0, clock=clock)
    b.add([1, 2, 3])
    clock.t += 5
    b.take()
    assert b.oldest_received == clock.t and not b.due()
    assert b.clear() == [3] and len(b) == 0


def test_a_batch_polled_after_a_busy_spell_waits_from_when_the_loop_stopped_listening():
    """Records that reached the broker while the loop scored the previous batch waited
    there: their deadline runs from the poll before, not from the poll that brought them."""
    clock = Clock()
    b = MicroBatcher(max_size=100, max_wait_s=0.5, clock=clock)
    stopped_listening = clock.t
    clock.t += 0.375  # scoring and sending the previous batch
    b.add(["a"], since=stopped_listening)
    assert not b.due() and b.wait_s(idle_s=2.0) == 0.125
    b.add(["b"], since=clock.t)  # a later poll does not move the start
    clock.t += 0.125
    assert b.due() and b.take() == ["a", "b"]
    clock.t += 0.75  # a spell longer than the deadline: due at once
    b.add(["c"], since=clock.t - 0.75)
    assert b.due()


def test_since_is_never_later_than_now():
    clock = Clock()
    b = MicroBatcher(max_size=100, max_wait_s=1.0, clock=clock)
    b.add(["a"], since=clock.t + 10)
    assert b.oldest_received == clock.t


class Rec:
    def __init__(self, n: int | None):
        self.value = None if n is None else b"x" * n


def test_a_batch_holds_at_most_max_bytes_of_values_but_always_one_record():
    b = MicroBatcher(max_size=100, max_wait_s=1.0, clock=Clock(), max_bytes=1000)
    recs = [Rec(400), Rec(400), Rec(None), Rec(300), Rec(2500), Rec(10)]
    b.add(recs[:2])
    assert not b.due()  # 800 bytes
    b.add(recs[2:4])
    assert b.due()  # 1100 bytes: full by size in bytes, not records
    assert b.take() == recs[:3]  # 800 bytes; the 300 would pass 1000
    b.add(recs[4:])
    assert b.take() == [recs[3]]  # 300, then 2 500 would pass it
    assert b.take() == [recs[4]]  # one record larger than max_bytes goes on its own
    assert b.take() == [recs[5]] and len(b) == 0 and not b.due()


def test_records_and_bytes_both_bound_a_batch():
    b = MicroBatcher(max_size=3, max_wait_s=1.0, clock=Clock(), max_bytes=1000)
    recs = [Rec(10) for _ in range(5)]
    b.add(recs)
    assert b.due() and b.take() == recs[:3] and b.take() == recs[3:]
    b.add([Rec(600), Rec(600)])
    assert b.clear() and not b.due()
    b.add([Rec(600)])  # clear forgot the bytes it held
    assert not b.due()


def test_the_worker_settings_bound_its_batches():
    from worker.settings import WorkerSettings

    s = WorkerSettings(max_batch_size=7, max_batch_bytes=900, max_batch_wait_ms=250)
    b = MicroBatcher.of(s)
    assert (b.max_size, b.max_bytes, b.max_wait_s) == (7, 900, 0.25)
