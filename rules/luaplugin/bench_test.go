package luaplugin_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/policyd-mail/policyd/rules/rulestest"
)

// The Lua twin of connection_shaper against the Go rule, one connect
// hook per op over 1000 clients, in one run: read the Lua figures as a
// ratio of the Go ones.
func BenchmarkConnectionShaper(b *testing.B) {
	script, err := readTwin("lua_connection_shaper")
	if err != nil {
		b.Fatal(err)
	}
	for _, bc := range []struct {
		name, plugins string
		files         map[string]string
	}{
		{"go", "connection_shaper threshold 1000000000 exptime 3600", nil},
		{"lua", "lua_connection_shaper threshold 1000000000 exptime 3600", map[string]string{"plugins.d/lua_connection_shaper.lua": script}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			h := rulestest.New(b, bc.plugins, bc.files)
			ips := make([]string, 1000)
			for i := range ips {
				ips[i] = fmt.Sprintf("10.0.%d.%d", i/250, i%250+1)
			}
			ctx := context.Background()
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				s := h.Session(ips[i%len(ips)])
				i++
				if d := s.Connect(ctx); d.Refuses() {
					b.Fatal(d.Text)
				}
			}
		})
	}
}
