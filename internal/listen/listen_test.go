package listen

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestListen(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "p.sock")
	tests := []struct {
		name, addr, err string
		prep            func()
	}{
		{name: "tcp", addr: "127.0.0.1:0"},
		{name: "unix", addr: "unix:" + sock},
		{name: "stale unix socket is replaced", addr: "unix:" + sock, prep: func() {
			// A socket file left behind by a killed process.
			l, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			l.(*net.UnixListener).SetUnlinkOnClose(false)
			l.Close()
		}},
		{name: "regular file is not removed", addr: "unix:" + filepath.Join(dir, "file"), err: "is not a socket", prep: func() {
			os.WriteFile(filepath.Join(dir, "file"), []byte("x"), 0o600)
		}},
		{name: "empty path", addr: "unix:", err: "empty socket path"},
		{name: "bad tcp", addr: "127.0.0.1:99999", err: "listen 127.0.0.1:99999"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.prep != nil {
				tc.prep()
			}
			ln, err := Listen(tc.addr)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			c, err := net.Dial(ln.Addr().Network(), ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			c.Close()
		})
	}
}
