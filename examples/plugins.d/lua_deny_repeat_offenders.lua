-- lua_deny_repeat_offenders: qpsmtpd's deny_repeat_offenders as a script,
-- the twin of the Go rule (rules/deny_repeat_offenders): a client that
-- other rules refused for good `threshold` times, each refusal less than
-- `reset` seconds after the one before, is deferred at connect until
-- `window` seconds after its last refusal. One refused message counts
-- once, however many of its recipients were refused.
--   plugins: lua_deny_repeat_offenders threshold 5 reset 28800 window 43200
local threshold, reset, window = 5, 28800, 43200
local text = "You are a repeat offender. Go away"

function register(args)
  threshold = tonumber(args.threshold or threshold) or error("threshold: a number")
  reset = tonumber(args.reset or reset) or error("reset: a number of seconds")
  window = tonumber(args.window or window) or error("window: a number of seconds")
end

local function client(s)
  local ip = s.remote_ip
  return ip:find(":", 1, true) and net.prefix(ip, 64) or ip
end

-- The record is "count:last refusal in milliseconds".
local function read(s)
  local count, last = (store.get(client(s) .. ":offender") or ""):match("^(%d+):(%d+)$")
  return tonumber(count), tonumber(last)
end

function hook_deny(s, d)
  if (d.answer ~= DENY and d.answer ~= DENY_DISCONNECT) or s.notes.whitelisted then
    return
  end
  if s.txn and s.txn.notes.lua_offence_counted then return end
  local ms = math.floor(now() * 1000 + 0.5)
  local count, last = read(s)
  if not count or ms - last > reset * 1000 then count = 0 end
  store.set(client(s) .. ":offender", (count + 1) .. ":" .. ms, math.max(window, reset))
  if s.txn then s.txn.notes.lua_offence_counted = true end
end

function hook_connect(s)
  if s.notes.whitelisted then return end
  local count, last = read(s)
  if count and count >= threshold and now() * 1000 - last < window * 1000 then
    return DENYSOFT, text
  end
end
