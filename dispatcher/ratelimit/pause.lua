--[[ pause.lua: hold every grant of one provider account until a time, extend-only.

A later pause wins; an earlier one (or one already past on the server's clock) changes
nothing. The key expires by itself when the pause ends.

KEYS[1]  pause  string  pause-until, ms since epoch (read by reserve.lua)

ARGV[1]  until    requested pause end, ms since epoch
ARGV[2]  longest  a pause never ends later than now + this many ms (a bad header cannot stop
                  an account for ever)

Returns {pause_ms, extended}: the pause now in force (0 = none) and 1 if this call moved it.
]]

local pause = KEYS[1]
local wanted = tonumber(ARGV[1])
local longest = tonumber(ARGV[2])

local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
wanted = math.min(wanted, now_ms + longest)
local current = tonumber(redis.call('GET', pause) or '0')
if current <= now_ms then current = 0 end

if wanted > now_ms and wanted > current then
  redis.call('SET', pause, string.format('%.0f', wanted), 'PXAT', string.format('%.0f', wanted))
  return {wanted, 1}
end
return {current, 0}
