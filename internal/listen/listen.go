// Package listen opens the listeners both front-ends share: "host:port"
// for TCP and "unix:/path" for a Unix socket.
package listen

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strings"
)

// Listen opens addr. A Unix socket left behind by a previous run is
// removed first (only if it is a socket, never another kind of file) and
// the new one is made connectable by the MTA's user.
func Listen(addr string) (net.Listener, error) {
	path, isUnix := strings.CutPrefix(addr, "unix:")
	if !isUnix {
		// No TCP keep-alive on accepted connections: both front-ends close
		// a connection silent past their idle timeout themselves, and
		// Go's default keep-alive costs every accept three setsockopt
		// calls, a twentieth of a request's cost when an MTA opens a
		// connection per request (Exim's ${readsocket}).
		lc := net.ListenConfig{KeepAlive: -1}
		ln, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
		return ln, nil
	}
	if path == "" {
		return nil, fmt.Errorf("listen %s: empty socket path", addr)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("listen %s: %s exists and is not a socket", addr, path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("listen %s: remove stale socket: %w", addr, err)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	// The MTA runs as its own user; the socket's directory is what
	// restricts who reaches it.
	if err := os.Chmod(path, 0o666); err != nil {
		ln.Close()
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return ln, nil
}
