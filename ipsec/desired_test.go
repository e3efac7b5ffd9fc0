package ipsec

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func mustKey(t *testing.T) keyPair {
	t.Helper()
	k, err := newKeyPair()
	require.NoError(t, err)
	return k
}

func view(i int, k keyPair) nodeView {
	return nodeView{
		Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24),
		IP:     netip.AddrFrom4([4]byte{172, 30, 0, byte(10 + i)}),
		Cur:    k.pub,
	}
}

// cluster builds the desired state of every node of an n-node cluster.
func cluster(t *testing.T, keys []keyPair) [][]xstate {
	out := make([][]xstate, len(keys))
	for me := range keys {
		in := input{psk: []byte(testPSK), cipher: AESGCM128, cluster: netip.MustParsePrefix("10.244.0.0/16"),
			own: view(me, keys[me]), keys: localKeys{cur: keys[me]}}
		for j := range keys {
			if j != me {
				in.peers = append(in.peers, view(j, keys[j]))
				in.valid = append(in.valid, true)
			}
		}
		states, _, failed := desired(in)
		require.Empty(t, failed)
		out[me] = states
	}
	return out
}

func TestDesiredStatesMatchAcrossNodes(t *testing.T) {
	keys := []keyPair{mustKey(t), mustKey(t), mustKey(t)}
	all := cluster(t, keys)
	for me, states := range all {
		assert.Len(t, states, 2*(1+Generations), "2 peers x (out + in per generation)")
		for _, s := range states {
			if !s.Out {
				continue
			}
			// The receiver has an inbound state with the same id and key.
			recv := int(s.Dst.As4()[3]) - 10
			found := false
			for _, r := range all[recv] {
				if !r.Out && r.id() == s.id() {
					found = true
					assert.Equal(t, s.Key, r.Key)
				}
			}
			assert.True(t, found, "node %d -> %d outbound has a matching inbound", me, recv)
		}
	}
	// Keys per direction are distinct.
	seen := map[string]bool{}
	for _, states := range all {
		for _, s := range states {
			if s.Out {
				assert.False(t, seen[string(s.Key)])
				seen[string(s.Key)] = true
			}
		}
	}
}

func TestDesiredPolicies(t *testing.T) {
	a, b := mustKey(t), mustKey(t)
	in := input{psk: []byte(testPSK), cipher: AESGCM128, cluster: netip.MustParsePrefix("10.244.0.0/16"),
		own: view(0, a), keys: localKeys{cur: a},
		peers: []nodeView{view(1, b), {Subnet: netip.MustParsePrefix("10.244.2.0/24")}, view(3, b)},
		valid: []bool{true, true, false}}
	states, pols, failed := desired(in)
	require.Len(t, failed, 1)
	var outSPI uint32
	for _, s := range states {
		if s.Out {
			outSPI = s.SPI
		}
	}
	require.NotZero(t, outSPI)
	assert.Contains(t, failed[1].Error(), "no public IPv4 address")
	var got []string
	for _, p := range pols {
		got = append(got, p.String())
	}
	assert.Equal(t, []string{
		// Nothing to the cluster network leaves in clear, from any
		// source; from the cluster network only the own subnet reaches
		// it without ESP (issue #18).
		"0.0.0.0/0->10.244.0.0/24 dir 1 prio 0x66c0 allow",
		"0.0.0.0/0->10.244.0.0/16 dir 1 prio 0x66cf block",
		"10.244.0.0/24->10.244.0.0/24 dir 0 prio 0x66c0 allow",
		"10.244.0.0/16->10.244.0.0/24 dir 0 prio 0x66cf block",
		"10.244.0.0/24->10.244.0.0/24 dir 2 prio 0x66c0 allow",
		"10.244.0.0/16->10.244.0.0/24 dir 2 prio 0x66cf block",
		fmt.Sprintf("10.244.0.0/24->10.244.1.0/24 dir 1 prio 0x66c1 esp tunnel 172.30.0.10->172.30.0.11 spi %#x", outSPI),
		"10.244.1.0/24->10.244.0.0/24 dir 0 prio 0x66c1 esp tunnel 172.30.0.11->172.30.0.10",
		"10.244.1.0/24->10.244.0.0/24 dir 2 prio 0x66c1 esp tunnel 172.30.0.11->172.30.0.10",
		// Host and SNAT sources: our public address to the peer's pods,
		// the peer's to ours.
		fmt.Sprintf("172.30.0.10/32->10.244.1.0/24 dir 1 prio 0x66c1 esp tunnel 172.30.0.10->172.30.0.11 spi %#x", outSPI),
		"172.30.0.11/32->10.244.0.0/24 dir 0 prio 0x66c1 esp tunnel 172.30.0.11->172.30.0.10",
		"172.30.0.11/32->10.244.0.0/24 dir 2 prio 0x66c1 esp tunnel 172.30.0.11->172.30.0.10",
	}, got, "a peer without a valid key gets no policy: the block policies cover it; the outbound ones name the outbound state")
}

