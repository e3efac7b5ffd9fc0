package ipsec

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestPlanOrder(t *testing.T) {
	own, peer := netip.MustParseAddr("172.30.0.10"), netip.MustParseAddr("172.30.0.11")
	ownSub, peerSub := netip.MustParsePrefix("10.244.0.0/24"), netip.MustParsePrefix("10.244.1.0/24")
	cluster := netip.MustParsePrefix("10.244.0.0/16")
	allow := xpolicy{Src: ownSub, Dst: ownSub, Dir: dirOut, Priority: prioAllow, Peer: -1}
	block := xpolicy{Src: ownSub, Dst: cluster, Dir: dirOut, Priority: prioBlock, Block: true, Peer: -1}
	out := func(spi uint32) xpolicy {
		return xpolicy{Src: ownSub, Dst: peerSub, Dir: dirOut, Priority: prioPeer, TmplSrc: own, TmplDst: peer, TmplSPI: spi, Peer: 0}
	}
	in := xpolicy{Src: peerSub, Dst: ownSub, Dir: dirIn, Priority: prioPeer, TmplSrc: peer, TmplDst: own, Peer: 0}
	st := func(src, dst netip.Addr, spi uint32, key string) xstate {
		return xstate{Src: src, Dst: dst, SPI: spi, Key: []byte(key), Peer: 0}
	}
	for _, tc := range []struct {
		name         string
		want, have   []xstate
		wantP, haveP []xpolicy
		steps        []string
	}{
		{name: "nothing to do"},
		{name: "in sync", want: []xstate{st(own, peer, 0x100, "k")}, have: []xstate{st(own, peer, 0x100, "k")},
			wantP: []xpolicy{allow, block, out(0x100)}, haveP: []xpolicy{allow, block, out(0x100)}},
		{name: "first peer: block and allow, states, peer policies",
			want:  []xstate{st(peer, own, 0x200, "i"), st(own, peer, 0x100, "o")},
			wantP: []xpolicy{allow, block, out(0x100), in},
			steps: []string{
				"upsert 10.244.0.0/24->10.244.0.0/16 dir 1 prio 0x66cf block",
				"upsert 10.244.0.0/24->10.244.0.0/24 dir 1 prio 0x66c0 allow",
				"add 172.30.0.10->172.30.0.11 spi 0x100 o",
				"add 172.30.0.11->172.30.0.10 spi 0x200 i",
				"upsert 10.244.0.0/24->10.244.1.0/24 dir 1 prio 0x66c1 esp tunnel 172.30.0.10->172.30.0.11 spi 0x100",
				"upsert 10.244.1.0/24->10.244.0.0/24 dir 0 prio 0x66c1 esp tunnel 172.30.0.11->172.30.0.10",
			}},
		{name: "key switch: new state, policy moves, old state goes last",
			want:  []xstate{st(own, peer, 0x101, "new")},
			have:  []xstate{st(own, peer, 0x100, "old")},
			wantP: []xpolicy{allow, block, out(0x101)}, haveP: []xpolicy{allow, block, out(0x100)},
			steps: []string{
				"add 172.30.0.10->172.30.0.11 spi 0x101 new",
				"upsert 10.244.0.0/24->10.244.1.0/24 dir 1 prio 0x66c1 esp tunnel 172.30.0.10->172.30.0.11 spi 0x101",
				"del 172.30.0.10->172.30.0.11 spi 0x100",
			}},
		{name: "same id, other key: deleted before it is added",
			want: []xstate{st(own, peer, 0x100, "new"), st(own, peer, 0x300, "x")},
			have: []xstate{st(own, peer, 0x100, "old"), st(own, peer, 0x50, "stale")},
			steps: []string{
				"del 172.30.0.10->172.30.0.11 spi 0x100",
				"add 172.30.0.10->172.30.0.11 spi 0x100 new",
				"add 172.30.0.10->172.30.0.11 spi 0x300 x",
				"del 172.30.0.10->172.30.0.11 spi 0x50",
			}},
		{name: "encapsulation changed: replaced",
			want: []xstate{{Src: own, Dst: peer, SPI: 0x100, Key: []byte("k"), Encap: true}},
			have: []xstate{st(own, peer, 0x100, "k")},
			steps: []string{
				"del 172.30.0.10->172.30.0.11 spi 0x100",
				"add 172.30.0.10->172.30.0.11 spi 0x100 k",
			}},
		{name: "peer gone: policies before states, block and allow stay",
			have:  []xstate{st(own, peer, 0x100, "o"), st(peer, own, 0x200, "i")},
			wantP: []xpolicy{allow, block}, haveP: []xpolicy{allow, block, out(0x100), in},
			steps: []string{
				"del 10.244.0.0/24->10.244.1.0/24 dir 1 prio 0x66c1 esp tunnel 172.30.0.10->172.30.0.11 spi 0x100",
				"del 10.244.1.0/24->10.244.0.0/24 dir 0 prio 0x66c1 esp tunnel 172.30.0.11->172.30.0.10",
				"del 172.30.0.10->172.30.0.11 spi 0x100",
				"del 172.30.0.11->172.30.0.10 spi 0x200",
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, s := range plan(tc.want, tc.wantP, tc.have, tc.haveP) {
				got = append(got, s.String())
			}
			assert.Equal(t, tc.steps, got)
		})
	}
}

// String renders a step for tests, with the key material itself.
func (s step) String() string {
	switch s.kind {
	case stepAddState:
		return fmt.Sprintf("add %s->%s spi %#x %s", s.state.Src, s.state.Dst, s.state.SPI, s.state.Key)
	case stepDelState:
		return fmt.Sprintf("del %s->%s spi %#x", s.state.Src, s.state.Dst, s.state.SPI)
	case stepUpsertPolicy:
		return "upsert " + s.policy.String()
	}
	return "del " + s.policy.String()
}

func TestExecuteGoesOnAfterAFailure(t *testing.T) {
	x := newMemXfrm()
	a := xstate{Src: netip.MustParseAddr("172.30.0.10"), Dst: netip.MustParseAddr("172.30.0.11"), SPI: 0x100, Key: []byte("a"), Peer: 3}
	b := a
	b.SPI, b.Key = 0x101, []byte("b")
	x.failKeys = map[string]error{"a": errors.New("injected")}
	var failed []step
	execute(x, []step{{kind: stepAddState, state: a}, {kind: stepAddState, state: b}, {kind: stepDelState, state: a}},
		func(s step, err error) { failed = append(failed, s) })
	assert.Len(t, failed, 1)
	assert.Equal(t, 3, failed[0].peer(), "an add failure is its peer's")
	assert.Equal(t, -1, step{kind: stepDelState, state: a}.peer(), "a deletion failure is nobody's")
	have, err := x.states()
	assert.NoError(t, err)
	assert.Len(t, have, 1)
	assert.Len(t, x.takeOps(), 3)
}
