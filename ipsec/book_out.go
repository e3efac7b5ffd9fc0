package ipsec

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// The key book's rules for our outbound states: generations, exhausted
// pairs, soft limits, lingering after a switch.

// vanished moves the key pair of every wanted outbound state that we
// installed and that is gone from have (deleted by hand, flushed) to its
// next generation, or marks it exhausted after the last one, and reports
// whether a generation moved: the state must not come back with the same
// key, since its sequence number, and so the GCM nonce, would start over.
func (b *keyBook) vanished(states, have []xstate) bool {
	haveIDs := make(map[stateID]bool, len(have))
	for _, s := range have {
		haveIDs[s.id()] = true
	}
	bumped := false
	for _, s := range states {
		if !s.Out || !b.outSeen[s.id()] || haveIDs[s.id()] {
			continue
		}
		delete(b.outSeen, s.id())
		if b.outGen[s.Pair]+1 < Generations {
			b.outGen[s.Pair]++
			bumped = true
			b.log.Warn("outbound esp state vanished; installing a new one with a fresh SPI and key", "peer_ip", s.Dst, "generation", b.outGen[s.Pair])
		} else {
			b.exhaust(s.Pair)
		}
	}
	return bumped
}

var errExhausted = errors.New("outbound esp state was deleted too often for this key; traffic stays blocked until the next rekey or restart")

// dropExhausted removes from states the outbound ones of exhausted key
// pairs, with an error for their peer in failed.
func (b *keyBook) dropExhausted(states []xstate, failed map[int]error) []xstate {
	return slices.DeleteFunc(states, func(s xstate) bool {
		if s.Out && b.exhausted[s.Pair] {
			failed[s.Peer] = errors.Join(failed[s.Peer], errExhausted)
			return true
		}
		return false
	})
}

// forgetPairs moves every key pair no outbound state in states uses past
// the generations it installed (exhausted when none is left), so that it
// never comes back with a key and SPI it had, and forgets the pairs whose
// key of ours is retired.
func (b *keyBook) forgetPairs(states []xstate) {
	live := map[string]bool{}
	for _, s := range states {
		if s.Out {
			live[s.Pair] = true
		}
	}
	for _, m := range []map[string]uint8{b.outGen, b.spent} {
		for p := range m {
			if !b.ourKeyLive(p) {
				delete(b.outGen, p)
				delete(b.spent, p)
				delete(b.exhausted, p)
			}
		}
	}
	for p, n := range b.spent {
		if live[p] || n <= b.outGen[p] {
			continue
		}
		if n >= Generations {
			b.exhaust(p)
			continue
		}
		b.outGen[p] = n
	}
}

// exhaust marks pair p out of generations; when its sender is our current
// key, an early rekey is due (our previous key is retired anyway).
func (b *keyBook) exhaust(p string) {
	if !b.exhausted[p] && strings.HasPrefix(p, string(b.keys.cur.pub)) {
		b.earlyRekey = true
	}
	b.exhausted[p] = true
}

// checkLimits asks for an early rekey when one of the outbound states of
// our current key in have (as wanted in states) reached a soft limit.
func (b *keyBook) checkLimits(states, have []xstate) {
	if b.earlyRekey {
		return
	}
	byID := make(map[stateID]xstate, len(have))
	for _, h := range have {
		byID[h.id()] = h
	}
	for _, s := range states {
		h, ok := byID[s.id()]
		if s.Out && ok && strings.HasPrefix(s.Pair, string(b.keys.cur.pub)) && b.limits.reached(h.Packets, h.Bytes) {
			b.log.Info("outbound esp state reached its soft limit; rekeying early", "peer_ip", s.Dst, "packets", h.Packets, "bytes", h.Bytes)
			b.earlyRekey = true
			return
		}
	}
}

// ourKeyLive reports whether the sender of pair p (a pairName of one of
// our outbound states) is our current or previous key.
func (b *keyBook) ourKeyLive(p string) bool {
	if strings.HasPrefix(p, string(b.keys.cur.pub)) {
		return true
	}
	return b.keys.prev != nil && strings.HasPrefix(p, string(b.keys.prev.pub))
}

// lingerStates adds to states the outbound states of ours in have that
// were replaced by another outbound state between the same addresses less
// than outLinger ago.
func (b *keyBook) lingerStates(states, have []xstate, now time.Time) []xstate {
	type ends struct{ src, dst netip.Addr }
	want := make(map[stateID]bool, len(states))
	outTo := map[ends]bool{}
	for _, s := range states {
		want[s.id()] = true
		if s.Out {
			outTo[ends{s.Src, s.Dst}] = true
		}
	}
	keep := map[stateID]bool{}
	for _, h := range have {
		id := h.id()
		if want[id] || !b.outSeen[id] || !outTo[ends{h.Src, h.Dst}] {
			continue
		}
		until, ok := b.linger[id]
		if !ok {
			until = now.Add(outLinger)
			b.linger[id] = until
		}
		if now.Before(until) {
			h.Out, h.Peer = true, -1
			states = append(states, h)
			keep[id] = true
		}
	}
	for id := range b.linger {
		if !keep[id] {
			delete(b.linger, id)
		}
	}
	return states
}

// installed records the outbound states of states as ours, except those
// whose add failed.
func (b *keyBook) installed(states []xstate, addFailed map[stateID]bool) {
	outs := map[stateID]bool{}
	for _, s := range states {
		if s.Out && !addFailed[s.id()] {
			outs[s.id()] = true
		}
	}
	for id := range b.outSeen {
		if !outs[id] {
			delete(b.outSeen, id)
		}
	}
	for id := range outs {
		b.outSeen[id] = true
	}
	for _, s := range states {
		if s.Out && !addFailed[s.id()] && s.Pair != "" {
			b.spent[s.Pair] = max(b.spent[s.Pair], s.Gen+1)
		}
	}
}
