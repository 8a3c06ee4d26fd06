"""The Lua scripts that workers and agents run (``delivery.py``): the coordinator's, and
the conventions all of them follow, are in ``scripts.py``.

- ``RECORD``: a worker commits a batch: for each unit, the first result wins (a bit in the job's
  ``recorded`` bitmap); a duplicate is discarded and counted, and its digest goes to the results
  stream (a ``d`` entry), for the coordinator to compare with the recorded result's (a differing
  one is reported: nondeterministic compute). A unit that raised is re-queued until it runs out
  of attempts, then recorded as failed; then the entry is acknowledged. A commit for an entry
  no longer pending for that worker is either the same worker's retry of a commit that went
  through (its reply was lost: ``AGAIN``, nothing counted) or a late commit after the entry was
  reissued (``STALE``, discarded and counted). Large results arrive in the job's ``blobs`` hash
  in the same transaction, under a field unique to this commit attempt; the script checks they
  are there before recording anything and deletes only its own fields when it discards them.
  Small results may come packed, sealed once for the commit (``entries.pack_results``): each
  names them with the payload ``P``, and an entry that holds one (recorded, or a digest to
  compare) carries the packed results as ``p``.
- ``REISSUE``: the entries pending for a dead worker are queued again (the entry it was running
  split into single units when the death is charged to it as an attempt, so a unit that kills
  its worker is isolated; entries it never started are not charged). A packed entry cannot be
  cut here: it is queued once, marked ``s``, and the worker that takes it splits it
  (``SPLIT``). A unit past its last
  attempt is queued once more with the reason (``r``): the worker that gets it records it as
  failed without computing it, signed (a script cannot sign).
- ``TAKE``: a worker takes the next entry of the work stream, if there is one, and marks it as
  started in its worker hash (``REISSUE`` charges a death from then on): the delivery and the
  mark in one round trip (``NONE`` when the stream is empty: the worker then blocks reading it,
  and marks what it gets).
- ``SPLIT``: a worker replaces a packed entry marked ``s`` (only ever one with more than one
  unit) with one entry per unit, each unit
  sealed on its own (a retry after a lost reply finds the entry gone: ``DONE``).
- ``RENEW``: an agent renews its heartbeat and, with one write, the lease of all its workers,
  on Redis server time, and learns which of its workers lost their lease and, when a job
  ended since it last looked, which compute a unit of a job that is gone (cancelled, or
  finished while a copy ran): the agent replaces them, charging no attempt. ``RENEW_SAME``:
  the same, when its workers are those of its last renewal (nothing named, nothing looked
  at: the answer ``LIST`` asks for ``RENEW`` when one was taken from it or a job ended).
- ``LOG``: a worker appends records of what job code wrote, within the job's byte bound (the
  records over it are dropped and counted); nothing for a job that is gone.
"""

from .scripts import HEAD, INHERIT, JOBKEYS

