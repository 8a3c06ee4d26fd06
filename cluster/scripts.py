"""The Lua scripts of the protocol, each one atomic step: the coordinator's here, the
workers' and agents' in ``workscripts.py`` (which share the snippets defined here). Key names
come from ``keys.py`` (scripts that reach per-job keys from a stream entry get them as
templates, ``JOB_TEMPLATES``).

Every outcome is an explicit return value (a status word first, ``OK``, ``GONE``, ``FENCED``,
``RECORDED``, ``AGAIN``, ``STALE``, ``NOBLOB``), never an error reply to be parsed. Every step
may be retried after a lost reply and recognises its own earlier success.

- ``ADD``: a coordinator appends a batch of units, fenced by its owner token, and counts them.
  A work entry's fields: ``j`` job id, ``a`` attempt, then any of ``r`` (the reason its last
  worker died, when past its last attempt), ``n`` (no result of it to the host's spool), ``s``
  (split it first), ``p`` (its units packed: one sealed blob for the batch), then unit index
  -> sealed unit (empty when packed). ``HEAD`` reads these fields in Lua, ``delivery._work`` in
  Python.
- ``EXPIRED``: workers whose lease is older than the lease time: the workers of agents whose
  renewal is that old (a range query over renewal times: its cost grows with the expired, not
  with the cluster) and workers no agent renews (orphans); with ``full``, also consumers of the
  work stream that hold no lease at all (a scan of every consumer, run rarely).
- ``TAKEOVER``: a resuming coordinator becomes the job's owner; the previous one is fenced. It
  gets a snapshot of the recorded bitmap and of the last results entry, to find the results the
  previous coordinator gathered (and took with it) and have them computed again.
- ``CONSUME``: the coordinator drops results it has gathered (fenced).
- ``RECLAIM``: a resuming coordinator clears the recorded bits of results lost with the previous
  coordinator, so that they are recorded again (fenced).
- ``COPY``: a speculative copy of a straggling entry (units not yet recorded only).
- ``BEAT``: a coordinator's heartbeat on its job (Redis server time), fenced; the answer says
  whether the job was asked to stop (``cluster cancel``).
- ``RESIGN``: the owner writes its job's signed description anew (a later expiry, or a
  resuming coordinator's own description), fenced.
- ``CANCEL``: asks a job's coordinator to stop; answers how long ago it last beat.
- ``CLAIM``: a new run takes the name its job goes by (``resume:{identity}``, or its
  ``--name``), unless another job holds it (answer ``HELD`` and that job's id); a retry of a
  claim that went through is recognised. ``RELEASE`` drops a name that points at a job gone.
- ``PURGE``: a finished job's keys and any of its entries still queued are removed (fenced);
  its logs stream is kept for a while.
- ``RETIRE``: an agent leaves (it stopped, or `up` replaced it): the workers it still renewed
  keep their lease from its last renewal on, each its own (``orphans``).
- ``SAVE_RUN``: the record of a run that ended joins the cluster's history, and the jobs whose
  last run is older than the history's time, or beyond its count, leave it.

Keys that a script creates after the coordinator last refreshed the job's expiry inherit the
expiry of the job's hash (``inherit``), so an abandoned job's keys all expire.
"""

HEAD = """
local function head(f)  -- a work entry's optional fields (r, n, s, p), and where units start
  local h, i = {}, 5
  while f[i] == 'r' or f[i] == 'n' or f[i] == 's' or f[i] == 'p' do
    h[f[i]] = f[i + 1]
    i = i + 2
  end
  return h, i
end
local function is_index(idx)
  local n = tonumber(idx)
  return n and n >= 0 and n < 4294967296 and n == math.floor(n)
end
"""

JOBKEYS = """
local function jobkey(template, jid) return (string.gsub(template, '{jid}', jid)) end
"""

