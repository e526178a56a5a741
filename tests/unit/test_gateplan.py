"""The fleet's rules for a model server's permits: AIMD on the limit, fair shares, leases."""

from __future__ import annotations

import pytest

from workers.gateplan import FleetState, GateConfig, Holder, Report, adapt, fair_shares, plan

CFG = GateConfig(cap=16, ttl_ms=10_000, decrease=0.9, min_limit=1)


def sync(
    state: FleetState, holder: str, want: int, in_use: int = 0, now: int = 0, **kw: object
) -> tuple[FleetState, int]:
    new, grant = plan(state, holder, Report(want, in_use, **kw), now, CFG)  # type: ignore[arg-type]
    return new, grant.permits


# -- AIMD ------------------------------------------------------------------------------


def test_an_overload_under_the_current_epoch_lowers_the_limit_from_what_was_in_flight() -> None:
    # given a limit of 16 with 12 requests in flight fleet-wide when a 429 came back
    limit, epoch = adapt(16.0, 3, Report(12, 12, overload_epoch=3), in_flight=12, cfg=CFG)
    # then the limit falls to 0.9 of the 12 in flight, and a new epoch begins
    assert limit == pytest.approx(10.8)
    assert epoch == 4


def test_overloads_of_requests_sent_under_an_older_limit_count_once() -> None:
    # given the limit already lowered once (epoch 4), a late 429 of a request sent in epoch 3
    limit, epoch = adapt(10.8, 4, Report(12, 12, overload_epoch=3), in_flight=12, cfg=CFG)
    # then nothing changes: that burst was already answered
    assert (limit, epoch) == (10.8, 4)


def test_an_overload_while_the_fleet_is_still_above_the_limit_lowers_nothing() -> None:
    # given a limit just lowered to 14.4, with holders that have not shed yet (16 in flight)
    limit, epoch = adapt(14.4, 1, Report(16, 8, overload_epoch=1), in_flight=16, cfg=CFG)
    # then a 429 of a request sent under that limit is blamed on the excess, not the limit
    assert (limit, epoch) == (14.4, 1)
    # and once they have shed, the next one counts
    limit, epoch = adapt(14.4, 1, Report(14, 7, overload_epoch=1), in_flight=14, cfg=CFG)
    assert limit == pytest.approx(0.9 * 14) and epoch == 2


def test_successes_raise_the_limit_by_one_per_limits_worth_up_to_the_cap() -> None:
    limit, epoch = adapt(10.0, 2, Report(10, 10, successes=5), in_flight=10, cfg=CFG)
    assert limit == pytest.approx(10.5) and epoch == 2
    limit, _ = adapt(15.9, 2, Report(10, 10, successes=100), in_flight=10, cfg=CFG)
    assert limit == 16.0  # never above the cap


def test_the_limit_never_falls_below_the_floor_nor_stays_above_a_lowered_cap() -> None:
    limit, _ = adapt(1.0, 0, Report(1, 1, overload_epoch=0), in_flight=1, cfg=CFG)
    assert limit == 1.0
    # a stored limit above the cap (the operator lowered ACTFLEET_MODEL_MAX_INFLIGHT) is cut
    limit, _ = adapt(64.0, 0, Report(0, 0), in_flight=0, cfg=CFG)
    assert limit == 16.0


def test_repeated_overloads_converge_on_what_the_server_takes() -> None:
    # given a server that takes 10 at once and a fleet that always has work for more
    limit, epoch = 16.0, 0
    for _ in range(200):
        in_flight = int(limit)
        if in_flight > 10:  # a request beyond the server's capacity is refused
            limit, epoch = adapt(
                limit, epoch, Report(99, in_flight, overload_epoch=epoch), in_flight, CFG
            )
        else:
            limit, epoch = adapt(limit, epoch, Report(99, in_flight, successes=4), in_flight, CFG)
    # then the limit saws just around the capacity: above 0.9 of it, at most one over it
    assert 9.0 <= limit < 12.0


# -- fair shares -----------------------------------------------------------------------


