package milter

import (
	"encoding/binary"
	"fmt"
)

// guard follows the milter framing (4-byte length, command byte, data)
// in the bytes the MTA sends, so a broken or hostile peer is cut off
// before go-milter allocates for it: go-milter would make a buffer of any
// claimed length up to 1 MiB per connection and wait for it to fill.
type guard struct {
	maxPacket uint32
	hdr       [4]byte
	hn        int    // header bytes seen
	left      uint32 // payload bytes still to come
	atCmd     bool   // next payload byte is the command
	optneg    int    // OPTNEG version bytes still to check (4 → 0)
	ver       [4]byte
}

// brokenError is what Read returns for a stream that is not milter.
type brokenError struct{ reason string }

func (e brokenError) Error() string { return "broken milter stream: " + e.reason }

// known commands, protocol v2 to v6.
var knownCmd = [256]bool{'A': true, 'B': true, 'C': true, 'D': true, 'E': true, 'H': true, 'K': true, 'L': true,
	'M': true, 'N': true, 'O': true, 'Q': true, 'R': true, 'T': true, 'U': true}

// scan checks p, the next bytes of the stream.
func (g *guard) scan(p []byte) error {
	for len(p) > 0 {
		if g.left == 0 {
			k := copy(g.hdr[g.hn:], p)
			g.hn += k
			p = p[k:]
			if g.hn < 4 {
				return nil
			}
			g.hn = 0
			n := binary.BigEndian.Uint32(g.hdr[:])
			switch {
			case n == 0:
				return brokenError{"zero-length packet"}
			case n > g.maxPacket:
				return brokenError{fmt.Sprintf("packet of %d bytes, limit %d", n, g.maxPacket)}
			}
			g.left, g.atCmd = n, true
			continue
		}
		if g.atCmd {
			cmd := p[0]
			if !knownCmd[cmd] {
				return brokenError{fmt.Sprintf("unknown command byte 0x%02x", cmd)}
			}
			g.atCmd = false
			if cmd == 'O' {
				if g.left < 13 {
					return brokenError{"short option negotiation"}
				}
				g.optneg = 4
			}
			p, g.left = p[1:], g.left-1
			continue
		}
		k := min(uint32(len(p)), g.left)
		if g.optneg > 0 {
			c := copy(g.ver[4-g.optneg:], p[:min(int(k), g.optneg)])
			g.optneg -= c
			// MTAs speak versions 2 to 6; anything else is not an MTA.
			if v := binary.BigEndian.Uint32(g.ver[:]); g.optneg == 0 && (v < 2 || v > 6) {
				return brokenError{fmt.Sprintf("option negotiation for milter version %d", v)}
			}
		}
		p, g.left = p[k:], g.left-k
	}
	return nil
}
