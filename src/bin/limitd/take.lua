-- keymeter-limitd: take `cost` units of a subject at once (after common.lua), for a
-- request its node could not decide from its lease (first use of the subject, a quota
-- near its end, or a node whose unreported spend is at its bound R). All or nothing,
-- counted as consumed at once: nothing is held, so there is no sequence number, and
-- concurrent takes are safe. A lost answer loses `cost` units (never admits more).
--
-- The call also carries the node's cumulative spend (`spent_total`, as in lease.lua;
-- only its growth counts, so it needs no sequence number): a node at R that has to take
-- gets its spend acknowledged by the same call and goes back to its lease.
--
-- KEYS[1]                      km:{S}:n                 (see lease.lua)
-- KEYS[1 + i], i = 1..nb       km:{S}:b:<name>
-- KEYS[1 + nb + j], j = 1..nq  km:{S}:q:<name>:<start>
-- ARGV: nb, nq, cost, node ('' for none), spent_total, forget_ms, then rate,
--       interval_ms, burst per bucket, then limit, period_end_ms per quota.
-- Returns {admitted, now_ms, reported (the node's spend counted so far), then per
-- bucket: tokens, wait_ms (until `cost` tokens), then per quota: consumed, available}.

local nb, nq, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local node, spent_total, forget = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
local ok = true
local delta, reported = 0, 0
if node ~= '' then
  delta, reported = report_spend(KEYS[1], node, spent_total, now)
  redis.call('PEXPIRE', KEYS[1], int(forget))
end

local bk = {}
for i = 1, nb do
  local a = 6 + (i - 1) * 3
  local rate, iv, burst = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local tk, ts, cap = bucket_now(KEYS[1 + i], rate, iv, burst, now)
  if tk < cost * iv then ok = false end
  bk[i] = {tk, ts, iv, rate, cap}
end

local qk = {}
for j = 1, nq do
  local a = 6 + nb * 3 + (j - 1) * 2
  local limit, pend = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  -- Every unexpired lease counts as held, the caller's own included (node '' matches
  -- no node). The report replaces what was presumed spent when the caller's lease was
  -- reclaimed (see lease.lua).
  local consumed, others, _, presumed, mine = quota_load(KEYS[1 + nb + j], node, now)
  local counted = consumed + delta - presumed
  if counted < 0 then counted = 0 end
  if presumed > 0 then redis.call('HDEL', KEYS[1 + nb + j], 'p:' .. node) end
  local held = others + mine
  if limit - counted - held < cost then ok = false end
  qk[j] = {limit, pend, counted, held, counted ~= consumed}
end

local res = {0, now, reported}
if ok then res[1] = 1 end
for i = 1, nb do
  local b = bk[i]
  local tk = b[1]
  if ok then
    tk = tk - cost * b[3]
    bucket_store(KEYS[1 + i], tk, b[2], b[3], b[4], b[5], 0)
  end
  local wait = 0
  if tk < cost * b[3] then wait = math.ceil((cost * b[3] - tk) / b[4]) end
  res[#res + 1] = math.floor(tk / b[3])
  res[#res + 1] = wait
end
for j = 1, nq do
  local q = qk[j]
  local consumed = q[3]
  if ok then consumed = consumed + cost end
  if ok or q[5] then
    redis.call('HSET', KEYS[1 + nb + j], 'c', int(consumed))
    redis.call('PEXPIREAT', KEYS[1 + nb + j], int(q[2] + 86400000))
  end
  local avail = q[1] - consumed - q[4]
  if avail < 0 then avail = 0 end
  res[#res + 1] = consumed
  res[#res + 1] = avail
end
return res
