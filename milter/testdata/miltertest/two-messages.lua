-- Two messages in one connection: both are accepted, and the connection
-- counts once for connection_shaper threshold 1 (a second connection
-- afterwards is the one refused).
local function check(c, what, want)
  local r = mt.getreply(c)
  if r ~= want then error(what .. ": reply " .. tostring(r) .. ", want " .. tostring(want)) end
end
local c = mt.connect(sock, 20, 0.05)
if c == nil then error("cannot connect") end
mt.conninfo(c, "client.example", "192.0.2.30")
mt.helo(c, "client.example")
check(c, "helo", SMFIR_CONTINUE)
for i = 1, 2 do
  mt.macro(c, SMFIC_MAIL, "i", "QMSG" .. i)
  if mt.mailfrom(c, "<s" .. i .. "@example.org>") ~= nil then error("mail " .. i) end
  check(c, "mail " .. i, SMFIR_CONTINUE)
  if mt.rcptto(c, "<r" .. i .. "@example.test>") ~= nil then error("rcpt " .. i) end
  check(c, "rcpt " .. i, SMFIR_CONTINUE)
  -- policyd negotiates no header lines and no body: end of headers and
  -- end of message are all it gets.
  if mt.eoh(c) ~= nil then error("eoh " .. i) end
  if mt.eom(c) ~= nil then error("eom " .. i) end
  check(c, "eom " .. i, SMFIR_CONTINUE)
end
mt.disconnect(c)
local d = mt.connect(sock, 20, 0.05)
mt.conninfo(d, "client.example", "192.0.2.30")
mt.helo(d, "client.example")
check(d, "helo of the second connection", SMFIR_REPLYCODE)
mt.disconnect(d)
