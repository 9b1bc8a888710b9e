--[[ reserve.lua: reserve up to N send instants for one provider account, atomically.

The algorithm and why it holds: dispatcher/ratelimit/strategy.py (module docstring).
storage.py:plan_slots is the same decision in Python; a test checks they agree exactly.
All times are integer microseconds on the Redis server's clock.

KEYS[1]  bucket  hash  {tat = GCRA theoretical arrival time (µs), seq = member counter}
KEYS[2]  log     zset  reserved send instants; score = instant (µs), member = "<instant>:<seq>"
KEYS[3]  pause   string  pause-until, ms since epoch (written by pause.lua); read only here
KEYS[4]  bulk    zset    the log's members reserved by bulk calls and not yet confirmed (see below)

ARGV[1]  n          slots wanted (0 = only look: nothing is recorded)
ARGV[2]  horizon    grant only instants <= now + horizon (the caller's max_wait)
ARGV[3]  emission   GCRA spacing between instants once the burst is spent
ARGV[4]  tolerance  GCRA burst allowance, (burst - 1) * emission
ARGV[5]  window     the limit's period plus the safety margin
ARGV[6]  cap        at most this many instants in any window of that length (0 = no limit)
ARGV[7]  bulk       1: a bulk call (campaign messages), 0: a priority call (everything else)
ARGV[8]  guard      a priority call takes only bulk instants at or after now + guard

Priority. A bulk call's instants are also listed in `bulk` until their holder confirms them
(a ZREM, just before it sends). A priority call takes, for each slot it needs, the earliest
unconfirmed bulk instant at or after now + guard when that comes before the next free instant:
the instant stays in the log, counted once, and now belongs to the priority caller; the bulk
holder's confirm finds its member gone and it reserves again. So a single send waits for at
most the bulk instants already being sent, not for the whole bulk backlog reserved ahead of it.

Returns {now, granted, next_free - now, pause_ms or 0, taken, offset_1, ..., offset_granted,
ticket_1, ..., ticket_granted (bulk calls only)}
where offset_i = instant_i - now (non-decreasing), next_free is the instant one more slot would
get (never earlier than the pause end while a pause holds; a pause grants nothing), taken is how
many of the granted instants a priority call took from bulk holders, and ticket_i names a bulk
instant for its confirm.
]]

local bucket, log, pause, bulk = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local n = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
local emission = tonumber(ARGV[3])
local tolerance = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local cap = tonumber(ARGV[6])
local is_bulk = ARGV[7] == '1'
local guard = tonumber(ARGV[8])

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local pause_ms = tonumber(redis.call('GET', pause) or '0')
local paused = pause_ms * 1000 > now
local start = now
if paused then start = pause_ms * 1000 end
local shown_pause = 0
if paused then shown_pause = pause_ms end

local function int(x) return string.format('%.0f', x) end

if cap == 0 then  -- no limit configured: only a pause holds anything back
  if paused then return {now, 0, start - now, shown_pause, 0} end
  local reply = {now, n, 0, 0, 0}
  for i = 1, n do reply[5 + i] = 0 end
  return reply
end

-- Instants at or before now - window can no longer constrain a slot at or after now.
redis.call('ZREMRANGEBYSCORE', log, '-inf', int(now - window))
redis.call('ZREMRANGEBYSCORE', bulk, '-inf', int(now - window))  -- long past: never takeable, only clutter
local count = redis.call('ZCARD', log)
local tat = tonumber(redis.call('HGET', bucket, 'tat') or '0')
local last = 0
if count > 0 then last = tonumber(redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')[2]) end

-- Slot j (0-based, this call) must come `window` after the instant `cap` places before it:
-- old instants from rank `low` on, then this call's own.
local old = {}
local low = math.max(0, count - cap)
local high = math.min(count - 1, low + n)
if high >= low then
  local flat = redis.call('ZRANGE', log, low, high, 'WITHSCORES')
  for i = 2, #flat, 2 do old[#old + 1] = tonumber(flat[i]) end
end

local new = {}
local function next_slot()
  local at = math.max(start, tat - tolerance, last)
  local back = count + #new - cap
  if back >= 0 then
    local earlier
    if back < count then earlier = old[back - low + 1] else earlier = new[back - count + 1] end
    at = math.max(at, earlier + window)
  end
  return at
end

-- Bulk instants a priority call may take: unconfirmed, at or after now + guard, within its horizon.
local takeable = {}
if not paused and not is_bulk and n > 0 then
  local flat = redis.call('ZRANGEBYSCORE', bulk, int(now + guard), int(now + horizon), 'WITHSCORES', 'LIMIT', 0, n)
  for i = 1, #flat, 2 do takeable[#takeable + 1] = {flat[i], tonumber(flat[i + 1])} end
end

local granted = {}  -- instants in order; new ones are also in `new`
local taken = 0
if not paused then
  while #granted < n do
    local at = next_slot()
    local other = takeable[taken + 1]
    if other and (at > now + horizon or other[2] < at) then
      taken = taken + 1
      granted[#granted + 1] = other[2]
      redis.call('ZREM', bulk, other[1])
    else
      if at > now + horizon then break end
      new[#new + 1] = at
      granted[#granted + 1] = at
      tat = math.max(tat, at) + emission
      last = at
    end
  end
end
local next_free = next_slot()

local reply = {now, #granted, next_free - now, shown_pause, taken}
for i, at in ipairs(granted) do reply[5 + i] = at - now end
if #new > 0 then
  local seq = redis.call('HINCRBY', bucket, 'seq', #new) - #new
  local args = {}
  for i, at in ipairs(new) do
    args[#args + 1] = int(at)
    args[#args + 1] = int(at) .. ':' .. int(seq + i)
    if is_bulk then reply[5 + #granted + i] = args[#args] end
    if #args >= 1000 or i == #new then  -- unpack() has a stack limit: add in chunks
      redis.call('ZADD', log, unpack(args))
      if is_bulk then redis.call('ZADD', bulk, unpack(args)) end
      args = {}
    end
  end
  redis.call('HSET', bucket, 'tat', int(tat))
  local ttl_ms = math.floor((math.max(tat, last + window) - now) / 1000) + 1000
  redis.call('PEXPIRE', bucket, ttl_ms)
  redis.call('PEXPIRE', log, ttl_ms)
  if is_bulk then redis.call('PEXPIRE', bulk, ttl_ms) end
end
return reply