RECORD = INHERIT + """
local units, job, recorded, results, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local blobs, worker = KEYS[6], KEYS[7]
local group, msgid, wid, seconds, jid = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local attempt, packed = tonumber(ARGV[6]), ARGV[7]  -- packed: the commit's small results
local n = (#ARGV - 7) / 5
local function is_ref(payload) return string.sub(payload, 1, 1) == 'R' end
local function is_direct(payload) return string.sub(payload, 1, 1) == 'D' end
local dropped = {}  -- this commit's results in its host's spool, not recorded: its worker deletes
local function drop(payload)  -- this commit's own large result, not recorded
  if is_ref(payload) then redis.call('HDEL', blobs, string.sub(payload, 2)) end
  if is_direct(payload) then dropped[#dropped + 1] = payload end
end
local function drop_all()
  for i = 8, #ARGV, 5 do drop(ARGV[i + 2]) end
end
local function with_packed(fields, used, at)  -- 'p' -> the packed results, which 'P' names
  if used then
    table.insert(fields, at, 'p')
    table.insert(fields, at + 1, packed)
  end
  return fields
end
local seen, seen_packed = {'d', wid}, false  -- digests of results not recorded, to compare
local function compare(idx, payload, digest)
  if payload == 'P' then  -- its digest is in the packed results
    digest, seen_packed = 'P', true
  end
  if digest ~= '' then
    seen[#seen + 1] = idx
    seen[#seen + 1] = digest
  end
end
local function report()
  if #seen > 2 then
    redis.call('XADD', results, '*', unpack(with_packed(seen, seen_packed, 3)))
  end
end
if redis.call('EXISTS', job) == 0 then
  redis.call('XACK', units, group, msgid)
  redis.call('XDEL', units, msgid)
  redis.call('DEL', blobs)
  return {'GONE', 0, 0}
end
if #redis.call('XPENDING', units, group, msgid, msgid, 1, wid) == 0 then
  drop_all()
  if redis.call('HGET', worker, 'committed') == msgid then return {'AGAIN', 0, 0} end
  for i = 8, #ARGV, 5 do
    if ARGV[i + 1] == 'ok' then compare(ARGV[i], ARGV[i + 2], ARGV[i + 4]) end
  end
  report()
  redis.call('HINCRBY', stats, 'stale', n)
  inherit(job, stats, results)
  return {'STALE', 0, 0, unpack(dropped)}
end
for i = 8, #ARGV, 5 do
  local payload = ARGV[i + 2]
  if is_ref(payload) and redis.call('HEXISTS', blobs, string.sub(payload, 2)) == 0 then
    return {'NOBLOB', 0, 0}
  end
end
local max_attempts = tonumber(redis.call('HGET', job, 'max_attempts'))
local out, out_packed = {'w', wid, 't', seconds}, false
local done, dups = 0, 0
for i = 8, #ARGV, 5 do
  local idx, kind, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local unit, digest = ARGV[i + 3], ARGV[i + 4]
  if redis.call('GETBIT', recorded, idx) == 1 then
    drop(payload)
    if kind == 'ok' then compare(idx, payload, digest) end
    dups = dups + 1
  elseif kind == 'ok' then
    redis.call('SETBIT', recorded, idx, 1)
    out[#out + 1] = idx
    out[#out + 1] = payload
    out_packed = out_packed or payload == 'P'
    done = done + 1
    if is_direct(payload) then  -- kept until fetched: lost with its host, it is queued again
      redis.call('HSET', blobs, 'U' .. idx, payload .. '\\n' .. unit)
    end
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
  redis.call('XADD', results, '*', unpack(with_packed(out, out_packed, 5)))
  redis.call('HINCRBY', stats, 'recorded', done)
end
report()
if dups > 0 then redis.call('HINCRBY', stats, 'duplicates', dups) end
redis.call('XACK', units, group, msgid)
redis.call('XDEL', units, msgid)
if redis.call('EXISTS', worker) == 1 then
  redis.call('HDEL', worker, 'job', 'unit', 'entry')
  redis.call('HSET', worker, 'committed', msgid)
end
inherit(job, recorded, results, stats, blobs)
return {'RECORDED', done, dups, unpack(dropped)}
"""

