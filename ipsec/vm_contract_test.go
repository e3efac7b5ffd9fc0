package ipsec_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/backendtest"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/ipsec"
)

// TestInVMContract runs the backend contract suite on ipsec inside the VM,
// dual-stack. Its Damage deletes our outbound state to a peer twice: each
// time it comes back as the next generation, never with its old key and
// SPI (TestInVMStatesDeletedByHand covers a flush).
//
// Keys do not survive a restart: every Prepare makes a fresh key pair, by
// design (a restarted node must never install an old key again with a
// sequence number starting over). So the suite's restart case cannot see
// the same SPIs and keys, and dumpXfrm leaves them out: it renders each of
// our states by its addresses (one line per state, so the number of
// generations shows) and each policy by selector, direction, priority,
// action and template addresses. The restart case then checks that a
// restarted node programs the same states and policies (with new keys),
// and that no route, link, address or neighbour changes.
func TestInVMContract(t *testing.T) {
	inVM(t)
	backendtest.Run(t, backendtest.Fixture{
		Type: ipsec.Type,
		New: func(t *testing.T, repair time.Duration) flannel.Backend {
			b, err := ipsec.New(ipsec.Options{PSK: []byte(clusterPSK), RepairInterval: repair})
			require.NoError(t, err)
			return b
		},
		Dump: dumpXfrm,
		Damage: []backendtest.Damage{
			{Name: "inbound state", Do: func(t *testing.T, n, peer *backendtest.Node) {
				delStates(t, n, func(s netlink.XfrmState) bool { return s.Src.Equal(peer.Node.IP.AsSlice()) }, 1)
			}},
			{Name: "outbound state", Do: func(t *testing.T, n, peer *backendtest.Node) {
				delStates(t, n, func(s netlink.XfrmState) bool { return s.Dst.Equal(peer.Node.IP.AsSlice()) }, 1)
			}},
			{Name: "outbound policy", Do: func(t *testing.T, n, peer *backendtest.Node) {
				for _, p := range xfrmPolicies(t, n.Node.Handle) {
					if p.Dir == netlink.XFRM_DIR_OUT && len(p.Tmpls) == 1 && p.Tmpls[0].Dst.Equal(peer.Node.IP.AsSlice()) {
						require.NoError(t, n.Node.Handle.XfrmPolicyDel(&p))
						return
					}
				}
				t.Fatal("no outbound policy to the peer")
			}},
		},
	})
}

// delStates deletes up to k of n's ESP states that match.
func delStates(t *testing.T, n *backendtest.Node, match func(netlink.XfrmState) bool, k int) {
	t.Helper()
	done := 0
	for _, s := range xfrmStates(t, n.Node.Handle) {
		if done < k && s.Reqid == int(ipsec.DefaultReqid) && match(s) {
			require.NoError(t, n.Node.Handle.XfrmStateDel(&s))
			done++
		}
	}
	require.Positive(t, done, "no state to delete")
}

// dumpXfrm renders our XFRM states and policies on n without SPIs and
// keys (see TestInVMContract).
func dumpXfrm(t *testing.T, n *backendtest.Node) []string {
	t.Helper()
	var out []string
	for _, s := range xfrmStates(t, n.Node.Handle) {
		if s.Reqid != int(ipsec.DefaultReqid) || s.Spi == 0 {
			continue
		}
		out = append(out, fmt.Sprintf("state %s->%s encap %t", s.Src, s.Dst, s.Encap != nil))
	}
	for _, p := range xfrmPolicies(t, n.Node.Handle) {
		src, _ := ipconv.PrefixFromIPNet(p.Src) // ::/0 reads as 0.0.0.0/0
		dst, _ := ipconv.PrefixFromIPNet(p.Dst)
		l := fmt.Sprintf("policy %s->%s dir %d prio %#x action %d", src, dst, p.Dir, p.Priority, p.Action)
		if len(p.Tmpls) > 0 {
			if p.Tmpls[0].Reqid != int(ipsec.DefaultReqid) {
				continue
			}
			l += fmt.Sprintf(" tmpl %s->%s", p.Tmpls[0].Src, p.Tmpls[0].Dst)
		}
		out = append(out, l)
	}
	return out
}
