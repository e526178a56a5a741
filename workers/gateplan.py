"""How one model server's permits are shared among worker processes: pure, no I/O.

The fleet-wide state of a model server's gate (``FleetState``) is an adaptive limit and the
holders (worker processes) leasing permits under it. Each holder syncs now and then
(``plan``): it reports its demand, the requests it has in flight, its successes since its
last sync and the overload it saw, and learns how many permits it may use.

- **Adaptive limit (AIMD).** An overload signal (429, 503, a timeout) on a request sent
  under the current epoch lowers the limit to ``decrease`` times what the fleet had in
  flight (or the limit, if lower) and starts a new epoch: the burst of rejections that
  requests sent under the old limit are still bringing back counts once. While the fleet
  still has more in flight than the limit (its holders learn of a lower limit at their
  next sync, and shed as their requests finish) an overload lowers nothing: the excess
  explains it. Successes raise the limit by one per limit's worth (``successes / limit``),
  never above the cap.
- **Fair shares.** The limit is divided max-min fairly over the holders' demands (water
  filling); what nobody demands is spread evenly as headroom, so a holder's demand can grow
  a little between syncs without waiting. A holder is granted its share but never more
  than the others leave free: permits another holder still uses come back to the pool only
  when it syncs after its requests finish, so the total in use stays within the limit.
- **Leases.** A holder that has not synced for ``ttl_ms`` is dropped and its permits are
  free again: a killed worker does not keep its slots.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class GateConfig:
    cap: int  # the operator's ceiling: the limit never exceeds it
    ttl_ms: int = 10_000
    decrease: float = 0.9  # multiplicative decrease on overload
    min_limit: int = 1

    def __post_init__(self) -> None:
        if self.cap < 1 or self.min_limit < 1 or self.min_limit > self.cap:
            raise ValueError("need 1 <= min_limit <= cap")
        if not 0.0 < self.decrease < 1.0:
            raise ValueError("decrease must be between 0 and 1")
        if self.ttl_ms <= 0:
            raise ValueError("ttl_ms must be positive")


@dataclass(frozen=True, slots=True)
class Holder:
    held: int  # permits it may be using: max(its grant, its in-flight) at its last sync
    want: int  # in flight + waiting, at its last sync
    in_use: int
    expires_ms: int


@dataclass(frozen=True, slots=True)
class FleetState:
    limit: float
    epoch: int = 0
    holders: Mapping[str, Holder] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Report:
    """What a holder tells the fleet when it syncs."""

    want: int
    in_use: int
    successes: int = 0  # requests answered since its last sync
    overload_epoch: int | None = None  # the newest epoch of a request that hit an overload


@dataclass(frozen=True, slots=True)
class Grant:
    """What a holder learns when it syncs."""

    permits: int  # it may have this many requests in flight
    share: int  # its fair share (permits < share: others are still giving permits back)
    limit: float
    epoch: int
    in_flight: int  # fleet-wide, as last reported
    wanted: int  # fleet-wide demand, as last reported


def adapt(
    limit: float, epoch: int, report: Report, in_flight: int, cfg: GateConfig
) -> tuple[float, int]:
    """The limit and epoch after one holder's report (AIMD), clamped to the cap."""
    limit = min(limit, float(cfg.cap))
    if report.overload_epoch is not None and report.overload_epoch == epoch:
        if in_flight > limit:  # the fleet has yet to shed down to the limit: that excess
            return limit, epoch  # is the overload's likely cause, not the limit itself
        base = min(limit, float(max(in_flight, 1)))
        return max(float(cfg.min_limit), base * cfg.decrease), epoch + 1
    if report.successes > 0:
        limit = min(float(cfg.cap), limit + report.successes / max(limit, 1.0))
    return max(limit, float(cfg.min_limit)), epoch


def fair_shares(wants: Mapping[str, int], capacity: int) -> dict[str, int]:
    """Max-min fair integer shares of ``capacity`` over ``wants``, plus the capacity nobody
    wants spread evenly; deterministic (ties go by name). The shares sum to ``capacity``."""
    if not wants:
        return {}
    shares: dict[str, int] = {}
    left = capacity
    by_want = sorted(wants, key=lambda h: (wants[h], h))
    for i, holder in enumerate(by_want):
        give = min(max(wants[holder], 0), left // (len(by_want) - i))
        shares[holder] = give
        left -= give
    if left > 0:
        names = sorted(wants)
        each, extra = divmod(left, len(names))
        for i, holder in enumerate(names):
            shares[holder] += each + (1 if i < extra else 0)
    return shares


def plan(
    state: FleetState, holder_id: str, report: Report, now_ms: int, cfg: GateConfig
) -> tuple[FleetState, Grant]:
    """The state after ``holder_id`` synced at ``now_ms`` with ``report``, and its grant."""
    others = {h: v for h, v in state.holders.items() if h != holder_id and v.expires_ms > now_ms}
    in_flight = report.in_use + sum(v.in_use for v in others.values())
    limit, epoch = adapt(state.limit, state.epoch, report, in_flight, cfg)
    capacity = int(limit)
    wants = {h: v.want for h, v in others.items()}
    wants[holder_id] = report.want
    share = fair_shares(wants, capacity)[holder_id]
    free = capacity - sum(v.held for v in others.values())
    permits = max(0, min(share, free))
    me = Holder(
        held=max(permits, report.in_use),
        want=report.want,
        in_use=report.in_use,
        expires_ms=now_ms + cfg.ttl_ms,
    )
    grant = Grant(
        permits=permits,
        share=share,
        limit=limit,
        epoch=epoch,
        in_flight=in_flight,
        wanted=sum(wants.values()),
    )
    return FleetState(limit, epoch, {**others, holder_id: me}), grant
