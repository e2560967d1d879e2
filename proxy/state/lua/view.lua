-- A read-only picture of breakers and buckets. Changes nothing.
--
-- KEYS: breakers, then buckets. ARGV: now ('' = the server's clock), number of breakers,
--       then per bucket its capacity.
-- Returns {now, then per breaker: state, opened_at, open_until, held_until, then per
--       bucket: level}, numbers as strings.

local now = clock(ARGV[1])
local nb = tonumber(ARGV[2])
local out = {tostring(now)}
for i = 1, nb do
  local b = breaker_load(KEYS[i])
  out[#out + 1] = b.state
  out[#out + 1] = tostring(b.opened_at)
  out[#out + 1] = tostring(b.open_until)
  out[#out + 1] = tostring(b.held_until)
end
for i = nb + 1, #KEYS do
  out[#out + 1] = tostring(bucket_level(KEYS[i], tonumber(ARGV[3 + i - nb - 1]), now))
end
return out
