-- keymeter-limitd: one lease call for one subject, atomically (after common.lua).
--
-- Every key of the subject carries the same hash tag (km:{<subject>}:...), so this runs
-- on one Redis Cluster slot; every key is passed in KEYS (no KEYS/SCAN, no computed key
-- names), so it runs unchanged on Redis, Redis Cluster and Valkey.
--
-- KEYS[1]                  km:{S}:n          per-node sequence, cumulative spend, last seen
-- KEYS[1 + i], i = 1..nb   km:{S}:b:<name>   token bucket: tk (units of 1/interval_ms
--                                            token), ts (ms), iv (interval_ms)
-- KEYS[1 + nb + j]         km:{S}:q:<name>:<period start>
--                                            quota period: c (consumed), o:<node> (held),
--                                            e:<node> (expiry ms), r:<node> (bound on
--                                            its unreported spend), p:<node> (presumed
--                                            spent when its lease was reclaimed)
-- KEYS[2 + nb + nq]        km:{S}:t          takes by id (take.lua), only with doubts
-- ARGV: node, seq, ttl_ms, share, nb, nq, want, hold, returned, spent_total, forget_ms,
--       unreported_max (-1: none), then rate, interval_ms, burst per bucket, then limit,
--       period_end_ms per quota, then nd, keep_ms and id, cost per take in doubt.
--
-- Takes in doubt: takes of this node whose answer it never got; it decided those
-- requests itself (refused, or admitted as overdraft and reported in spent_total). A
-- take that was applied (`a|<node>|<id>`) has its cost taken off the count again and
-- becomes `d|` (done); one that was not becomes `x|` (void), so arriving late it changes
-- nothing. Either way once: a doubt named again (the answer to this call lost) finds
-- `d|` or `x|` and changes nothing.
--
-- Returns {applied, now_ms, granted, valid_ms, hold_void, then per bucket: tokens,
-- wait_ms, then per quota: consumed, outstanding, available}; applied = 0 (nothing
-- changed) when seq is not newer than the last one applied for this node (a replayed or
-- reordered call). hold_void = 1: the node's lease had expired here (or was reclaimed)
-- before this call arrived, so the units it says it holds are not its own any more: it
-- must drop them (only the grant is its lease).

local node = ARGV[1]
local seq = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local share = tonumber(ARGV[4])
local nb = tonumber(ARGV[5])
local nq = tonumber(ARGV[6])
local want = tonumber(ARGV[7])
local hold = tonumber(ARGV[8])
local returned = tonumber(ARGV[9])
local spent_total = tonumber(ARGV[10])
local forget = tonumber(ARGV[11])
local rmax = tonumber(ARGV[12])

local now = now_ms()
local doubt_at = 12 + tonumber(ARGV[5]) * 3 + tonumber(ARGV[6]) * 2
local nd = tonumber(ARGV[doubt_at + 1] or '0') or 0

-- Per-node sequence: only a call newer than the last applied one changes anything.
local nk = KEYS[1]
local last = redis.call('HGET', nk, 's:' .. node)
if last and seq <= tonumber(last) then
  return {0, now}
end
local prev_spent = tonumber(redis.call('HGET', nk, 'u:' .. node) or '0') or 0
local delta = spent_total - prev_spent
if delta < 0 then delta = 0 end
redis.call('HSET', nk, 's:' .. node, int(seq), 't:' .. node, int(now))
if delta > 0 then redis.call('HSET', nk, 'u:' .. node, int(spent_total)) end
-- Forget nodes not heard from for forget_ms (restarted Envoys get new node ids).
local nf = redis.call('HGETALL', nk)
for i = 1, #nf, 2 do
  local f = nf[i]
  if string.sub(f, 1, 2) == 't:' and now - tonumber(nf[i + 1]) > forget then
    local m = string.sub(f, 3)
    redis.call('HDEL', nk, 's:' .. m, 'u:' .. m, 't:' .. m)
  end
end
redis.call('PEXPIRE', nk, int(forget))

