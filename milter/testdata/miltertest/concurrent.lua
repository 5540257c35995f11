-- Three SMTP sessions from one client open at once; with
-- connection_shaper threshold 2 the third is refused at HELO (the
-- connect-stage answer is held to the next command), the first two pass,
-- and a session from another client passes while they are open.
-- Globals from -D: sock.
local function check(c, what, want)
  local r = mt.getreply(c)
  if r ~= want then error(what .. ": reply " .. tostring(r) .. ", want " .. tostring(want)) end
end
local conns = {}
for i = 1, 3 do
  local c = mt.connect(sock, 20, 0.05)
  if c == nil then error("cannot connect to " .. sock) end
  if mt.conninfo(c, "client.example", "192.0.2.10") ~= nil then error("conninfo " .. i) end
  check(c, "connect " .. i, SMFIR_CONTINUE)
  conns[i] = c
end
local other = mt.connect(sock, 20, 0.05)
if mt.conninfo(other, "other.example", "192.0.2.11") ~= nil then error("conninfo other") end
check(other, "connect other", SMFIR_CONTINUE)
for i = 1, 3 do
  if mt.helo(conns[i], "client.example") ~= nil then error("helo " .. i) end
end
check(conns[1], "helo 1", SMFIR_CONTINUE)
check(conns[2], "helo 2", SMFIR_CONTINUE)
check(conns[3], "helo 3", SMFIR_REPLYCODE)
if mt.helo(other, "other.example") ~= nil then error("helo other") end
check(other, "helo other", SMFIR_CONTINUE)
for i = 1, 3 do mt.disconnect(conns[i]) end
mt.disconnect(other)
