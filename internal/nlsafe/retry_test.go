package nlsafe

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestRetry(t *testing.T) {
	intr := netlink.ErrDumpInterrupted
	tests := []struct {
		name      string
		errs      []error // per attempt; nil after the list ends
		wantCalls int
		wantIs    error
		wantMsg   string
	}{
		{name: "first try", wantCalls: 1},
		{name: "interrupted twice", errs: []error{intr, intr}, wantCalls: 3},
		{name: "interrupted until the last try", errs: []error{intr, intr, intr, intr}, wantCalls: DumpAttempts},
		{name: "interrupted every time", errs: []error{intr, intr, intr, intr, intr, intr}, wantCalls: DumpAttempts,
			wantIs: intr, wantMsg: "list things: 5 attempts: "},
		{name: "other error not retried", errs: []error{unix.EPERM}, wantCalls: 1, wantIs: unix.EPERM, wantMsg: "list things: "},
		{name: "other error after an interrupt", errs: []error{intr, unix.ENOBUFS}, wantCalls: 2, wantIs: unix.ENOBUFS},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			got, err := retry(Handle{}, "things", func() ([]int, error) {
				calls++
				var err error
				if calls <= len(tc.errs) {
					err = tc.errs[calls-1]
				}
				// An interrupted dump comes with partial results.
				return []int{calls}, err
			})
			assert.Equal(t, tc.wantCalls, calls, "attempts")
			if tc.wantIs == nil {
				assert.NoError(t, err)
				assert.Equal(t, []int{calls}, got, "the result of the attempt that succeeded")
				return
			}
			assert.ErrorIs(t, err, tc.wantIs)
			assert.Contains(t, err.Error(), tc.wantMsg)
			assert.Nil(t, got, "no partial result with an error")
		})
	}
}

func TestRetryHookTurnsSuccessIntoInterrupt(t *testing.T) {
	hooked := 0
	h := WithInterrupts(Handle{}, func(what string) bool {
		assert.Equal(t, "things", what)
		hooked++
		return hooked <= 2
	})
	calls := 0
	got, err := retry(h, "things", func() (int, error) { calls++; return calls, nil })
	assert.NoError(t, err)
	assert.Equal(t, 3, got)
	// A failing attempt is not handed to the hook: it is already an error.
	hooked = 0
	_, err = retry(h, "things", func() (int, error) { return 0, errors.New("boom") })
	assert.EqualError(t, err, "list things: boom")
	assert.Zero(t, hooked)
}