REISSUE = JOBKEYS + INHERIT + HEAD + """
local units, workers, leases, orphans = KEYS[1], KEYS[2], KEYS[4], KEYS[5]
local group, wid, charge, reason = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4]
local counted = ARGV[3] ~= 'back'  -- 'back': a worker gives back what it did not start
local lease = tonumber(ARGV[5])
local agent = redis.call('HGET', KEYS[3], 'agent')
local mine = agent and (string.gsub(ARGV[#ARGV], '{aid}', agent))  -- its agent's workers
if lease > 0 then  -- its agent's lease, or its own since its agent stopped renewing it
  local seen = redis.call('ZSCORE', orphans, wid)
  if mine and redis.call('ZSCORE', mine, wid) then seen = redis.call('ZSCORE', leases, agent) end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if seen and now - tonumber(seen) <= lease then return -1 end
end
local running = redis.call('HGET', KEYS[3], 'entry')  -- the entry it had started computing
local moved = 0
local function entry_of(jid, attempt, ...)  -- optional fields as name, value (nil: left out)
  local e, args = {'j', jid, 'a', attempt}, {...}
  for i = 1, select('#', ...), 2 do
    if args[i + 1] then
      e[#e + 1] = args[i]
      e[#e + 1] = args[i + 1]
    end
  end
  return e
end
local pending = redis.call('XPENDING', units, group, '-', '+', 100000, wid)
for _, p in ipairs(pending) do
  local id = p[1]
  local charged = charge and id == running
  local entry = redis.call('XRANGE', units, id, id)
  redis.call('XACK', units, group, id)
  redis.call('XDEL', units, id)
  local f = #entry > 0 and entry[1][2] or {}
  local jid, attempt = f[2], tonumber(f[4])
  if f[1] == 'j' and f[3] == 'a' and attempt then  -- else not what ADD writes: dropped
    local job = jobkey(ARGV[6], jid)
    if redis.call('EXISTS', job) == 1 then
      local recorded = jobkey(ARGV[7], jid)
      local results, stats = jobkey(ARGV[8], jid), jobkey(ARGV[9], jid)
      local max_attempts = tonumber(redis.call('HGET', job, 'max_attempts'))
      local h, first = head(f)
      local whole = entry_of(jid, attempt, 'r', h.r, 'n', h.n, 's', h.s, 'p', h.p)
      local last = attempt >= max_attempts
      local why = last and reason or nil  -- past its last attempt: recorded as failed, uncomputed
      -- a charged packed entry: queued once more, to be split by the worker that takes it
      local split = entry_of(jid, attempt + 1, 'r', why, 'n', h.n, 'p', h.p)
      local single = entry_of(jid, attempt + 1, 'r', why, 'n', h.n)
      local wn, sn = #whole, #split
      for i = first, #f, 2 do
        local idx, unit = f[i], f[i + 1]
        if is_index(idx) and redis.call('GETBIT', recorded, idx) == 0 then
          moved = moved + 1
          local into = not charged and whole or (h.p and split or nil)
          if into then
            into[#into + 1] = idx
            into[#into + 1] = unit
          else
            local one = {unpack(single)}
            one[#one + 1] = idx
            one[#one + 1] = unit
            redis.call('XADD', units, '*', unpack(one))
          end
        end
      end
      if #whole > wn then redis.call('XADD', units, '*', unpack(whole)) end
      if #split > sn + 2 and not last then  -- more than one unit: to be split ('s')
        table.insert(split, 5, 's')
        table.insert(split, 6, '1')
      end
      if #split > sn then redis.call('XADD', units, '*', unpack(split)) end
      if counted then redis.call('HINCRBY', stats, 'reissued', moved) end
      inherit(job, recorded, results, stats)
    end
  end
end
if counted then  -- a worker giving back is still alive: its agent cleans up after it
  redis.call('XGROUP', 'DELCONSUMER', units, group, wid)
  redis.call('ZREM', workers, wid)
  redis.call('ZREM', orphans, wid)
  if mine then redis.call('ZREM', mine, wid) end
  redis.call('DEL', KEYS[3])
end
return moved
"""

RENEWAL = """
local agents, shutdown, agent, leases, mine, orphans, ended = unpack(KEYS)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', agents, now, ARGV[1])
local count = redis.call('HGET', ended, 'jobs') or '0'
local function answer(status, refused, abandoned)  -- with the agents holding leases
  return {status, now, redis.call('EXISTS', shutdown), refused, redis.call('EXISTS', agent),
          abandoned, count, redis.call('ZCARD', leases)}
end
"""

RENEW_SAME = RENEWAL + """
if redis.call('ZCARD', mine) ~= tonumber(ARGV[2]) or count ~= ARGV[3] then  -- one was taken
  return answer('LIST', {}, {})                                             -- or a job ended
end
if ARGV[2] ~= '0' then redis.call('ZADD', leases, now, ARGV[1]) end  -- every worker's, in one
return answer('OK', {}, {})
"""

