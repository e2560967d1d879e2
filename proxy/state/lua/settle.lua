-- The end of an attempt: token buckets corrected to the real usage, then the breaker's
-- trip, hold and verdict. Mirrors MemoryState.settle and CircuitBreaker.
--
-- KEYS: breaker, its recent outcomes (a list, newest first, "time:1|0"), token buckets.
-- ARGV: now ('' = the server's clock), used tokens ('' = unknown), verdict ('ok', 'fail',
--       ''), open_for, trip_for, hold_for ('' = none), probe, epoch, consecutive, ratio,
--       min_calls, window_s, max_open_s, cost_s, cost_factor, number of buckets, then per
--       bucket: capacity, reserved; then the schedule's length and its intervals
--       (BreakerPolicy.schedule(): the interval after k failed probes, before the cost floor).
-- Returns the breaker's state after the settle ('' when the breaker was not touched).

local now = clock(ARGV[1])
local verdict = ARGV[3]
local open_for, trip_for, hold_for = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local probe, epoch = ARGV[7] == '1', tonumber(ARGV[8])
local consecutive, ratio, min_calls = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local window, max_open = tonumber(ARGV[12]), tonumber(ARGV[13])
local cost_s, cost_factor = tonumber(ARGV[14]), tonumber(ARGV[15])
local nb = tonumber(ARGV[16])
local ai = 17

local used = tonumber(ARGV[2])
for j = 1, nb do
  local capacity, reserved = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1])
  ai = ai + 2
  if used ~= nil then
    local key = KEYS[2 + j]
    local level = bucket_level(key, capacity, now)
    if used < reserved then
      level = math.min(capacity, level + reserved - used)
    elseif used > reserved then
      level = bucket_take(level, used - reserved)
    end
    bucket_store(key, capacity, level, now)
  end
end
local schedule = {}
for k = 1, tonumber(ARGV[ai]) do schedule[k] = tonumber(ARGV[ai + k]) end

if verdict == '' and trip_for == nil and hold_for == nil and not probe then return '' end
local b = breaker_load(KEYS[1])
local dirty = false

-- Probes still out keep their slots: only their own settle (or the lease) frees one.
local function trip(duration)
  if b.state ~= 'open' then b.opened_at = now end
  b.state = 'open'
  b.open_until = math.max(b.open_until, now + math.min(duration, max_open))
  dirty = true
end

local function interval(failed_probes)
  return math.max(schedule[math.min(failed_probes, #schedule - 1) + 1], cost_factor * cost_s)
end

local function remember_outcome(ok)
  redis.call('LPUSH', KEYS[2], string.format('%.6f:%d', now, ok))
  redis.call('LTRIM', KEYS[2], 0, 255)
  redis.call('PEXPIRE', KEYS[2], math.ceil(window * 1000) + 1000)
end

local function ratio_exceeded()
  local horizon = now - window
  local calls, failures = 0, 0
  for idx, item in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
    local sep = string.find(item, ':', 1, true)
    if tonumber(string.sub(item, 1, sep - 1)) < horizon then
      redis.call('LTRIM', KEYS[2], 0, idx - 2)           -- older than the window: gone
      break
    end
    calls = calls + 1
    if string.sub(item, sep + 1) == '0' then failures = failures + 1 end
  end
  return calls >= min_calls and failures / calls >= ratio
end

-- A probe of this epoch frees its slot, whatever its verdict (a close starts a new epoch).
local own_probe = probe and b.epoch == epoch
if own_probe and b.probing > 0 then
  b.probing = b.probing - 1
  dirty = true
end
if trip_for ~= nil then trip(trip_for) end
if hold_for ~= nil then
  b.held_until = math.max(b.held_until, now + math.min(hold_for, max_open))
  dirty = true
end
if verdict == 'ok' then
  remember_outcome(1)
  if b.state ~= 'closed' then
    b.state, b.failed_probes, b.probing, b.epoch = 'closed', 0, 0, b.epoch + 1
    dirty = true
  end
  if b.streak ~= 0 then
    b.streak = 0
    dirty = true
  end
elseif verdict == 'fail' then
  remember_outcome(0)
  b.streak = b.streak + 1
  dirty = true
  if b.state == 'half_open' and own_probe then
    b.failed_probes = b.failed_probes + 1
    trip(open_for or interval(b.failed_probes))
  elseif b.streak >= consecutive or ratio_exceeded() then
    trip(open_for or interval(b.failed_probes))
  end
end
if dirty then breaker_store(KEYS[1], b, now) end
return b.state
