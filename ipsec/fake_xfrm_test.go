package ipsec

import (
	"cmp"
	"crypto/sha256"
	"fmt"
	"slices"
)

// memXfrm is an in-memory XFRM table with the kernel's semantics as the
// Network sees them through kernel: adding a state whose id exists keeps
// the old one (EEXIST is success), deleting what is not there succeeds,
// a policy upsert adds or replaces. Listings carry only what the kernel
// reports (addresses, SPI, key, encapsulation, the packet counter). Every
// write is recorded in ops, in order.
type memXfrm struct {
	st  map[stateID]xstate
	pol map[policyID]xpolicy
	ops []string
	// failKeys fails the adds of states with these keys (material as a
	// string), as a kernel that refuses them.
	failKeys map[string]error
	// added counts the successful adds of each (addresses, SPI, key).
	added map[string]int
}

var _ xfrm = (*memXfrm)(nil)

func newMemXfrm() *memXfrm {
	return &memXfrm{st: map[stateID]xstate{}, pol: map[policyID]xpolicy{}, added: map[string]int{}}
}

func keyTag(k []byte) string { return fmt.Sprintf("%x", sha256.Sum256(k))[:8] }

func (m *memXfrm) states() ([]xstate, error) {
	out := make([]xstate, 0, len(m.st))
	for _, s := range m.st {
		out = append(out, xstate{Src: s.Src, Dst: s.Dst, SPI: s.SPI, Key: slices.Clone(s.Key), Encap: s.Encap, Peer: -1, Packets: s.Packets})
	}
	sortStates(out)
	return out, nil
}

func (m *memXfrm) policies() ([]xpolicy, error) {
	out := make([]xpolicy, 0, len(m.pol))
	for _, p := range m.pol {
		p.Peer = -1
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b xpolicy) int {
		return cmp.Or(a.Src.Addr().Compare(b.Src.Addr()), cmp.Compare(a.Src.Bits(), b.Src.Bits()),
			a.Dst.Addr().Compare(b.Dst.Addr()), cmp.Compare(a.Dst.Bits(), b.Dst.Bits()), cmp.Compare(a.Dir, b.Dir))
	})
	return out, nil
}

func (m *memXfrm) addState(s xstate) error {
	m.ops = append(m.ops, fmt.Sprintf("add state %s->%s spi %#x key %s encap %t", s.Src, s.Dst, s.SPI, keyTag(s.Key), s.Encap))
	if err, ok := m.failKeys[string(s.Key)]; ok {
		return err
	}
	if _, ok := m.st[s.id()]; ok {
		return nil
	}
	m.st[s.id()] = xstate{Src: s.Src, Dst: s.Dst, SPI: s.SPI, Key: slices.Clone(s.Key), Encap: s.Encap}
	m.added[fmt.Sprintf("%s->%s spi %#x key %s", s.Src, s.Dst, s.SPI, keyTag(s.Key))]++
	return nil
}

func (m *memXfrm) delState(s xstate) error {
	m.ops = append(m.ops, fmt.Sprintf("del state %s->%s spi %#x", s.Src, s.Dst, s.SPI))
	delete(m.st, s.id())
	return nil
}

func (m *memXfrm) upsertPolicy(p xpolicy) error {
	m.ops = append(m.ops, "upsert policy "+p.String())
	p.Peer = -1
	m.pol[p.id()] = p
	return nil
}

func (m *memXfrm) delPolicy(p xpolicy) error {
	m.ops = append(m.ops, "del policy "+p.String())
	delete(m.pol, p.id())
	return nil
}

// count adds packets to the counters of the states with key material key
// (one per family) and reports whether there was one.
func (m *memXfrm) count(key []byte, packets uint64) bool {
	found := false
	for id, s := range m.st {
		if string(s.Key) == string(key) {
			s.Packets += packets
			m.st[id] = s
			found = true
		}
	}
	return found
}

// vanish deletes the states with key material key (one per family), as a
// flush or an administrator would, without recording a write of ours.
func (m *memXfrm) vanish(key []byte) bool {
	found := false
	for id, s := range m.st {
		if string(s.Key) == string(key) {
			delete(m.st, id)
			found = true
		}
	}
	return found
}

// takeOps returns the writes since the last call.
func (m *memXfrm) takeOps() []string {
	ops := m.ops
	m.ops = nil
	return ops
}
