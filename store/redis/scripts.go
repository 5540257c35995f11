package redis

import goredis "github.com/redis/go-redis/v9"

// The Lua scripts, one per store operation that needs more than one Redis
// command, so every operation is one round trip and atomic. KEYS holds only
// real keys (Cluster routes by them, and they share one hash tag); every
// other input is in ARGV, as decimal text.
//
// Lua numbers are doubles: a value that may exceed 2^53 (a counter) never
// passes through one. Times in milliseconds (about 1.8e12) and counts do.
// Errors raised by redis.call keep their prefix (WRONGTYPE, ERR ...), and
// an error stops the script before it has written anything, because every
// script checks before its first write.

// incrScript is Incr with a ttl: create with the ttl, then add, keeping
// the expiry of a key that already exists (or its lack of one).
// ARGV: delta, ttl in ms (> 0). Returns the new value as text, read back
// with GET, because INCRBY's reply would pass through a Lua double.
const incrLua = `
local existed = redis.call('EXISTS', KEYS[1])
redis.call('INCRBY', KEYS[1], ARGV[1])
if existed == 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('GET', KEYS[1])
`

var incrScript = goredis.NewScript(incrLua)

// hincrScript adds to hash fields of one or more keys and gives each key
// the ttl. ARGV: ttl in ms (0: none), then (key index, field, delta)
// triples. The type of every key is checked first, so a refused call
// changes nothing.
const hincrLua = `
for _, k in ipairs(KEYS) do
  local t = redis.call('TYPE', k).ok
  if t ~= 'hash' and t ~= 'none' then
    return redis.error_reply('WRONGTYPE Operation against a key holding the wrong kind of value')
  end
end
for i = 2, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
end
for _, k in ipairs(KEYS) do
  if ARGV[1] == '0' then
    redis.call('PERSIST', k)
  else
    redis.call('PEXPIRE', k, ARGV[1])
  end
end
return 0
`

var hincrScript = goredis.NewScript(hincrLua)

// hgetScript reads several hashes at one instant: one flat HGETALL array
// per key, empty for a missing key.
const hgetLua = `
local out = {}
for i, k in ipairs(KEYS) do
  out[i] = redis.call('HGETALL', k)
end
return out
`

var hgetScript = goredis.NewScript(hgetLua)

// tallyScript counts an event in a hash {count, last}, starting over at 1
// after quiet ms without one. ARGV: now ms, quiet ms, ttl ms (0: none).
const tallyLua = `
local now = tonumber(ARGV[1])
local last = redis.call('HGET', KEYS[1], 'last')
local count = 1
if last and now - tonumber(last) <= tonumber(ARGV[2]) then
  count = redis.call('HINCRBY', KEYS[1], 'count', 1)
else
  redis.call('HSET', KEYS[1], 'count', 1)
end
redis.call('HSET', KEYS[1], 'last', ARGV[1])
if ARGV[3] == '0' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return count
`

var tallyScript = goredis.NewScript(tallyLua)

// acquireScript takes or renews a lease in a sorted set member -> expiry
// ms. ARGV: member, limit, now ms, lease expiry ms, key ttl ms (0: none).
// Returns {granted 0|1, leases held}.
const acquireLua = `
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local held = redis.call('ZCARD', KEYS[1])
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
local others = held
if mine then others = held - 1 end
local granted = 0
if others < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
  granted = 1
  if not mine then held = held + 1 end
end
if held > 0 then
  if ARGV[5] == '0' then
    redis.call('PERSIST', KEYS[1])
  else
    redis.call('PEXPIRE', KEYS[1], ARGV[5])
  end
end
return {granted, held}
`

var acquireScript = goredis.NewScript(acquireLua)

// inspectScript describes one key: {type} for a missing one, else {type,
// pttl, value}, the value being the string, the flat HGETALL array, or the
// flat ZRANGE WITHSCORES array.
const inspectLua = `
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return {t} end
local pttl = redis.call('PTTL', KEYS[1])
local v = ''
if t == 'string' then
  v = redis.call('GET', KEYS[1])
elseif t == 'hash' then
  v = redis.call('HGETALL', KEYS[1])
elseif t == 'zset' then
  v = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
end
return {t, pttl, v}
`

var inspectScript = goredis.NewScript(inspectLua)

// scriptSources are loaded (SCRIPT LOAD) at start and after every outage,
// on every master, so EVALSHA hits; Script.Run falls back to EVAL on
// NOSCRIPT should a server lose them in between.
var scriptSources = []string{incrLua, hincrLua, hgetLua, tallyLua, acquireLua, inspectLua, limitLua}

// limitScript is Limit: GCRA over the fields of one hash, with
// store.RateStep's arithmetic (the same float64 operations, so both
// backends agree to the microsecond). ARGV: now in unix microseconds,
// then (field, interval in microseconds as text, cost, limit) per rate.
// Returns {ok, used...}. Nothing is written unless every rate with a
// cost conforms. TATs are about 1.8e15 microseconds: exact in a double.
const limitLua = `
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'hash' and t ~= 'none' then
  return redis.error_reply('WRONGTYPE Operation against a key holding the wrong kind of value')
end
local now = tonumber(ARGV[1])
local ok = 1
local out = {0}
local nexts = {}
for i = 2, #ARGV, 4 do
  local interval = tonumber(ARGV[i + 1])
  local cost = tonumber(ARGV[i + 2])
  local limit = tonumber(ARGV[i + 3])
  local start = now
  local tat = redis.call('HGET', KEYS[1], ARGV[i])
  if tat then
    tat = tonumber(tat)
    if tat > start then start = tat end
  end
  if cost > limit then
    -- more than the whole budget: never conforms (store.RateStep)
    out[#out + 1] = ARGV[i + 2]
    nexts[#nexts + 1] = 0
    ok = 0
  else
    local e = start + cost * interval
    local count = math.ceil((e - now - 0.5) / interval)
    if count < 0 then count = 0 end
    out[#out + 1] = count
    nexts[#nexts + 1] = math.floor(e + 0.5)
    if cost > 0 and count > limit then ok = 0 end
  end
end
out[1] = ok
if ok == 0 then return out end
local j = 0
for i = 2, #ARGV, 4 do
  j = j + 1
  if tonumber(ARGV[i + 2]) > 0 then
    redis.call('HSET', KEYS[1], ARGV[i], string.format('%d', nexts[j]))
  end
end
local last = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 2, #all, 2 do
  local v = tonumber(all[i])
  if v and v > last then last = v end
end
if last <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], math.ceil((last - now) / 1000))
end
return out
`

var limitScript = goredis.NewScript(limitLua)
