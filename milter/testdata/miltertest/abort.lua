-- A transaction aborted after RCPT (RSET), then a new one on the same
-- connection: the rules see reset_transaction for the first, and the
-- second starts fresh with its own sender.
local function check(c, what, want)
  local r = mt.getreply(c)
  if r ~= want then error(what .. ": reply " .. tostring(r) .. ", want " .. tostring(want)) end
end
local c = mt.connect(sock, 20, 0.05)
if c == nil then error("cannot connect") end
mt.conninfo(c, "client.example", "192.0.2.20")
mt.helo(c, "client.example")
mt.macro(c, SMFIC_MAIL, "i", "QABORT")
if mt.mailfrom(c, "<first@example.org>") ~= nil then error("mail 1") end
check(c, "mail 1", SMFIR_CONTINUE)
if mt.rcptto(c, "<r1@example.test>") ~= nil then error("rcpt 1") end
check(c, "rcpt 1", SMFIR_CONTINUE)
if mt.abort(c) ~= nil then error("abort") end
mt.macro(c, SMFIC_MAIL, "i", "QSECOND")
if mt.mailfrom(c, "<second@example.org>") ~= nil then error("mail 2") end
check(c, "mail 2", SMFIR_CONTINUE)
if mt.rcptto(c, "<r2@example.test>") ~= nil then error("rcpt 2") end
check(c, "rcpt 2", SMFIR_CONTINUE)
if mt.eom(c) ~= nil then error("eom") end
check(c, "eom", SMFIR_CONTINUE)
mt.disconnect(c)
