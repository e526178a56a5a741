"""Where a model server's gate state lives: one Redis hash per server (``Keys.gate``).

A sync is one script (``SYNC``), atomic in Redis, one round trip: it drops expired
holders, adapts the limit, computes this holder's grant and records its report. The rules
are ``workers.gateplan.plan``'s, in Lua: the Python is the specification, unit-tested on
its own, and a test runs random histories through both and requires the same answers.
(A read, a computation in Python and a compare-and-set would keep one copy of the rules,
but workers whose syncs overlap would keep losing the race: a fleet of fifty processes
syncing five times a second would lose about half of them.) Redis's clock times the
leases, so workers on machines whose clocks disagree still expire each other correctly.
"""

from __future__ import annotations

import hashlib
import urllib.parse
from collections.abc import Mapping
from typing import Protocol

import redis

from agent.text import text_of
from store.keys import GATE_STATE_TTL_S, Keys
from workers.gateplan import FleetState, GateConfig, Grant, Holder, Report

HOLDER_PREFIX = "h:"

# SYNC: one holder's sync, as workers.gateplan.plan (keep the two in step).
# KEYS: 1 the gate hash.
# ARGV: 1 holder, 2 want, 3 in_use, 4 successes, 5 overload epoch (-1: none), 6 cap,
#       7 lease ttl_ms, 8 decrease, 9 min_limit, 10 hash ttl_ms, 11 now_ms ("": Redis's clock)
# Returns: {permits, share, limit (as "%.17g"), epoch, in_flight, wanted}.
SYNC = """
local me, want, in_use = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local successes, overload = tonumber(ARGV[4]), tonumber(ARGV[5])
local cap, ttl, decrease, floor_ = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local now
if ARGV[11] ~= '' then now = tonumber(ARGV[11]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- names in byte order, as Python sorts them (Lua's "<" collates by the server's locale)
local function before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local raw = redis.call('HGETALL', KEYS[1])
local limit, epoch = cap, 0
local names, held, wants, used, dead = {}, {}, {}, {}, {}
for i = 1, #raw, 2 do
  local f, v = raw[i], raw[i + 1]
  if f == 'limit' then limit = tonumber(v) or cap
  elseif f == 'epoch' then epoch = tonumber(v) or 0
  elseif string.sub(f, 1, 2) == 'h:' and string.sub(f, 3) ~= me then
    local h, w, u, e = string.match(v, '^(%-?%d+),(%-?%d+),(%-?%d+),(%-?%d+)$')
    if h and tonumber(e) > now then
      local name = string.sub(f, 3)
      names[#names + 1] = name
      held[name], wants[name], used[name] = tonumber(h), tonumber(w), tonumber(u)
    elseif h then
      dead[#dead + 1] = f
    end
  end
end
-- adapt: AIMD, clamped to the cap
local in_flight, others_held = in_use, 0
for _, n in ipairs(names) do in_flight = in_flight + used[n]; others_held = others_held + held[n] end
if limit > cap then limit = cap end
if overload >= 0 and overload == epoch and in_flight <= limit then
  local base = math.max(in_flight, 1)
  if limit < base then base = limit end
  limit = math.max(floor_, base * decrease)
  epoch = epoch + 1
elseif not (overload >= 0 and overload == epoch) then
  if successes > 0 then limit = math.min(cap, limit + successes / math.max(limit, 1)) end
  limit = math.max(limit, floor_)
end
-- fair shares: water filling by (want, name), then what nobody wants spread by name
local capacity = math.floor(limit)
names[#names + 1] = me
wants[me] = want
local by_want = {}
for i, n in ipairs(names) do by_want[i] = n end
table.sort(by_want, function(a, b)
  if wants[a] ~= wants[b] then return wants[a] < wants[b] end
  return before(a, b)
end)
local share, left, total_want = {}, capacity, 0
for i, n in ipairs(by_want) do
  local give = math.min(math.max(wants[n], 0), math.floor(left / (#by_want - i + 1)))
  share[n] = give
  left = left - give
  total_want = total_want + wants[n]
end
if left > 0 then
  table.sort(names, before)
  local each, extra = math.floor(left / #names), left % #names
  for i, n in ipairs(names) do
    share[n] = share[n] + each
    if i <= extra then share[n] = share[n] + 1 end
  end
end
local permits = math.max(0, math.min(share[me], capacity - others_held))
local limit_s = string.format('%.17g', limit)
if #dead > 0 then redis.call('HDEL', KEYS[1], unpack(dead)) end
redis.call('HSET', KEYS[1], 'limit', limit_s, 'epoch', epoch,
  'h:' .. me, string.format('%d,%d,%d,%d', math.max(permits, in_use), want, in_use, now + ttl))
redis.call('PEXPIRE', KEYS[1], ARGV[10])
return {permits, share[me], limit_s, epoch, in_flight, total_want}
"""


