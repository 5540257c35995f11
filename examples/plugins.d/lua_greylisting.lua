-- lua_greylisting: qpsmtpd's greylisting as a script, the twin of the Go
-- rule (rules/greylisting) with its defaults: a (client /24 or /64,
-- sender, recipient) triplet is deferred until a retry after
-- black_timeout; postmaster@ and abuse@ are never deferred; a network with
-- auto_whitelist confirmed triplets passes; the null sender waits for DATA.
--   plugins: lua_greylisting black_timeout 3000 grey_timeout 12000 white_timeout 3110400
local black, grey, white, awl = 3000, 12000, 3110400, 5
local text = "This mail is temporarily denied"

function register(args)
  black = tonumber(args.black_timeout or black) or error("black_timeout: a number of seconds")
  grey = tonumber(args.grey_timeout or grey) or error("grey_timeout: a number of seconds")
  white = tonumber(args.white_timeout or white) or error("white_timeout: a number of seconds")
  awl = tonumber(args.auto_whitelist or awl) or error("auto_whitelist: a number")
  if black >= grey then error("black_timeout must be shorter than grey_timeout") end
end

local function bare(a) return (a:gsub("^<", ""):gsub(">$", ""):lower()) end

local function skip(s)
  return s.txn == nil or s.notes.whitelisted or s.auth_user ~= nil
end

local function postmaster(rcpt)
  local r = bare(rcpt)
  local lp = r:match("^(.*@)[^@]*$") or (r .. "@")
  return lp == "postmaster@" or lp == "abuse@"
end

-- passes moves the triplet along and tells whether it passes now.
local function passes(s, rcpt)
  local ip = s.remote_ip
  local netw = ip:find(":", 1, true) and net.prefix(ip, 64) or net.prefix(ip, 24)
  local key = netw .. ":" .. bare(s.txn.sender) .. "/" .. bare(rcpt)
  local ms = math.floor(now() * 1000 + 0.5)
  local state, since = (store.get(key) or ""):match("^([gw]):(%d+)$")
  local age = since and (ms - tonumber(since)) / 1000
  if not state then
    if awl > 0 and (tonumber(store.get(netw .. ":confirmed")) or 0) >= awl then
      store.set(key, "w:" .. ms, white)
      return true
    end
  elseif state == "w" and age < white then
    if age >= math.min(86400, white / 10) then store.set(key, "w:" .. ms, white) end
    return true
  elseif state == "g" and age < black then
    return false
  elseif state == "g" and age < grey then
    store.set(key, "w:" .. ms, white)
    if awl > 0 then store.incr(netw .. ":confirmed", white) end
    return true
  end
  store.set(key, "g:" .. ms, grey)
  return false
end

function hook_rcpt(s)
  if skip(s) or s.txn.sender == "" or postmaster(s.txn.rcpt) then return DECLINED end
  if not passes(s, s.txn.rcpt) then return DENYSOFT, text end
end

function hook_data(s)
  if skip(s) or s.txn.sender ~= "" then return DECLINED end
  local answer
  for _, rcpt in ipairs(s.txn.recipients) do
    if not postmaster(rcpt) and not passes(s, rcpt) then answer = DENYSOFT end
  end
  if answer then return answer, text end
end
