-- keymeter-limitd: helpers prepended to every script (lease.lua, take.lua).

-- Integers are stored as plain decimal text (a Lua number would be written in the
-- shortest float form, e.g. 1e+15).
local function int(x) return string.format('%d', x) end

-- Redis time in ms: one clock per subject (its slot's master), whichever limitd calls.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The chunk rule of core::limits::lease::chunk_cap.
local function chunk_cap(avail, share)
  if avail <= 0 then return 0 end
  local c = math.floor(avail / share)
  if c < 1 then c = 1 end
  if c > avail then c = avail end
  return c
end

-- A token bucket refilled to `now`, in units of 1/iv token (iv = interval_ms), so one
-- ms refills exactly `rate` units: {tk, ts, cap}. Absent = full. A changed interval
-- converts the stored units; a changed burst caps them.
local function bucket_now(key, rate, iv, burst, now)
  local cap = burst * iv
  local h = redis.call('HMGET', key, 'tk', 'ts', 'iv')
  local tk, ts, oiv = tonumber(h[1]), tonumber(h[2]), tonumber(h[3])
  if not tk or not ts then return cap, now, cap end
  if oiv and oiv ~= iv and oiv > 0 then tk = math.floor(tk * iv / oiv) end
  if tk > cap then tk = cap end
  if now > ts then
    local to_full = math.ceil((cap - tk) / rate)
    if now - ts >= to_full then tk = cap else tk = tk + (now - ts) * rate end
    ts = now
  end
  return tk, ts, cap
end

local function bucket_store(key, tk, ts, iv, rate, cap, ttl)
  redis.call('HSET', key, 'tk', int(tk), 'ts', int(ts), 'iv', int(iv))
  redis.call('PEXPIRE', key, int(math.ceil(cap / rate) + ttl + 60000))
end

-- A quota period: {consumed, units held by nodes other than `node`, whether `node`'s own
-- lease record has expired, units presumed spent by `node` when its lease was reclaimed}.
--
-- Expired leases of other nodes are reclaimed on the way. A node declares with every
-- call R (`r:<node>`): it never has more than R units spent and not yet reported, so a
-- node that died holding `held` units spent at most min(R, held) of them since its last
-- call. That much is counted as consumed at once (the fleet never admits more than the
-- quota, whatever the dead node did) and remembered as `p:<node>`; the rest comes back.
-- Should the node turn out to be alive, its next call replaces the presumption with what
-- it really spent (lease.lua). Without `r:` (a node that sends no bound) nothing is
-- presumed.
local function quota_load(key, node, now)
  local all = redis.call('HGETALL', key)
  local f = {}
  for i = 1, #all, 2 do f[all[i]] = all[i + 1] end
  local consumed = tonumber(f['c'] or '0') or 0
  local others, presumed = 0, 0
  for field, v in pairs(f) do
    if string.sub(field, 1, 2) == 'o:' then
      local m = string.sub(field, 3)
      if m ~= node then
        local e = tonumber(f['e:' .. m] or '0') or 0
        local held = tonumber(v) or 0
        if e <= now then
          local p = math.min(tonumber(f['r:' .. m] or '0') or 0, held)
          if p > 0 then
            presumed = presumed + p
            redis.call('HINCRBY', key, 'p:' .. m, p)
          end
          redis.call('HDEL', key, 'o:' .. m, 'e:' .. m, 'r:' .. m)
        else
          others = others + held
        end
      end
    end
  end
  if presumed > 0 then
    consumed = consumed + presumed
    redis.call('HSET', key, 'c', int(consumed))
  end
  local own_e = tonumber(f['e:' .. node] or '')
  return consumed, others, own_e ~= nil and own_e <= now, tonumber(f['p:' .. node] or '0') or 0
end
