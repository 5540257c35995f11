package testmta

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"testing"
	"time"
)

// SwaksTimeout bounds one Swaks run.
const SwaksTimeout = 60 * time.Second

// Swaks runs swaks with args and returns its combined output. It calls
// t.Fatal if swaks is not installed. A non-zero exit status (swaks exits
// non-zero when the server rejects the mail) is returned as err, with the
// output still returned.
func Swaks(t testing.TB, args ...string) (output string, err error) {
	t.Helper()
	path, lerr := exec.LookPath("swaks")
	if lerr != nil {
		t.Fatalf("testmta: swaks is not installed (%v); `make test` installs it (apt-get install swaks)", lerr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), SwaksTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		err = fmt.Errorf("swaks timed out after %v: %w", SwaksTimeout, err)
	}
	return string(out), err
}
