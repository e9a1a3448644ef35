-- keymeter-limitd: take `cost` units of a subject at once (after common.lua), for a
-- request its node could not decide from its lease (first use of the subject, or a
-- subject at its cap). All or nothing, counted as consumed at once: nothing is held,
-- so there is no lease state, no sequence number, and concurrent takes are safe.
--
-- A tagged take (node and take id after the limits) that admits a quota cost is
-- recorded in km:{S}:t as `a|<node>|<id>` for `keep` ms: if its answer is lost, the
-- node's next lease call names it (lease.lua) and its cost is taken off the count
-- again, the node having decided the request itself. A take that call found not yet
-- applied is recorded `x|<node>|<id>` (void): arriving late it changes nothing. A
-- take already applied (`a|` or `d|`) is not applied twice.
--
-- KEYS[i], i = 1..nb       km:{S}:b:<name>          (see lease.lua)
-- KEYS[nb + j], j = 1..nq  km:{S}:q:<name>:<start>
-- KEYS[nb + nq + 1]        km:{S}:t                 takes by id (tagged takes only):
--                                                   sorted set, score = expiry ms
-- ARGV: nb, nq, cost, then rate, interval_ms, burst per bucket, then limit,
--       period_end_ms per quota, then for a tagged take: node, id, keep_ms.
-- Returns {admitted, now_ms, then per bucket: tokens, wait_ms (until `cost` tokens),
-- then per quota: consumed, available}.

local nb, nq, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local ok = true
local void, dup = false, false

local tkey, member, keep
local tag_at = 3 + nb * 3 + nq * 2
if #ARGV > tag_at then
  tkey = KEYS[nb + nq + 1]
  member = ARGV[tag_at + 1] .. '|' .. ARGV[tag_at + 2]
  keep = tonumber(ARGV[tag_at + 3])
  redis.call('ZREMRANGEBYSCORE', tkey, '-inf', int(now))
  if redis.call('ZSCORE', tkey, 'x|' .. member) then
    void = true
  elseif redis.call('ZSCORE', tkey, 'a|' .. member) or redis.call('ZSCORE', tkey, 'd|' .. member) then
    dup = true
  end
end

local bk = {}
for i = 1, nb do
  local a = 3 + (i - 1) * 3
  local rate, iv, burst = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local tk, ts, cap = bucket_now(KEYS[i], rate, iv, burst, now)
  if tk < cost * iv then ok = false end
  bk[i] = {tk, ts, iv, rate, cap}
end

local qk = {}
for j = 1, nq do
  local a = 3 + nb * 3 + (j - 1) * 2
  local limit, pend = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  -- Node '' matches no node: every held lease counts.
  local consumed, held = quota_load(KEYS[nb + j], '', now)
  if limit - consumed - held < cost then ok = false end
  qk[j] = {limit, pend, consumed, held}
end

-- Void: refused; a duplicate: admitted (its first copy was); neither changes anything.
if void then ok = false end
if dup then ok = true end
local write = ok and not void and not dup
local res = {0, now}
if ok then res[1] = 1 end
for i = 1, nb do
  local b = bk[i]
  local tk = b[1]
  if write then
    tk = tk - cost * b[3]
    bucket_store(KEYS[i], tk, b[2], b[3], b[4], b[5], 0)
  end
  local wait = 0
  if tk < cost * b[3] then wait = math.ceil((cost * b[3] - tk) / b[4]) end
  res[#res + 1] = math.floor(tk / b[3])
  res[#res + 1] = wait
end
for j = 1, nq do
  local q = qk[j]
  local consumed = q[3]
  if write then
    consumed = consumed + cost
    redis.call('HSET', KEYS[nb + j], 'c', int(consumed))
    redis.call('PEXPIREAT', KEYS[nb + j], int(q[2] + 86400000))
  end
  local avail = q[1] - consumed - q[4]
  if avail < 0 then avail = 0 end
  res[#res + 1] = consumed
  res[#res + 1] = avail
end
if write and tkey and nq > 0 then
  redis.call('ZADD', tkey, int(now + keep), 'a|' .. member)
  redis.call('PEXPIRE', tkey, int(keep))
end
return res
