-- lua_badmailfrom: qpsmtpd's badmailfrom as a script, the twin of the Go
-- rule's bare entries: the config directory's `badmailfrom` file as
-- qpsmtpd keeps it, one "user@domain [reason]" or "@domain [reason]" per
-- line. A listed sender is noted at MAIL and every recipient of its
-- transaction refused at RCPT, as qpsmtpd 0.94 does.
--   plugins: lua_badmailfrom
local exact, domains = {}, {}
local default = "sorry, your envelope sender is in my badmailfrom list"

function register(args)
  for _, line in ipairs(config.list("badmailfrom")) do
    local entry, reason = line:match("^(%S+)%s*(.*)$")
    if entry == "sender" then entry, reason = reason:match("^(%S+)%s*(.*)$") end
    entry = entry:lower()
    if reason == "" then reason = default end
    if entry:sub(1, 1) == "@" then domains[entry:sub(2)] = reason else exact[entry] = reason end
  end
end

function hook_mail(s)
  local sender = s.txn.sender:lower()
  local reason = exact[sender] or domains[sender:match("@(.*)$") or ""]
  if reason then s.txn.notes.lua_badmailfrom = reason end
end

function hook_rcpt(s)
  local reason = s.txn.notes.lua_badmailfrom
  if reason then return DENY, reason end
end
