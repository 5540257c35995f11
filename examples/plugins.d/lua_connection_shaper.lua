-- lua_connection_shaper: qpsmtpd's connection_shaper as a script, the
-- twin of the Go rule (rules/connection_shaper): at most `threshold`
-- sessions per client in a window of `exptime` seconds that starts with
-- the client's first session; an IPv6 client counts by its /64.
--   plugins: lua_connection_shaper threshold 10 exptime 60 whitelist 192.0.2.0/24
local threshold, exptime, allow = 10, 60, {}

local function number(args, key, default)
  if args[key] == nil then return default end
  local n = tonumber(args[key])
  if not n or n < 1 then error(key .. ": " .. args[key] .. " is not a number of 1 or more") end
  return n
end

-- Go prints durations as 1m0s, 1h0m0s: the texts of the twins agree.
local function duration(sec)
  local h, m, s = math.floor(sec / 3600), math.floor(sec % 3600 / 60), sec % 60
  if h > 0 then return string.format("%dh%dm%ds", h, m, s) end
  if m > 0 then return string.format("%dm%ds", m, s) end
  return string.format("%ds", s)
end

local text

function register(args)
  threshold = number(args, "threshold", 10)
  exptime = number(args, "exptime", 60)
  for n in string.gmatch(args.whitelist or "", "[^,%s]+") do allow[#allow + 1] = n end
  text = string.format("Too many connections from your address (more than %d in %s), please try again later",
    threshold, duration(exptime))
end

function hook_connect(s)
  if s.notes.whitelisted then return DECLINED end
  for _, n in ipairs(allow) do
    if net.contains(n, s.remote_ip) then return DECLINED end
  end
  local client = s.remote_ip
  if client:find(":", 1, true) then client = net.prefix(client, 64) end
  if store.incr(client .. ":sessions", exptime) > threshold then
    return DENYSOFT, text
  end
end