def test_shares_are_max_min_fair_and_sum_to_the_capacity() -> None:
    assert fair_shares({"a": 100, "b": 100}, 16) == {"a": 8, "b": 8}
    # a small demand is met in full; the rest is split among the hungry
    assert fair_shares({"a": 2, "b": 100, "c": 100}, 16) == {"a": 2, "b": 7, "c": 7}
    # an idle holder gets nothing while others need it all
    assert fair_shares({"idle": 0, "busy": 100}, 16) == {"idle": 0, "busy": 16}
    # what nobody wants is spread as headroom, so every share has room to grow
    assert fair_shares({"a": 3, "b": 5}, 16) == {"a": 7, "b": 9}
    for wants in ({"a": 1, "b": 2, "c": 30}, {"x": 0}, {"a": 9, "b": 9, "c": 9}):
        assert sum(fair_shares(wants, 17).values()) == 17


def test_an_odd_capacity_is_split_deterministically() -> None:
    assert fair_shares({"a": 100, "b": 100}, 17) == {"a": 8, "b": 9}
    assert fair_shares({"b": 100, "a": 100}, 17) == {"a": 8, "b": 9}


# -- plan: grants, hogs, leases ----------------------------------------------------------


def test_one_holder_alone_gets_the_whole_limit() -> None:
    _, permits = sync(FleetState(16.0), "w1", want=3)
    assert permits == 16


def test_a_newcomer_waits_for_a_hog_to_give_back_and_then_they_share() -> None:
    # given w1 alone, holding all 16 permits, all in use
    state, permits = sync(FleetState(16.0), "w1", want=40, in_use=0)
    assert permits == 16
    state, _ = sync(state, "w1", want=40, in_use=16)
    # when w2 arrives wanting as much, nothing is free: it gets nothing yet
    state, w2 = sync(state, "w2", want=40)
    assert w2 == 0
    # then w1's next sync cuts it to its fair share, though its requests still run
    state, w1 = sync(state, "w1", want=40, in_use=16)
    assert w1 == 8
    assert state.holders["w1"].held == 16  # the 16 in flight still count as held
    # and once w1's requests above its share have finished, w2 gets its half
    state, _ = sync(state, "w1", want=40, in_use=8)
    state, w2 = sync(state, "w2", want=40)
    assert w2 == 8
    assert sum(h.held for h in state.holders.values()) <= 16


def test_the_total_held_never_exceeds_the_limit_however_holders_interleave() -> None:
    import random

    rng = random.Random(7)
    state = FleetState(16.0)
    in_use = {f"w{i}": 0 for i in range(4)}
    granted = dict.fromkeys(in_use, 0)
    for step in range(2000):
        h = rng.choice(sorted(in_use))
        # a holder has anything from none to all of its last grant in flight
        in_use[h] = rng.randint(0, granted[h])
        state, granted[h] = sync(state, h, want=rng.randint(0, 30), in_use=in_use[h], now=step)
        assert sum(v.held for v in state.holders.values()) <= 16
        assert granted[h] <= 16


def test_a_holder_that_stops_syncing_loses_its_permits_after_the_ttl() -> None:
    state, _ = sync(FleetState(16.0), "dead", want=40, now=0)
    state, _ = sync(state, "dead", want=40, in_use=16, now=1)
    # before the lease ends, its 16 in flight keep the newcomer out
    state, permits = sync(state, "alive", want=40, now=9_000)
    assert permits == 0
    # after it (no sync for 10 s), they are free and the dead holder is forgotten
    state, permits = sync(state, "alive", want=40, now=10_002)
    assert permits == 16
    assert set(state.holders) == {"alive"}


def test_a_lowered_limit_cuts_the_grants() -> None:
    state, _ = sync(FleetState(16.0), "w1", want=40, in_use=0)
    state, _ = sync(state, "w1", want=40, in_use=16)
    # when w1 reports a 429 from a request of the current epoch, with 16 in flight
    state, permits = sync(state, "w1", want=40, in_use=16, overload_epoch=0)
    # then the limit is 0.9 * 16 and so is its grant (it sheds as requests finish)
    assert state.limit == pytest.approx(14.4) and state.epoch == 1
    assert permits == 14


def test_a_holders_entry_records_what_it_uses_and_when_its_lease_ends() -> None:
    state, _ = sync(FleetState(16.0), "w1", want=5, in_use=2, now=500)
    assert state.holders["w1"] == Holder(held=16, want=5, in_use=2, expires_ms=10_500)


def test_config_is_checked() -> None:
    for bad in (
        {"cap": 0},
        {"cap": 4, "min_limit": 5},
        {"cap": 4, "decrease": 1.0},
        {"cap": 4, "ttl_ms": 0},
    ):
        with pytest.raises(ValueError):
            GateConfig(**bad)  # type: ignore[arg-type]
