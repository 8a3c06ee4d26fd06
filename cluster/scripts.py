"""The Lua scripts of the protocol, each one atomic step. Key names come from ``keys.py``
(scripts that reach per-job keys from a stream entry get them as templates, ``JOB_TEMPLATES``).

- ``ADD``: a coordinator appends a batch of units, fenced by its owner token, and counts them.
- ``RECORD``: a worker commits a batch: for each unit, the first result wins (a bit in the job's
  ``recorded`` bitmap); a duplicate is discarded and counted. The first digest seen for a unit
  is kept and every later result's compared with it, in whichever order they come (a differing
  one is reported: nondeterministic compute). A unit that raised
  is re-queued until it runs out of attempts, then recorded as failed; then the entry is
  acknowledged. A commit for an entry no longer pending for that worker (its lease was lost and
  the entry was reissued) is discarded and counted as stale.
- ``REISSUE``: the entries pending for a dead worker are queued again (split into single units
  when the death is charged to them as an attempt, so a unit that kills its worker is isolated).
- ``RENEW``: an agent renews its heartbeat and the leases of its workers, on Redis server time.
- ``EXPIRED``: consumers whose lease is older than the lease time.
- ``TAKEOVER``: a resuming coordinator becomes the job's owner; the previous one is fenced.
- ``COPY``: a speculative copy of a straggling entry (units not yet recorded only).
- ``PURGE``: a finished job's keys and any of its entries still queued are removed (fenced).
"""

JOBKEYS = """
local function jobkey(template, jid) return (string.gsub(template, '{jid}', jid)) end
"""

ADD = """
local owner = redis.call('HGET', KEYS[2], 'owner')
if not owner then return redis.error_reply('GONE job ' .. ARGV[2] .. ' is not in Redis') end
if owner ~= ARGV[1] then
  return redis.error_reply('FENCED job ' .. ARGV[2] .. ' is owned by another coordinator')
end
local fields = {'j', ARGV[2], 'a', ARGV[3]}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HINCRBY', KEYS[2], 'scattered', (#ARGV - 3) / 2)
return redis.call('XADD', KEYS[1], '*', unpack(fields))
"""

RECORD = """
local units, job, recorded, results, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local blobs, digests = KEYS[6], KEYS[7]
local group, msgid, wid, seconds, jid = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local attempt = tonumber(ARGV[6])
local n = (#ARGV - 6) / 5
local function drop(payload)  -- a large result sent beside the script, not recorded
  if string.sub(payload, 1, 1) == 'R' then redis.call('HDEL', blobs, string.sub(payload, 2)) end
end
local ZERO = string.rep('\0', 8)
local function compare(idx, digest)  -- two results for one unit: are they the same?
  if digest == '' then return end
  local seen = redis.call('GETRANGE', digests, idx * 8, idx * 8 + 7)
  if #seen == 8 and seen ~= ZERO then
    if seen ~= digest then
      redis.call('HINCRBY', stats, 'mismatched', 1)
      redis.call('XADD', results, '*', 'm', idx, 'w', wid)
    end
  else
    redis.call('SETRANGE', digests, idx * 8, digest)
  end
end
if redis.call('EXISTS', job) == 0 then
  redis.call('XACK', units, group, msgid)
  redis.call('XDEL', units, msgid)
  redis.call('DEL', blobs)
  return {-1, 0}
end
if #redis.call('XPENDING', units, group, msgid, msgid, 1, wid) == 0 then
  for i = 7, #ARGV, 5 do
    drop(ARGV[i + 2])
    if ARGV[i + 1] == 'ok' then compare(tonumber(ARGV[i]), ARGV[i + 4]) end
  end
  redis.call('HINCRBY', stats, 'stale', n)
  return {-2, 0}
end
local max_attempts = tonumber(redis.call('HGET', job, 'max_attempts'))
local out = {'w', wid, 't', seconds}
local done, dups = 0, 0
for i = 7, #ARGV, 5 do
  local idx, kind, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local unit, digest = ARGV[i + 3], ARGV[i + 4]
  if redis.call('GETBIT', recorded, idx) == 1 then
    drop(payload)
    if kind == 'ok' then compare(tonumber(idx), digest) end
    dups = dups + 1
  elseif kind == 'ok' then
    redis.call('SETBIT', recorded, idx, 1)
    compare(tonumber(idx), digest)
    out[#out + 1] = idx
    out[#out + 1] = payload
    done = done + 1
  elseif kind == 'err' and attempt < max_attempts then
    redis.call('XADD', units, '*', 'j', jid, 'a', attempt + 1, idx, unit)
    redis.call('HINCRBY', stats, 'retried', 1)
  else
    redis.call('SETBIT', recorded, idx, 1)
    redis.call('XADD', results, '*', 'f', idx, 'e', payload)
    redis.call('HINCRBY', stats, 'failed', 1)
  end
end
if done > 0 then
  redis.call('XADD', results, '*', unpack(out))
  redis.call('HINCRBY', stats, 'recorded', done)
end
if dups > 0 then redis.call('HINCRBY', stats, 'duplicates', dups) end
redis.call('XACK', units, group, msgid)
redis.call('XDEL', units, msgid)
redis.call('HDEL', KEYS[8], 'job', 'unit')
return {done, dups}
"""