class GateStore(Protocol):
    def sync(self, holder: str, report: Report, config: GateConfig) -> Grant: ...

    def leave(self, holder: str) -> None: ...


def server_id(base_url: str) -> str:
    """A short stable digest of a model server's base URL (scheme, host, port and path;
    credentials, query and a trailing slash do not make another server)."""
    parts = urllib.parse.urlsplit(base_url.strip())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = (parts.hostname or "").lower()
    canonical = f"{parts.scheme.lower()}://{host}:{port}{parts.path.rstrip('/')}"
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def server_label(base_url: str) -> str:
    """The metrics label of a model server: ``host:port``."""
    parts = urllib.parse.urlsplit(base_url.strip())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname or '?'}:{port}"


class RedisGateStore:
    def __init__(self, r: redis.Redis, keys: Keys, server: str) -> None:
        self.r = r
        self.key = keys.gate(server)
        self._sync = r.register_script(SYNC)

    def sync(
        self, holder: str, report: Report, config: GateConfig, now_ms: int | None = None
    ) -> Grant:
        """``now_ms`` replaces Redis's clock (for tests that replay a history)."""
        overload = -1 if report.overload_epoch is None else report.overload_epoch
        args: list[str | int | float] = [
            holder,
            report.want,
            report.in_use,
            report.successes,
            overload,
            config.cap,
            config.ttl_ms,
            repr(config.decrease),
            config.min_limit,
            int(GATE_STATE_TTL_S * 1000),
            "" if now_ms is None else now_ms,
        ]
        permits, share, limit, epoch, in_flight, wanted = self._sync(keys=[self.key], args=args)
        return Grant(
            permits=int(permits),
            share=int(share),
            limit=float(limit),
            epoch=int(epoch),
            in_flight=int(in_flight),
            wanted=int(wanted),
        )

    def leave(self, holder: str) -> None:
        """Give every permit back at once (a worker shutting down)."""
        self.r.hdel(self.key, HOLDER_PREFIX + holder)

    def state(self, cap: int) -> FleetState:
        """The stored state as it is (for operators, benchmarks and tests)."""
        return decode(self.r.hgetall(self.key), cap)


def decode(raw: Mapping[bytes | str, bytes | str], cap: int) -> FleetState:
    """The state in a gate hash; an absent or unreadable limit reads as ``cap``."""
    fields = {text_of(k): text_of(v) for k, v in raw.items()}
    holders: dict[str, Holder] = {}
    for name, value in fields.items():
        if not name.startswith(HOLDER_PREFIX):
            continue
        try:
            held, want, in_use, expires = (int(x) for x in value.split(","))
        except ValueError:
            continue  # unreadable (not written by us): ignored
        holders[name[len(HOLDER_PREFIX) :]] = Holder(held, want, in_use, expires)
    try:
        limit = float(fields["limit"])
    except (KeyError, ValueError):
        limit = float(cap)
    try:
        epoch = int(fields.get("epoch", "0"))
    except ValueError:
        epoch = 0
    return FleetState(limit, epoch, holders)
