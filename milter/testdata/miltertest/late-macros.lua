-- The queue id arrives only with the RCPT-stage macros (Postfix sends i
-- when it has it); the rcpt decision is logged with it. The SASL login
-- from the MAIL stage is still known at RCPT although go-milter itself
-- keeps only the last stage's macros.
local function check(c, what, want)
  local r = mt.getreply(c)
  if r ~= want then error(what .. ": reply " .. tostring(r) .. ", want " .. tostring(want)) end
end
local c = mt.connect(sock, 20, 0.05)
if c == nil then error("cannot connect") end
mt.macro(c, SMFIC_CONNECT, "j", "mx.example.test", "{daemon_name}", "smtpd")
mt.conninfo(c, "client.example", "192.0.2.40")
mt.helo(c, "client.example")
mt.macro(c, SMFIC_MAIL, "{auth_authen}", "carol")
mt.mailfrom(c, "<carol@example.org>")
check(c, "mail", SMFIR_CONTINUE)
mt.macro(c, SMFIC_RCPT, "i", "QLATE42", "{rcpt_addr}", "r@example.test")
mt.rcptto(c, "<r@example.test>")
check(c, "rcpt", SMFIR_REPLYCODE)
mt.disconnect(c)