-- Takes in doubt: what applied takes counted that this node's own decisions replace.
local undo = 0
if nd > 0 then
  local tkey = KEYS[2 + nb + nq]
  local keep = tonumber(ARGV[doubt_at + 2])
  redis.call('ZREMRANGEBYSCORE', tkey, '-inf', int(now))
  for d = 1, nd do
    local m = node .. '|' .. ARGV[doubt_at + 1 + 2 * d]
    local cost = tonumber(ARGV[doubt_at + 2 + 2 * d])
    if redis.call('ZSCORE', tkey, 'a|' .. m) then
      redis.call('ZREM', tkey, 'a|' .. m)
      redis.call('ZADD', tkey, int(now + keep), 'd|' .. m)
      undo = undo + cost
    elseif not redis.call('ZSCORE', tkey, 'd|' .. m) then
      redis.call('ZADD', tkey, int(now + keep), 'x|' .. m)
    end
  end
  redis.call('PEXPIRE', tkey, int(keep))
end

local grant = want
local valid = ttl

-- Token buckets: refill to now, take back returned units, cap the grant at the tokens.
local bk = {}
for i = 1, nb do
  local a = 12 + (i - 1) * 3
  local rate, iv, burst = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local tk, ts, cap = bucket_now(KEYS[1 + i], rate, iv, burst, now)
  tk = tk + returned * iv
  if tk > cap then tk = cap end
  -- A bucket refills continuously: the grant is capped by the tokens there are and by
  -- a node's share of the burst (burst / share, at least 1), so one node cannot lease
  -- a whole small burst while the others get nothing. It does not shrink with the
  -- tokens left: that would starve a fast limit whose bucket is nearly empty under load.
  local c = math.floor(tk / iv)
  local fair = math.floor(burst / share)
  if fair < 1 then fair = 1 end
  if c > fair then c = fair end
  if c < grant then grant = c end
  bk[i] = {tk, ts, iv, rate, cap}
end

-- Quotas: reclaim expired leases of other nodes, count the reported spend (replacing
-- what was presumed spent if this node's own lease was reclaimed), cap the grant at the
-- chunk of what is neither consumed nor held.
local qk = {}
local void = false
for j = 1, nq do
  local key = KEYS[1 + nb + j]
  local a = 12 + nb * 3 + (j - 1) * 2
  local limit, pend = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local consumed, others, own_expired, presumed = quota_load(key, node, now)
  consumed = consumed + delta - presumed - undo
  if consumed < 0 then consumed = 0 end
  if own_expired or presumed > 0 then void = true end
  qk[j] = {key, limit, pend, consumed, others, presumed}
end
local hold_void = 0
if void and hold > 0 then
  hold = 0
  hold_void = 1
end
for j = 1, nq do
  local q = qk[j]
  local avail = q[2] - q[4] - q[5] - hold
  local c = chunk_cap(avail, share)
  if c < grant then grant = c end
  if q[3] - now < valid then valid = q[3] - now end
end

if valid <= 0 then
  valid = 0
  grant = 0
end
if grant < 0 then grant = 0 end

local res = {1, now, grant, valid, hold_void}
for i = 1, nb do
  local b = bk[i]
  local tk = b[1] - grant * b[3]
  bucket_store(KEYS[1 + i], tk, b[2], b[3], b[4], b[5], ttl)
  local tokens = math.floor(tk / b[3])
  local wait = 0
  if tokens < 1 then wait = math.ceil((b[3] - tk) / b[4]) end
  res[#res + 1] = tokens
  res[#res + 1] = wait
end
for j = 1, nq do
  local q = qk[j]
  local own = hold + grant
  if valid <= 0 then own = 0 end
  if own > 0 then
    redis.call('HSET', q[1], 'c', int(q[4]), 'o:' .. node, int(own), 'e:' .. node, int(now + valid))
    if rmax >= 0 then
      redis.call('HSET', q[1], 'r:' .. node, int(rmax))
    else
      redis.call('HDEL', q[1], 'r:' .. node)
    end
  else
    redis.call('HSET', q[1], 'c', int(q[4]))
    redis.call('HDEL', q[1], 'o:' .. node, 'e:' .. node, 'r:' .. node)
  end
  if q[6] > 0 then redis.call('HDEL', q[1], 'p:' .. node) end
  -- Kept a day past the period so usage can still be read after the reset.
  redis.call('PEXPIREAT', q[1], int(q[3] + 86400000))
  local out = q[5] + own
  local avail = q[2] - q[4] - out
  if avail < 0 then avail = 0 end
  res[#res + 1] = q[4]
  res[#res + 1] = out
  res[#res + 1] = avail
end
return res
