package milter

import (
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/policyd-mail/policyd/internal/ratelog"
)

// LibraryLog returns the writer for the standard log package, which
// go-milter writes to (one line per connection it gives up on, the
// guard permitting). Its lines go to l at warn, at most one per every,
// with the count held back: a peer must not be able to flood the log.
func LibraryLog(l *slog.Logger, every time.Duration) io.Writer {
	return &libraryLog{l: l, lim: ratelog.New(every)}
}

type libraryLog struct {
	l   *slog.Logger
	lim *ratelog.Limiter
}

func (w *libraryLog) Write(p []byte) (int, error) {
	if n, ok := w.lim.Allow(time.Now()); ok {
		w.l.Warn("go-milter", "line", strings.TrimSpace(string(p)), "suppressed", n)
	}
	return len(p), nil
}
