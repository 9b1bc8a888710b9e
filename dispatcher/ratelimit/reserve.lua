--[[ reserve.lua: reserve up to N send instants for one provider account, atomically.

The algorithm and why it holds: dispatcher/ratelimit/strategy.py (module docstring).
storage.py:plan_slots is the same decision in Python; a test checks they agree exactly.
All times are integer microseconds on the Redis server's clock.

KEYS[1]  bucket  hash  {tat = GCRA theoretical arrival time (µs), seq = member counter}
KEYS[2]  log     zset  reserved send instants; score = instant (µs), member = "<instant>:<seq>"
KEYS[3]  pause   string  pause-until, ms since epoch (written by pause.lua); read only here

ARGV[1]  n          slots wanted (0 = only look: nothing is recorded)
ARGV[2]  horizon    grant only instants <= now + horizon (the caller's max_wait)
ARGV[3]  emission   GCRA spacing between instants once the burst is spent
ARGV[4]  tolerance  GCRA burst allowance, (burst - 1) * emission
ARGV[5]  window     the limit's period plus the safety margin
ARGV[6]  cap        at most this many instants in any window of that length (0 = no limit)

Returns {now, granted, next_free - now, pause_ms or 0, offset_1, ..., offset_granted}
where offset_i = instant_i - now (non-decreasing) and next_free is the instant one more slot
would get (never earlier than the pause end while a pause holds; a pause grants nothing).
]]

local bucket, log, pause = KEYS[1], KEYS[2], KEYS[3]
local n = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
local emission = tonumber(ARGV[3])
local tolerance = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local cap = tonumber(ARGV[6])

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
  if paused then return {now, 0, start - now, shown_pause} end
  local reply = {now, n, 0, 0}
  for i = 1, n do reply[4 + i] = 0 end
  return reply
end

-- Instants at or before now - window can no longer constrain a slot at or after now.
redis.call('ZREMRANGEBYSCORE', log, '-inf', int(now - window))
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

if not paused then
  while #new < n do
    local at = next_slot()
    if at > now + horizon then break end
    new[#new + 1] = at
    tat = math.max(tat, at) + emission
    last = at
  end
end
local next_free = next_slot()

local reply = {now, #new, next_free - now, shown_pause}
if #new > 0 then
  local seq = redis.call('HINCRBY', bucket, 'seq', #new) - #new
  local args = {}
  for i, at in ipairs(new) do
    args[#args + 1] = int(at)
    args[#args + 1] = int(at) .. ':' .. int(seq + i)
    reply[4 + i] = at - now
    if #args >= 1000 or i == #new then  -- unpack() has a stack limit: add in chunks
      redis.call('ZADD', log, unpack(args))
      args = {}
    end
  end
  redis.call('HSET', bucket, 'tat', int(tat))
  local ttl_ms = math.floor((math.max(tat, last + window) - now) / 1000) + 1000
  redis.call('PEXPIRE', bucket, ttl_ms)
  redis.call('PEXPIRE', log, ttl_ms)
end
return reply
