package e2e

import (
	"bytes"
	"log/slog"
	"strings"
	"sync"
	"testing"
)

// logSink collects every agent's log lines of one test: they go to t.Log
// (shown on failure or with -v) and stay searchable for assertions.
type logSink struct {
	t   testing.TB
	mu  sync.Mutex
	buf bytes.Buffer
}

func newLogSink(t testing.TB) *logSink { return &logSink{t: t} }

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.buf.Write(p)
	return len(p), nil
}

func (s *logSink) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(s, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// has reports whether one logged line contains every one of parts.
func (s *logSink) has(parts ...string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for line := range strings.Lines(s.buf.String()) {
		ok := true
		for _, p := range parts {
			if !strings.Contains(line, p) {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}

// dump writes the collected lines to the test log (on failure).
func (s *logSink) dump() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.t.Log("agent logs:\n" + s.buf.String())
}