INHERIT = """
local function inherit(job, ...)
  local ttl = redis.call('PTTL', job)
  if ttl <= 0 then return end
  for _, k in ipairs({...}) do
    if redis.call('PTTL', k) == -1 then redis.call('PEXPIRE', k, ttl) end
  end
end
"""

OWNED = """
local function owned(job, owner)  -- nil when the caller owns the job, else the status
  local current = redis.call('HGET', job, 'owner')
  if not current then return 'GONE' end
  if current ~= owner then return 'FENCED' end
  return nil
end
"""

ADD = OWNED + """
local refused = owned(KEYS[2], ARGV[1])
if refused then return {refused} end
local fields = {'j', ARGV[2], 'a', ARGV[3]}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HINCRBY', KEYS[2], 'scattered', ARGV[4])
return {'OK', redis.call('XADD', KEYS[1], '*', unpack(fields))}
"""

EXPIRED = """
local units, workers, leases, orphans = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease, most = tonumber(ARGV[2]), tonumber(ARGV[4])
-- leases that lapsed: ranges over renewal times, which cost what they find, not the cluster:
-- workers whose agent stopped renewing them (stopped, exited, agent replaced), and agents
local limit = '(' .. (now - lease)
local dead = redis.call('ZRANGEBYSCORE', orphans, '-inf', limit, 'LIMIT', 0, most)
for _, aid in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', limit, 'LIMIT', 0, most)) do
  local members = redis.call('ZRANGE', (string.gsub(ARGV[5], '{aid}', aid)), 0, -1)
  if #members == 0 then redis.call('ZREM', leases, aid) end  -- all reissued: it holds none
  for _, w in ipairs(members) do
    if #dead < most then dead[#dead + 1] = w end
  end
end
if ARGV[3] == '1' then  -- and consumers with no lease at all (forgotten by `down`, forged)
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', units, ARGV[1])) do
    local name
    for i = 1, #c, 2 do if c[i] == 'name' then name = c[i + 1] end end
    if #dead < most and not redis.call('ZSCORE', workers, name) then dead[#dead + 1] = name end
  end
end
return dead
"""

PURGE = """
local units, group, jid = KEYS[1], ARGV[1], ARGV[2]
local owner = redis.call('HGET', KEYS[5], 'owner')
if owner and owner ~= ARGV[3] then return {'FENCED'} end
if owner then redis.call('HINCRBY', KEYS[4], 'jobs', 1) end  -- agents: who still computes it
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('PEXPIRE', KEYS[3], ARGV[4]) end
for _, e in ipairs(redis.call('XRANGE', units, '-', '+')) do
  if e[2][2] == jid then
    redis.call('XACK', units, group, e[1])
    redis.call('XDEL', units, e[1])
  end
end
redis.call('SREM', KEYS[2], jid)
for i = 5, #KEYS do redis.call('DEL', KEYS[i]) end
return {'OK'}
"""

RETIRE = """
local agents, agent, leases, mine, orphans = unpack(KEYS)
local seen = redis.call('ZSCORE', leases, ARGV[1]) or 0
for _, w in ipairs(redis.call('ZRANGE', mine, 0, -1)) do redis.call('ZADD', orphans, seen, w) end
redis.call('DEL', mine, agent)
redis.call('ZREM', leases, ARGV[1])
redis.call('ZREM', agents, ARGV[1])
return {'OK'}
"""