RENEW = JOBKEYS + RENEWAL + """
local before = redis.call('ZSCORE', leases, ARGV[1]) or now  -- its workers' last renewal
local members, held, running = redis.call('ZRANGE', mine, 0, -1), {}, {}
for _, w in ipairs(members) do held[w] = true end
local listed, refused, abandoned = 0, {}, {}
for i = 5, #ARGV do
  local w = ARGV[i]
  running[w] = true
  if held[w] then
    listed = listed + 1
  elseif redis.call('ZREM', orphans, w) == 1 then  -- unlisted a while (stopped), not lapsed
    redis.call('ZADD', mine, now, w)
    listed = listed + 1
  else
    refused[#refused + 1] = w  -- lapsed: its units went to others
  end
end
for _, w in ipairs(members) do  -- workers it renews no more (stopped, exited): their own
  if not running[w] then        -- lease, from their last renewal on
    redis.call('ZREM', mine, w)
    redis.call('ZADD', orphans, before, w)
  end
end
if listed > 0 then redis.call('ZADD', leases, now, ARGV[1]) end
if redis.call('EXISTS', agent) == 1 then redis.call('HSET', agent, 'leased', listed) end
if count ~= ARGV[4] then  -- a job ended since the agent last looked: who computes a unit of it
  for i = 5, #ARGV do
    local jid = redis.call('HGET', (string.gsub(ARGV[2], '{wid}', ARGV[i])), 'job')
    if jid and redis.call('EXISTS', jobkey(ARGV[3], jid)) == 0 then
      abandoned[#abandoned + 1] = ARGV[i]
    end
  end
end
return answer('OK', refused, abandoned)
"""

REGISTER_WORKER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], 'agent', ARGV[2], unpack(ARGV, 3))
redis.call('ZADD', KEYS[4], now, ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[2])
if redis.call('EXISTS', KEYS[5]) == 1 then  -- how many workers it renews, for coordinators
  redis.call('HSET', KEYS[5], 'leased', redis.call('ZCARD', KEYS[4]))
end
return now
"""

LOG = INHERIT + """
local job, stats, logs = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', job) == 0 then return {'GONE'} end
local bound, kept, dropped = tonumber(ARGV[1]), 0, 0
for i = 2, #ARGV do
  if redis.call('HINCRBY', stats, 'log_bytes', #ARGV[i]) > bound then
    redis.call('HINCRBY', stats, 'log_bytes', -#ARGV[i])
    dropped = dropped + 1
  else
    redis.call('XADD', logs, '*', 'r', ARGV[i])
    kept = kept + 1
  end
end
if dropped > 0 then redis.call('HINCRBY', stats, 'log_dropped', dropped) end
inherit(job, stats, logs)
return {'OK', kept, dropped}
"""

TAKE = HEAD + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOGROUP'} end  -- Redis lost its data
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS',
                         KEYS[1], '>')
if not reply then return {'NONE'} end
local entry = reply[1][2][1]
local fields = entry[2]
local h, first = head(fields)
if not (h.s and #fields > first + 2) then  -- an entry split (more than one unit) is not
  -- computed: a death while splitting costs nothing
  redis.call('HSET', KEYS[2], 'job', fields[2] or '', 'unit', fields[first] or '',
             'entry', entry[1])
end
return {'OK', entry[1], fields}
"""

SPLIT = """
local units, job = KEYS[1], KEYS[2]
local group, msgid, wid, jid, attempt, nospool = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
                                                 ARGV[6]
if #redis.call('XPENDING', units, group, msgid, msgid, 1, wid) == 0 then
  return {'DONE', 0}  -- split by an earlier call (its reply lost), or reissued meanwhile
end
local n = 0
if redis.call('EXISTS', job) == 1 then
  for i = 7, #ARGV, 2 do
    if nospool ~= '' then
      redis.call('XADD', units, '*', 'j', jid, 'a', attempt, 'n', nospool, ARGV[i], ARGV[i + 1])
    else
      redis.call('XADD', units, '*', 'j', jid, 'a', attempt, ARGV[i], ARGV[i + 1])
    end
    n = n + 1
  end
end
redis.call('XACK', units, group, msgid)
redis.call('XDEL', units, msgid)
return {'OK', n}
"""
