-- Take amounts from buckets (what an instance admitted on its own while Redis was away).
-- KEYS: buckets. ARGV: now ('' = the server's clock), then per bucket: capacity, amount.

local now = clock(ARGV[1])
for i = 1, #KEYS do
  local capacity, amount = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  bucket_store(KEYS[i], capacity, bucket_take(bucket_level(KEYS[i], capacity, now), amount), now)
end
return #KEYS
