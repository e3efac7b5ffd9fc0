package flannel

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/flannelkit/flannel/internal/testenv"
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
			peerOnly, _ := a.logApplyError(tc.err, 2, nil)
			assert.Equal(t, tc.peerOnly, peerOnly)
		})
	}
}

// TestPeerWarnedOncePerChange: retries of the same failing peer lease warn
// once; a changed lease, or one failing again after it recovered, warns
// again.
func TestPeerWarnedOncePerChange(t *testing.T) {
	t.Parallel()
	var buf testenv.LogBuffer
	a := &Agent{log: slog.New(slog.NewTextHandler(&buf, nil))}
	l := lease.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), Attrs: lease.Attrs{PublicIP: netip.MustParseAddr("192.0.2.1")}}
	fail := func(l lease.Lease) error { return &PeerError{Lease: l, Err: errors.New("no backend data")} }
	count := func() int { return strings.Count(buf.String(), "level=WARN msg=\"peer not programmed") }
	var w peerWarnings
	for range 5 {
		_, w = a.logApplyError(fail(l), 1, w)
	}
	assert.Equal(t, 1, count(), "five retries of one lease")
	changed := l
	changed.Attrs.BackendData = []byte(`{"VNI":1}`)
	_, w = a.logApplyError(fail(changed), 1, w)
	_, w = a.logApplyError(fail(changed), 1, w)
	assert.Equal(t, 2, count(), "its value changed")
	_, w = a.logApplyError(nil, 1, w)
	_, _ = a.logApplyError(fail(changed), 1, w)
	assert.Equal(t, 3, count(), "it recovered and failed again")
}

// TestPeersDropsOwnAndConflicts: the node's own lease is dropped silently,
// a lease sharing one of its subnets with a warning; without either the
// peer set is handed on without a copy.
func TestPeersDropsOwnAndConflicts(t *testing.T) {
	t.Parallel()
	mk := func(v4, v6 string) lease.Lease {
		var l lease.Lease
		if v4 != "" {
			l.Subnet = netip.MustParsePrefix(v4)
		}
		if v6 != "" {
			l.IPv6Subnet = netip.MustParsePrefix(v6)
		}
		return l
	}
	own := mk("10.244.1.0/24", "fd00:1::/64")
	p2, p3 := mk("10.244.2.0/24", "fd00:2::/64"), mk("10.244.3.0/24", "fd00:3::/64")
	shares6 := mk("10.244.4.0/24", "fd00:1::/64")
	shares4 := mk("10.244.1.0/24", "fd00:5::/64")
	tests := []struct {
		name  string
		all   []lease.Lease
		want  []lease.Lease
		warns int
		// uncopied: the index of all that the result starts at when it is
		// handed on without a copy; -1 for a copy (or nothing).
		uncopied int
	}{
		{name: "none", all: nil, want: nil, uncopied: -1},
		{name: "peers only", all: []lease.Lease{p2, p3}, want: []lease.Lease{p2, p3}},
		{name: "own first", all: []lease.Lease{own, p2, p3}, want: []lease.Lease{p2, p3}, uncopied: 1},
		{name: "own last", all: []lease.Lease{p2, p3, own}, want: []lease.Lease{p2, p3}, uncopied: 0},
		{name: "own in the middle", all: []lease.Lease{p2, own, p3}, want: []lease.Lease{p2, p3}, uncopied: -1},
		{name: "own first, a conflict after", all: []lease.Lease{own, p2, shares6}, want: []lease.Lease{p2}, warns: 1, uncopied: -1},
		{name: "conflicts", all: []lease.Lease{p2, shares6, own, p3, shares4}, want: []lease.Lease{p2, p3}, warns: 2, uncopied: -1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var buf testenv.LogBuffer
			a := &Agent{log: slog.New(slog.NewTextHandler(&buf, nil))}
			got := a.peers(own, tc.all)
			assert.Equal(t, tc.want, got)
			assert.Equal(t, tc.warns, strings.Count(buf.String(), "level=WARN"), buf.String())
			if tc.uncopied >= 0 {
				assert.Same(t, &tc.all[tc.uncopied], &got[0], "handed on without a copy")
				assert.Len(t, got[:cap(got)], len(got), "no room to append over own")
			} else if len(got) > 0 {
				assert.NotSame(t, &tc.all[0], &got[0], "a copy")
			}
		})
	}
}
