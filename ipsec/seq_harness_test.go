package ipsec

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// seqHarness drives a Network whose XFRM tables are a memXfrm and whose
// clock and key pairs are the test's: the Network's own code paths (Apply,
// Rekey, the repair of Run) on a fake kernel. Nodes are letters: a is this
// node, b, c, d are peers; key labels are a node letter and a version
// ("b2" is node b's second key). Node i has subnet 10.244.i.0/24
// (fd00:10:244:i::/64) and public address 172.30.0.1i (fd00::1i).
type seqHarness struct {
	t       *testing.T
	cfg     seqConfig
	n       *Network
	applied []lease.Lease // the peers of the last Apply step (a repair step re-applies them)
	x       *memXfrm
	start   time.Time
	clock   time.Time
	keys    map[string]keyPair
	names   map[string]string // key material -> "b1>a1 g0"
	own     []string          // labels of the key pairs Rekey makes, in order
	routes  []string          // the routes of the last apply, rendered
	logs    *bytes.Buffer     // the log since the step began
}

// seqConfig is what a sequence runs with.
type seqConfig struct {
	name  string
	dual  bool // IPv4 and IPv6
	encap bool // UDP encapsulation
}

func newSeqHarness(t *testing.T, cfg seqConfig, rekeyInterval time.Duration) *seqHarness {
	h := &seqHarness{t: t, cfg: cfg, x: newMemXfrm(), keys: map[string]keyPair{}, names: map[string]string{},
		start: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), logs: &bytes.Buffer{}}
	h.clock = h.start
	env := flannel.Env{
		Config: lease.Config{Network: netip.MustParsePrefix("10.244.0.0/16")},
		Iface:  flannel.ExternalInterface{Name: "ext0", Index: 2, IP: nodeIP(0, false), PublicIP: nodeIP(0, false)},
		Logger: slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	own := lease.Lease{Subnet: nodeSubnet(0, false)}
	if cfg.dual {
		env.Config.IPv6Network = netip.MustParsePrefix("fd00:10:244::/48")
		env.Iface.IPv6, env.Iface.PublicIPv6 = nodeIP(0, true), nodeIP(0, true)
		own.IPv6Subnet = nodeSubnet(0, true)
	}
	opts := Options{PSK: []byte(testPSK), UDPEncap: cfg.encap, Grace: 30 * time.Second, RekeyInterval: rekeyInterval}.withDefaults()
	h.n = newNetwork(env, own, opts, h.key("a1"))
	h.n.x = h.x
	h.n.now = func() time.Time { return h.clock }
	h.n.key = func() (keyPair, error) {
		require.NotEmpty(t, h.own, "a rekey the sequence did not announce")
		k := h.key(h.own[0])
		h.own = h.own[1:]
		return k, nil
	}
	h.n.routes = func(_ context.Context, in input, _ map[int]error) error {
		h.routes = nil
		for i, p := range in.peers {
			if in.valid[i] {
				h.routes = append(h.routes, "route "+nodeName(p.IP))
			}
		}
		return nil
	}
	return h
}

func nodeIndex(letter byte) int { return int(letter - 'a') }

func nodeIP(i int, v6 bool) netip.Addr {
	if v6 {
		return netip.MustParseAddr(fmt.Sprintf("fd00::1%d", i))
	}
	return netip.AddrFrom4([4]byte{172, 30, 0, byte(10 + i)})
}

func nodeSubnet(i int, v6 bool) netip.Prefix {
	if v6 {
		return netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", i))
	}
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24)
}

// nodeName names a node address or subnet by its letter ("b", "b6").
func nodeName(a netip.Addr) string {
	for i := range 4 {
		switch a {
		case nodeIP(i, false), nodeSubnet(i, false).Addr():
			return string(rune('a' + i))
		case nodeIP(i, true), nodeSubnet(i, true).Addr():
			return string(rune('a'+i)) + "6"
		}
	}
	return a.String()
}

// prefixName names a prefix: "cluster", "any" (0.0.0.0/0), "ha" (the
// address of node a alone), "a" (its subnet); IPv6 ones end in 6.
func prefixName(p netip.Prefix) string {
	switch {
	case p.Bits() == 0 && p.Addr().Is4():
		return "any"
	case p.Bits() == 0:
		return "any6"
	case p.IsSingleIP():
		return "h" + nodeName(p.Addr())
	}
	switch p {
	case netip.MustParsePrefix("10.244.0.0/16"):
		return "cluster"
	case netip.MustParsePrefix("fd00:10:244::/48"):
		return "cluster6"
	}
	return nodeName(p.Addr())
}