REISSUE = JOBKEYS + """
local units, workers = KEYS[1], KEYS[2]
local group, wid, charge, reason = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local lease = tonumber(ARGV[5])
if lease > 0 then
  local seen = redis.call('ZSCORE', workers, wid)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if seen and now - tonumber(seen) <= lease then return -1 end
end
local moved = 0
local pending = redis.call('XPENDING', units, group, '-', '+', 100000, wid)
for _, p in ipairs(pending) do
  local id = p[1]
  local entry = redis.call('XRANGE', units, id, id)
  redis.call('XACK', units, group, id)
  redis.call('XDEL', units, id)
  if #entry > 0 then
    local f = entry[1][2]
    local jid, attempt = f[2], tonumber(f[4])
    local job = jobkey(ARGV[6], jid)
    if redis.call('EXISTS', job) == 1 then
      local recorded = jobkey(ARGV[7], jid)
      local results, stats = jobkey(ARGV[8], jid), jobkey(ARGV[9], jid)
      local max_attempts = tonumber(redis.call('HGET', job, 'max_attempts'))
      local whole = {'j', jid, 'a', attempt}
      for i = 5, #f, 2 do
        local idx, unit = f[i], f[i + 1]
        if redis.call('GETBIT', recorded, idx) == 0 then
          moved = moved + 1
          if not charge then
            whole[#whole + 1] = idx
            whole[#whole + 1] = unit
          elseif attempt < max_attempts then
            redis.call('XADD', units, '*', 'j', jid, 'a', attempt + 1, idx, unit)
          else
            redis.call('SETBIT', recorded, idx, 1)
            redis.call('XADD', results, '*', 'f', idx, 'e', cjson.encode({
              error = reason, attempts = attempt, worker = wid, traceback = ''}))
            redis.call('HINCRBY', stats, 'failed', 1)
          end
        end
      end
      if #whole > 4 then redis.call('XADD', units, '*', unpack(whole)) end
      redis.call('HINCRBY', stats, 'reissued', moved)
    end
  end
end
redis.call('XGROUP', 'DELCONSUMER', units, group, wid)
redis.call('ZREM', workers, wid)
redis.call('DEL', KEYS[3])
return moved
"""

RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now, ARGV[1])
local refused = {}
for i = 2, #ARGV do
  if redis.call('ZADD', KEYS[1], 'XX', 'CH', now, ARGV[i]) == 0
     and not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    refused[#refused + 1] = ARGV[i]
  end
end
return {now, redis.call('EXISTS', KEYS[3]), refused, redis.call('EXISTS', KEYS[4])}
"""

REGISTER_WORKER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return now
"""

EXPIRED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local dead = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local name
  for i = 1, #c, 2 do if c[i] == 'name' then name = c[i + 1] end end
  local seen = redis.call('ZSCORE', KEYS[2], name)
  if not seen or now - tonumber(seen) > lease then dead[#dead + 1] = name end
end
return dead
"""

PURGE = """
local units, group, jid = KEYS[1], ARGV[1], ARGV[2]
local owner = redis.call('HGET', KEYS[3], 'owner')
if owner and owner ~= ARGV[3] then
  return redis.error_reply('FENCED job ' .. jid .. ' is owned by another coordinator')
end
for _, e in ipairs(redis.call('XRANGE', units, '-', '+')) do
  if e[2][2] == jid then
    redis.call('XACK', units, group, e[1])
    redis.call('XDEL', units, e[1])
  end
end
redis.call('SREM', KEYS[2], jid)
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""



TAKEOVER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
return 1
"""

COPY = """
local owner = redis.call('HGET', KEYS[2], 'owner')
if not owner then return redis.error_reply('GONE job is not in Redis') end
if owner ~= ARGV[1] then
  return redis.error_reply('FENCED job is owned by another coordinator')
end
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #entry == 0 then return 0 end
local f = entry[1][2]
if f[2] ~= ARGV[3] then return 0 end
local fields, n = {}, 0
for i = 1, #f, 2 do
  if i > 4 and redis.call('GETBIT', KEYS[4], f[i]) == 1 then
  else
    fields[#fields + 1] = f[i]
    fields[#fields + 1] = f[i + 1]
    if i > 4 then n = n + 1 end
  end
end
if n == 0 then return 0 end
redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('HINCRBY', KEYS[3], 'speculated', n)
return n
"""
