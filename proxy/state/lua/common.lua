-- Shared by every script (prepended to each): the clock, token buckets and breakers,
-- computed exactly as proxy/state/bucket.py and proxy/breaker.py compute them;
-- tests/test_state_contract.py holds both backends to the same expectations.

local function clock(override)
  if override ~= '' and override ~= nil then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- A bucket is one string, "level updated capacity" (a GET and a SET with its expiry: half
-- the calls of a hash); a missing one (expired) or one whose limit changed is full.
local function bucket_level(key, capacity, now)
  local v = redis.call('GET', key)
  if not v then return capacity end
  local level, updated, stored = string.match(v, '^(%S+) (%S+) (%S+)$')
  level, updated = tonumber(level), tonumber(updated)
  if level == nil or updated == nil or tonumber(stored) ~= capacity then return capacity end
  if now > updated then level = math.min(capacity, level + (now - updated) * capacity / 60) end
  return level
end

-- Kept only until it would be full again anyway.
local function bucket_store(key, capacity, level, now)
  redis.call('SET', key, string.format('%.17g %.17g %.17g', level, now, capacity),
             'PX', math.ceil((capacity - level) / (capacity / 60) * 1000) + 1000)
end

-- All of it, also beyond the capacity (admitted at a full bucket): the debt delays the next.
local function bucket_take(level, amount)
  return level - amount
end

local function bucket_wait(capacity, level, amount)
  local missing = math.min(amount, capacity) - level
  if missing <= 0 then return 0 end
  return missing / (capacity / 60)
end

local BREAKER_FIELDS = {'state', 'opened_at', 'open_until', 'held_until', 'streak', 'failed_probes', 'probing',
                        'epoch', 'probe_until'}

local function breaker_load(key)
  local v = redis.call('HMGET', key, unpack(BREAKER_FIELDS))
  return {state = v[1] or 'closed', opened_at = tonumber(v[2]) or 0, open_until = tonumber(v[3]) or 0,
          held_until = tonumber(v[4]) or 0, streak = tonumber(v[5]) or 0, failed_probes = tonumber(v[6]) or 0,
          probing = tonumber(v[7]) or 0, epoch = tonumber(v[8]) or 0, probe_until = tonumber(v[9]) or 0}
end

-- A day, or longer while an interval or a hold runs.
local function breaker_store(key, b, now)
  redis.call('HSET', key, 'state', b.state, 'opened_at', b.opened_at, 'open_until', b.open_until,
             'held_until', b.held_until, 'streak', b.streak, 'failed_probes', b.failed_probes,
             'probing', b.probing, 'epoch', b.epoch, 'probe_until', b.probe_until)
  local last = math.max(b.open_until, b.held_until, b.probe_until)
  redis.call('PEXPIRE', key, math.ceil(math.max(86400, last - now + 60) * 1000))
end