func TestDesiredRekeyOverlap(t *testing.T) {
	a1, a2, b := mustKey(t), mustKey(t), mustKey(t)
	base := func(keys localKeys, peer nodeView) []xstate {
		in := input{psk: []byte(testPSK), cipher: AESGCM128, cluster: netip.MustParsePrefix("10.244.0.0/16"),
			own: view(0, keys.cur), keys: keys, peers: []nodeView{peer}, valid: []bool{true}}
		s, _, failed := desired(in)
		require.Empty(t, failed)
		return s
	}
	before := base(localKeys{cur: a1}, view(1, b))
	stillOld := view(1, b)
	stillOld.SendPrev = true
	during := base(localKeys{cur: a2, prev: &a1}, stillOld)
	after := base(localKeys{cur: a2, prev: &a1}, view(1, b))
	out := func(s []xstate) xstate {
		for _, x := range s {
			if x.Out {
				return x
			}
		}
		t.Fatal("no outbound state")
		return xstate{}
	}
	assert.Len(t, during, 1+2*Generations, "outbound + inbound for the old and the new own key")
	assert.Equal(t, out(before), out(during), "outbound keeps the old key until peers saw the new one")
	assert.NotEqual(t, out(before).SPI, out(after).SPI)
	// The peer, once it sees a2, sends with the key our inbound has.
	peerIn := input{psk: []byte(testPSK), cipher: AESGCM128, cluster: netip.MustParsePrefix("10.244.0.0/16"),
		own: view(1, b), keys: localKeys{cur: b}, peers: []nodeView{view(0, a2)}, valid: []bool{true}}
	ps, _, _ := desired(peerIn)
	po := out(ps)
	found := false
	for _, x := range during {
		if !x.Out && x.id() == po.id() {
			found = true
			assert.Equal(t, po.Key, x.Key)
		}
	}
	assert.True(t, found)
	// And the peer's view of a1 during its own grace keeps inbound too.
	peerIn.peers[0].Prev = a1.pub
	ps, _, _ = desired(peerIn)
	assert.Len(t, ps, 1+2*Generations)
}

func TestDiffStates(t *testing.T) {
	a, b := netip.MustParseAddr("172.30.0.10"), netip.MustParseAddr("172.30.0.11")
	s := func(spi uint32, key string) xstate { return xstate{Src: a, Dst: b, SPI: spi, Key: []byte(key)} }
	for _, tc := range []struct {
		name           string
		want, have     []xstate
		addSPI, delSPI []uint32
	}{
		{"empty", nil, nil, nil, nil},
		{"add missing", []xstate{s(1, "k"), s(2, "k")}, []xstate{s(1, "k")}, []uint32{2}, nil},
		{"delete stale", []xstate{s(1, "k")}, []xstate{s(1, "k"), s(3, "k")}, nil, []uint32{3}},
		{"replace changed key", []xstate{s(1, "new")}, []xstate{s(1, "old")}, []uint32{1}, []uint32{1}},
		{"no change", []xstate{s(1, "k")}, []xstate{s(1, "k")}, nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			add, del := diffStates(tc.want, tc.have)
			spis := func(x []xstate) []uint32 {
				var o []uint32
				for _, s := range x {
					o = append(o, s.SPI)
				}
				return o
			}
			assert.Equal(t, tc.addSPI, spis(add))
			assert.Equal(t, tc.delSPI, spis(del))
		})
	}
}

func TestDiffPolicies(t *testing.T) {
	own, peer, cl := netip.MustParsePrefix("10.244.0.0/24"), netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("10.244.0.0/16")
	ip1, ip2 := netip.MustParseAddr("172.30.0.10"), netip.MustParseAddr("172.30.0.11")
	block := xpolicy{Src: own, Dst: cl, Dir: dirOut, Priority: prioBlock, Block: true}
	out := xpolicy{Src: own, Dst: peer, Dir: dirOut, Priority: prioPeer, TmplSrc: ip1, TmplDst: ip2}
	moved := out
	moved.TmplDst = netip.MustParseAddr("172.30.0.12")
	stale := xpolicy{Src: own, Dst: netip.MustParsePrefix("10.244.9.0/24"), Dir: dirOut, Priority: prioPeer, TmplSrc: ip1, TmplDst: ip2}

	up, del := diffPolicies([]xpolicy{out, block}, nil)
	require.Len(t, up, 2)
	assert.True(t, up[0].Block, "block policy is programmed first")
	assert.Empty(t, del)

	up, del = diffPolicies([]xpolicy{block, moved}, []xpolicy{block, out, stale})
	assert.Equal(t, []xpolicy{moved}, up)
	assert.Equal(t, []xpolicy{stale}, del)
}

func TestDesiredOutboundGeneration(t *testing.T) {
	a, b := mustKey(t), mustKey(t)
	mk := func(me int, k, peer keyPair, gen map[string]uint8) []xstate {
		in := input{psk: []byte(testPSK), cipher: AESGCM128, cluster: netip.MustParsePrefix("10.244.0.0/16"),
			own: view(me, k), keys: localKeys{cur: k}, peers: []nodeView{view(1-me, peer)}, valid: []bool{true}, outGen: gen}
		s, _, failed := desired(in)
		require.Empty(t, failed)
		return s
	}
	gen0 := mk(0, a, b, nil)
	gen1 := mk(0, a, b, map[string]uint8{pairName(a.pub, b.pub): 1})
	out := func(s []xstate) xstate {
		for _, x := range s {
			if x.Out {
				return x
			}
		}
		t.Fatal("no outbound")
		return xstate{}
	}
	o0, o1 := out(gen0), out(gen1)
	assert.NotEqual(t, o0.SPI, o1.SPI, "a new generation has a new SPI")
	assert.NotEqual(t, o0.Key, o1.Key, "and a new key")
	// The receiver already holds an inbound state for it.
	found := false
	for _, x := range mk(1, b, a, nil) {
		if !x.Out && x.id() == o1.id() {
			found = true
			assert.Equal(t, o1.Key, x.Key)
		}
	}
	assert.True(t, found)
}