// key returns the key pair of label, made from it, and learns the names
// of every ESP key it has with the key pairs of other nodes.
func (h *seqHarness) key(label string) keyPair {
	if k, ok := h.keys[label]; ok {
		return k
	}
	seed := sha256.Sum256([]byte("flannel ipsec sequence test " + label))
	priv, err := ecdh.X25519().NewPrivateKey(seed[:])
	require.NoError(h.t, err)
	k := keyPair{priv: priv, pub: priv.PublicKey().Bytes()}
	for other, o := range h.keys {
		if other[0] == label[0] {
			continue
		}
		for gen := range uint8(Generations) {
			for _, d := range [][2]string{{label, other}, {other, label}} {
				s, r := k, o
				if d[0] == other {
					s, r = o, k
				}
				for _, v6 := range []bool{false, true} { // both families' keys have the name
					m, err := deriveKey([]byte(testPSK), AESGCM128, s.priv, r.pub, s.pub, r.pub, gen, v6)
					require.NoError(h.t, err)
					h.names[string(m)] = fmt.Sprintf("%s>%s g%d", d[0], d[1], gen)
				}
			}
		}
	}
	h.keys[label] = k
	return k
}

// espKeys are the key materials (one per family) of a name such as
// "b1>a2 g0".
func (h *seqHarness) espKeys(name string) [][]byte {
	var out [][]byte
	for m, n := range h.names {
		if n == name {
			out = append(out, []byte(m))
		}
	}
	if len(out) == 0 {
		h.t.Fatalf("no ESP key %q", name)
	}
	return out
}

// peer is the lease of the node and key of label ("b1"); "!b" is node b
// with a key authenticated by another PSK.
func (h *seqHarness) peer(label string) lease.Lease {
	bad := strings.HasPrefix(label, "!")
	label = strings.TrimPrefix(label, "!")
	i := nodeIndex(label[0])
	l := lease.Lease{Subnet: nodeSubnet(i, false), Attrs: lease.Attrs{BackendType: Type, PublicIP: nodeIP(i, false)}}
	if h.cfg.dual {
		l.IPv6Subnet, l.Attrs.PublicIPv6 = nodeSubnet(i, true), nodeIP(i, true)
	}
	psk := []byte(testPSK)
	if bad {
		psk = []byte(strings.Repeat("another psk ", 10))
		label = label[:1] + "bad"
	}
	epoch := uint64(1) // b1: 1, b2: 2, ...
	if n, err := strconv.Atoi(label[1:]); err == nil {
		epoch = uint64(n)
	}
	data, err := marshalBackendData(psk, bindingOf(l, h.key(label).pub, epoch))
	require.NoError(h.t, err)
	l.Attrs.BackendData = data
	return l
}

// table renders the XFRM tables and routes: states by direction, peer and
// key name (inbound generations together), policies by subnets and, for
// outbound templates, the key of the state they name.
func (h *seqHarness) table() []string {
	sts, err := h.x.states()
	require.NoError(h.t, err)
	pols, err := h.x.policies()
	require.NoError(h.t, err)
	name := func(s xstate) string {
		if n, ok := h.names[string(s.Key)]; ok {
			return n
		}
		return "?" + keyTag(s.Key)
	}
	var out []string
	gens := map[string]string{}
	own := map[netip.Addr]bool{nodeIP(0, false): true, nodeIP(0, true): true}
	for _, s := range sts {
		suffix := ""
		if s.Encap {
			suffix = " encap"
		}
		if own[s.Src] {
			out = append(out, fmt.Sprintf("out %s %s%s", nodeName(s.Dst), name(s), suffix))
			continue
		}
		n := name(s)
		pair, gen, _ := strings.Cut(n, " g")
		gens[fmt.Sprintf("in %s %s", nodeName(s.Src), pair)+" g%s"+suffix] += gen
	}
	for f, g := range gens {
		b := []byte(g)
		slices.Sort(b)
		out = append(out, fmt.Sprintf(f, b))
	}
	for _, p := range pols {
		out = append(out, h.policyLine(p, sts, name))
	}
	out = append(out, h.routes...)
	slices.Sort(out)
	return out
}

func (h *seqHarness) policyLine(p xpolicy, sts []xstate, name func(xstate) string) string {
	src, dst := prefixName(p.Src), prefixName(p.Dst)
	switch {
	case !p.TmplSrc.IsValid():
		verb := "allow"
		if p.Block {
			verb = "block"
		}
		switch p.Dir {
		case dirIn:
			verb += " in"
		case dirFwd:
			verb += " fwd"
		}
		return fmt.Sprintf("%s %s->%s", verb, src, dst)
	case p.Dir == dirOut:
		via := "no state"
		for _, s := range sts {
			if s.Src == p.TmplSrc && s.Dst == p.TmplDst && s.SPI == p.TmplSPI {
				via = name(s)
			}
		}
		return fmt.Sprintf("policy out %s->%s via %s", src, dst, via)
	case p.Dir == dirIn:
		return fmt.Sprintf("policy in %s->%s", src, dst)
	}
	return fmt.Sprintf("policy fwd %s->%s", src, dst)
}
