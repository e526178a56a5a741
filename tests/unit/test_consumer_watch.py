"""``ConsumerWatch``: when a worker's broker consumer counts as dead, on a fake clock."""

from __future__ import annotations

from workers.health import OK, STALLED, ConsumerWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ticks(watch: ConsumerWatch, clock: Clock, seconds: float, **seen: int) -> None:
    """Heartbeat observations every 2 s for ``seconds``."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += 2
        watch.observe(**seen)


def make(clock: Clock, fired: list[float]) -> ConsumerWatch:
    return ConsumerWatch(60, clock=clock, on_stall=fired.append)


def test_messages_waiting_with_free_slots_and_nothing_received_is_a_dead_consumer() -> None:
    clock, fired = Clock(), []
    watch = make(clock, fired)
    ticks(watch, clock, 58, queued=5, held=0, slots=4)
    assert watch.state == OK and fired == []
    ticks(watch, clock, 4, queued=5, held=0, slots=4)
    assert watch.state == STALLED
    assert len(fired) == 1 and fired[0] >= 60
    ticks(watch, clock, 30, queued=5, held=0, slots=4)
    assert len(fired) == 1  # said once


def test_a_message_received_or_an_empty_queue_or_full_slots_keeps_it_alive() -> None:
    clock, fired = Clock(), []
    watch = make(clock, fired)
    for _ in range(10):  # a busy consumer: messages keep waiting, but it takes them
        ticks(watch, clock, 30, queued=5, held=1, slots=4)
        watch.received()
    ticks(watch, clock, 300, queued=0, held=0, slots=4)  # idle: nothing to take
    ticks(watch, clock, 300, queued=9, held=4, slots=4)  # every slot busy: cannot take
    assert watch.state == OK and fired == []


def test_a_consumer_that_receives_again_is_alive_again() -> None:
    clock, fired = Clock(), []
    watch = make(clock, fired)
    ticks(watch, clock, 70, queued=1, held=0, slots=1)
    assert watch.state == STALLED
    ticks(watch, clock, 30, queued=0, held=0, slots=1)  # others emptied the queue
    assert watch.state == STALLED  # that says nothing about this consumer
    watch.received()
    assert watch.state == OK


def test_time_without_observations_does_not_count_against_the_consumer() -> None:
    # given a consumer waited on for 50 s, then Redis down for 100 s (no observations)
    clock, fired = Clock(), []
    watch = make(clock, fired)
    ticks(watch, clock, 50, queued=3, held=0, slots=2)
    clock.now += 100

    # when Redis is back, the consumer gets the whole window again to reconnect and take
    ticks(watch, clock, 50, queued=3, held=0, slots=2)
    assert watch.state == OK
    ticks(watch, clock, 12, queued=3, held=0, slots=2)
    assert watch.state == STALLED
