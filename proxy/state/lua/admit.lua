-- One admission, atomic: the key's bucket first, then the options in the order given; the
-- first whose breaker admits it (closed, or half-open with a probe slot free), that no 429
-- holds, and whose buckets all have room is admitted, and all its buckets (and the key's)
-- are taken together. Mirrors MemoryState.admit_now.
--
-- KEYS: [key bucket], then per option: its breaker, then its buckets.
-- ARGV[1]: JSON {now ('' = the server's clock), key: [capacity, amount] or absent, force,
--       probes, lease (s), options: [[[capacity, amount] per bucket] per option]}: one
--       argument, so that the client encodes one string rather than dozens.
-- With no options, the key's bucket alone is taken.
-- Returns {1, option (1-based; 0 for the key alone), probe, epoch} or {0, reason,
--       retry_after, longest option, open_for, open_wait}.

local a = cjson.decode(ARGV[1])
local now = clock(a.now)
local force = a.force == 1
local probes = a.probes
local lease = a.lease
local options = a.options
local n = #options
local ki = 1
local has_key = type(a.key) == 'table'
local key_capacity, key_amount, key_level
if has_key then
  key_capacity, key_amount = a.key[1], a.key[2]
  key_level = bucket_level(KEYS[1], key_capacity, now)
  local w = bucket_wait(key_capacity, key_level, key_amount)
  if w > 0 then return {0, 'key_limited', tostring(w), 0, '0', '0'} end
  if n == 0 then                                          -- a request that calls no deployment
    bucket_store(KEYS[1], key_capacity, bucket_take(key_level, key_amount), now)
    return {1, 0, 0, 0}
  end
  ki = 2
end

local wait = nil
local longest, longest_opened, longest_wait = 0, 0, 0
local function note_open(i, b)
  if longest == 0 or b.opened_at < longest_opened then
    longest, longest_opened = i, b.opened_at
    longest_wait = math.max(0, math.max(b.open_until, b.held_until) - now)
  end
end
local function note_wait(w)
  if wait == nil or w < wait then wait = w end
end

for i = 1, n do
  local breaker_key = KEYS[ki]
  ki = ki + 1
  local specs = options[i]
  local nb = #specs
  local keys, capacities, amounts, levels = {}, {}, {}, {}
  for j = 1, nb do
    keys[j], capacities[j], amounts[j] = KEYS[ki], specs[j][1], specs[j][2]
    ki = ki + 1
  end
  local b = breaker_load(breaker_key)
  if (not force) and b.state ~= 'closed' and now < b.open_until then
    note_open(i, b)
  elseif now < b.held_until then
    note_wait(b.held_until - now)
  else
    local short = 0
    for j = 1, nb do
      levels[j] = bucket_level(keys[j], capacities[j], now)
      short = math.max(short, bucket_wait(capacities[j], levels[j], amounts[j]))
    end
    if short > 0 then
      note_wait(short)
    else
      local admitted, probe = true, false
      if b.state ~= 'closed' then
        b.state = 'half_open'                             -- probes still out keep their slots
        if b.probing > 0 and now >= b.probe_until then     -- their instance never settled them
          b.probing, b.epoch = 0, b.epoch + 1
        end
        if b.probing < probes then
          b.probing, probe = b.probing + 1, true
          b.probe_until = math.max(b.probe_until, now + lease)
        else
          admitted = false
        end
        breaker_store(breaker_key, b, now)
      end
      if admitted then
        for j = 1, nb do
          bucket_store(keys[j], capacities[j], bucket_take(levels[j], amounts[j]), now)
        end
        if has_key then
          bucket_store(KEYS[1], key_capacity, bucket_take(key_level, key_amount), now)
        end
        return {1, i, probe and 1 or 0, b.epoch}
      end
      note_open(i, b)
    end
  end
end
if wait ~= nil then return {0, 'rate_limited', tostring(wait), 0, '0', '0'} end
if longest > 0 then
  return {0, 'breaker_open', '0', longest, tostring(now - longest_opened), tostring(longest_wait)}
end
return {0, 'excluded', '0', 0, '0', '0'}
