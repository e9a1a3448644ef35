-- keymeter-limitd: take `cost` units of a subject at once (after common.lua), for a
-- request its node could not decide from its lease (first use of the subject, or a
-- subject at its cap). All or nothing, counted as consumed at once: nothing is held,
-- so there is no node state, no sequence number, and concurrent takes are safe. A lost
-- answer loses `cost` units (never admits more).
--
-- KEYS[i], i = 1..nb       km:{S}:b:<name>          (see lease.lua)
-- KEYS[nb + j], j = 1..nq  km:{S}:q:<name>:<start>
-- ARGV: nb, nq, cost, then rate, interval_ms, burst per bucket, then limit,
--       period_end_ms per quota.
-- Returns {admitted, now_ms, then per bucket: tokens, wait_ms (until `cost` tokens),
-- then per quota: consumed, available}.

local nb, nq, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local ok = true

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

local res = {0, now}
if ok then res[1] = 1 end
for i = 1, nb do
  local b = bk[i]
  local tk = b[1]
  if ok then
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
  if ok then
    consumed = consumed + cost
    redis.call('HSET', KEYS[nb + j], 'c', int(consumed))
    redis.call('PEXPIREAT', KEYS[nb + j], int(q[2] + 86400000))
  end
  local avail = q[1] - consumed - q[4]
  if avail < 0 then avail = 0 end
  res[#res + 1] = consumed
  res[#res + 1] = avail
end
return res