SAVE_RUN = JOBKEYS + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local keep, most = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[2], keep)
redis.call('ZADD', KEYS[1], now, ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - keep))
local over = redis.call('ZCARD', KEYS[1]) - #gone - most
if over > 0 then
  for _, jid in ipairs(redis.call('ZRANGE', KEYS[1], #gone, #gone + over - 1)) do
    gone[#gone + 1] = jid
  end
end
for _, jid in ipairs(gone) do
  redis.call('DEL', jobkey(ARGV[6], jid))
  redis.call('ZREM', KEYS[1], jid)
end
return {'OK', #gone}
"""

TAKEOVER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'GONE'} end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
return {'OK', redis.call('GET', KEYS[2]) or '', last[1] and last[1][1] or '0-0'}
"""

CONSUME = OWNED + """
local refused = owned(KEYS[1], ARGV[1])
if refused then return {refused} end
if ARGV[2] ~= '' then redis.call('XTRIM', KEYS[2], 'MINID', ARGV[2]) end
for i = 3, #ARGV do redis.call('HDEL', KEYS[3], ARGV[i]) end
return {'OK'}
"""

REQUEUE = OWNED + INHERIT + """
local job, recorded, units, blobs, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local refused = owned(job, ARGV[1])
if refused then return {refused, 0} end
local jid, idx, ref = ARGV[2], ARGV[3], ARGV[4]
local held = redis.call('HGET', blobs, 'U' .. idx)
if not held then return {'OK', 0} end  -- taken, or queued again by an earlier call
local nl = string.find(held, '\\n', 1, true)
if not nl or string.sub(held, 1, nl - 1) ~= ref then return {'OK', 0} end
redis.call('SETBIT', recorded, idx, 0)
-- 'n': its result goes through Redis this time (its host may serve nobody: a firewall)
redis.call('XADD', units, '*', 'j', jid, 'a', 1, 'n', '1', idx, string.sub(held, nl + 1))
redis.call('HDEL', blobs, 'U' .. idx)
redis.call('HINCRBY', stats, 'lost_data', 1)
return {'OK', 1}
"""

RECLAIM = OWNED + """
local refused = owned(KEYS[1], ARGV[1])
if refused then return {refused} end
local current, mask = redis.call('GET', KEYS[2]) or '', ARGV[2]
local out, cleared = {}, 0
for i = 1, #current do
  local c = string.byte(current, i)
  local m = i <= #mask and string.byte(mask, i) or 0
  local kept = bit.band(c, bit.bnot(m))
  if kept ~= c then cleared = cleared + 1 end
  out[i] = string.char(kept)
end
if cleared > 0 then redis.call('SET', KEYS[2], table.concat(out), 'KEEPTTL') end
return {'OK'}
"""

COPY = OWNED + HEAD + """
local refused = owned(KEYS[2], ARGV[1])
if refused then return {refused} end
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #entry == 0 then return {'OK', 0} end
local f = entry[1][2]
if f[2] ~= ARGV[3] then return {'OK', 0} end
local h, first = head(f)
local fields, n = {'j', f[2], 'a', f[4]}, 0
if h.r or h.s then return {'OK', 0} end  -- not computed as it is: nothing straggles
if h.p then  -- 'n' is left out: a copy may well run where its results can be spooled
  fields[#fields + 1] = 'p'
  fields[#fields + 1] = h.p
end
for i = first, #f, 2 do
  if is_index(f[i]) and redis.call('GETBIT', KEYS[4], f[i]) == 0 then
    fields[#fields + 1] = f[i]
    fields[#fields + 1] = f[i + 1]
    n = n + 1
  end
end
if n == 0 then return {'OK', 0} end
redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('HINCRBY', KEYS[3], 'speculated', n)
return {'OK', n}
"""

RESIGN = OWNED + """
local refused = owned(KEYS[1], ARGV[1])
if refused then return {refused} end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return {'OK'}
"""

NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

BEAT = OWNED + NOW + """
local refused = owned(KEYS[1], ARGV[1])
if refused then return {refused} end
redis.call('HSET', KEYS[1], 'beat', now_ms())
return {'OK', redis.call('HGET', KEYS[1], 'cancel') or ''}
"""

CANCEL = NOW + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'GONE'} end
redis.call('HSET', KEYS[1], 'cancel', ARGV[1])
local beat = tonumber(redis.call('HGET', KEYS[1], 'beat') or '0')
return {'OK', now_ms() - beat}
"""

CLAIM = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return {'HELD', current} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {'OK'}
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return {'OK'}
"""
