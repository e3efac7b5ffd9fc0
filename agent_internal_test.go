package flannel

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/flannelkit/flannel/lease"
)

func TestLeavesClassifiesPeerErrors(t *testing.T) {
	t.Parallel()
	p1 := &PeerError{Lease: lease.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24")}, Err: errors.New("x")}
	p2 := &PeerError{Lease: lease.Lease{Subnet: netip.MustParsePrefix("10.244.2.0/24")}, Err: errors.New("y")}
	other := errors.New("netlink socket closed")
	tests := []struct {
		name     string
		err      error
		n        int
		peerOnly bool
	}{
		{name: "single peer", err: p1, n: 1, peerOnly: true},
		{name: "joined peers", err: errors.Join(p1, p2), n: 2, peerOnly: true},
		{name: "wrapped join", err: fmt.Errorf("apply: %w", errors.Join(p1, p2)), n: 2, peerOnly: true},
		{name: "nested joins", err: errors.Join(errors.Join(p1), fmt.Errorf("b: %w", p2)), n: 2, peerOnly: true},
		{name: "peer and other", err: errors.Join(p1, other), n: 2, peerOnly: false},
		{name: "other", err: fmt.Errorf("apply: %w", other), n: 1, peerOnly: false},
	}
	a := &Agent{log: slog.New(slog.DiscardHandler)}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			assert.Len(t, leaves(tc.err), tc.n)
			assert.Equal(t, tc.peerOnly, a.logApplyError(tc.err, 2))
		})
	}
}
