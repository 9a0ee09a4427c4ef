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
