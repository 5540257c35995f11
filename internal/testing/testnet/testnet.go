// Package testnet picks loopback ports for the processes tests start.
package testnet

import "net"

// FreePort returns a loopback TCP port nobody listens on right now.
// Another process may still take it before it is used: callers that can
// retry on a taken port should.
func FreePort() (int, error) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
