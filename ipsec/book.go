package ipsec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/flannelkit/flannel/lease"
)

// keyBook owns a Network's key state and its rules: our key pairs and the
// last rekey, the peers' published keys and those they replaced, what the
// peers' traffic showed about our keys, and for our outbound states their
// generation, which of them we installed and which linger after a switch.
// It reads the clock and the states listed from the kernel but never
// writes the kernel; Network.applyLocked asks it, then plans and executes.
//
// An outbound key and SPI (a key pair's generation) is never installed
// twice while our key of the pair lives: installed records how many
// generations of each pair were installed (spent), and a pair that drops
// out of use (a peer leaves, our previous key is switched away from, a
// pair ran out of generations) keeps its record until our key is retired,
// so when it comes back it takes its next unused generation, or stays
// blocked when there is none.
type keyBook struct {
	log           *slog.Logger
	grace         time.Duration
	rekeyInterval time.Duration
	limits        stateLimits

	keys      localKeys
	rekeyedAt time.Time
	peerKeys  map[string]*peerKey     // by lease key
	badKeys   map[string]string       // lease key -> BackendData and error last warned about
	epochs    map[string]publishedKey // lease key -> the key of the highest epoch seen
	use       map[string]*keyUse      // by lease key: peers' use of our keys since the rekey
	outGen    map[string]uint8        // pairName -> generation of our outbound state
	spent     map[string]uint8        // pairName -> generations installed (the highest + 1)
	outSeen   map[stateID]bool        // outbound states we installed
	exhausted map[string]bool         // pairName out of generations
	linger    map[stateID]time.Time   // replaced outbound states kept until then
	// earlyRekey asks Run for a rekey before RekeyInterval: a pair of our
	// current key ran out of generations, or one of its outbound states
	// reached a soft limit.
	earlyRekey bool
}

// outLinger is how long an outbound state replaced by one for the same
// peer (a key switch) stays installed: a packet already routed through it
// is dropped if it vanishes under it, while new packets take the newer
// state at once.
const outLinger = time.Second

// keyUse is what a peer's traffic has shown about our keys since our last
// rekey, from the packet counters of our inbound states.
type keyUse struct {
	knowsCur    bool      // it sent with our current key, so it has seen it
	prevPackets uint64    // packets it sent with our previous key, at the last look
	prevUsedAt  time.Time // when that count last grew (the rekey time at first)
}

// peerKey tracks a peer's published key and the one it replaced.
type peerKey struct {
	cur, prev []byte
	changed   time.Time
}

func newKeyBook(log *slog.Logger, opts Options, key keyPair) keyBook {
	return keyBook{
		log:           log,
		grace:         opts.Grace,
		rekeyInterval: opts.RekeyInterval,
		limits:        opts.limits.withDefaults(),
		keys:          localKeys{cur: key},
		peerKeys:      map[string]*peerKey{},
		badKeys:       map[string]string{},
		epochs:        map[string]publishedKey{},
		use:           map[string]*keyUse{},
		outGen:        map[string]uint8{},
		spent:         map[string]uint8{},
		outSeen:       map[stateID]bool{},
		exhausted:     map[string]bool{},
		linger:        map[stateID]time.Time{},
	}
}

// rekey makes key the current key pair and the current one the previous.
func (b *keyBook) rekey(key keyPair, now time.Time) {
	old := b.keys.cur
	b.keys.prev, b.keys.cur = &old, key
	b.rekeyedAt = now
	b.earlyRekey = false
	clear(b.use)
}

// pending reports whether the key the last rekey replaced is still live.
func (b *keyBook) pending() bool { return b.keys.prev != nil }

// inGrace reports whether a replaced key, ours or a peer's, or a replaced
// outbound state (lingering) is still live: repairs then run every tick,
// to switch and retire them on time.
func (b *keyBook) inGrace() bool {
	if b.keys.prev != nil || len(b.linger) > 0 {
		return true
	}
	for _, pk := range b.peerKeys {
		if pk.prev != nil {
			return true
		}
	}
	return false
}

// unusable records that the peer with lease key key published data that
// is no usable key for the reason err, and reports whether that is news
// (to warn once per change of either).
func (b *keyBook) unusable(key string, data json.RawMessage, err error) bool {
	v := string(data) + "\x00" + err.Error()
	if b.badKeys[key] == v {
		return false
	}
	b.badKeys[key] = v
	return true
}

// ErrOldEpoch is wrapped by the error for a peer whose key has an older
// epoch than one this node saw for the same subnets (a replayed lease), or
// the same epoch with another key.
var ErrOldEpoch = errors.New("peer key is older than one it published before (replayed lease?)")

// checkEpoch refuses k for the peer with lease key key when an older epoch
// than the highest seen for it, or that epoch with another key; otherwise
// it records k's epoch. The record outlives the peer's absence.
func (b *keyBook) checkEpoch(key string, k publishedKey) error {
	seen, ok := b.epochs[key]
	switch {
	case !ok || k.epoch > seen.epoch:
		b.epochs[key] = k
		return nil
	case k.epoch == seen.epoch && bytes.Equal(k.pub, seen.pub):
		return nil
	}
	return fmt.Errorf("%w: epoch %d, seen %d", ErrOldEpoch, k.epoch, seen.epoch)
}

// peer records pub as the published key of the peer with lease key key
// (named subnet in logs) and returns its current key and, within Grace of
// a change, the one it replaced.
func (b *keyBook) peer(key, subnet string, pub []byte, now time.Time) (cur, prev []byte) {
	delete(b.badKeys, key)
	pk := b.peerKeys[key]
	switch {
	case pk == nil:
		pk = &peerKey{cur: pub}
		b.peerKeys[key] = pk
	case !bytes.Equal(pk.cur, pub):
		pk.prev, pk.cur, pk.changed = pk.cur, pub, now
		b.log.Info("peer key changed", "subnet", subnet)
	}
	if pk.prev != nil && now.Sub(pk.changed) >= b.grace {
		pk.prev = nil
	}
	return pk.cur, pk.prev
}

// forgetPeers drops what is known about peers gone: keys and key use of
// those not in usable, warnings about those not in present.
func (b *keyBook) forgetPeers(usable, present map[string]bool) {
	for key := range b.peerKeys {
		if !usable[key] {
			delete(b.peerKeys, key)
		}
	}
	for key := range b.use {
		if !usable[key] {
			delete(b.use, key)
		}
	}
	for key := range b.badKeys {
		if !present[key] {
			delete(b.badKeys, key)
		}
	}
}

// sendPrev reports whether outbound to the peer with lease key key still
// uses our previous key. It switches to the current key as soon as the
// peer has sent with it (it has seen our new public key), or once Grace/2
// has passed since the rekey and the peer has not sent with the previous
// key for Grace/2: a peer that keeps sending with the old key has not seen
// the new one (its store watch may be down), and one that sends nothing
// gives no sign either way.
func (b *keyBook) sendPrev(key string, now time.Time) bool {
	if b.keys.prev == nil {
		return false
	}
	half := b.grace / 2
	u := b.use[key]
	if u == nil {
		return now.Sub(b.rekeyedAt) < half
	}
	return !u.knowsCur && (now.Sub(b.rekeyedAt) < half || now.Sub(u.prevUsedAt) < half)
}

// observe reads the packet counters of our inbound states (have, as
// wanted in states) into the key use of the peers of in (whose leases are
// peers) and reports whether the outbound key of one of them changed as a
// result (in.peers is updated).
func (b *keyBook) observe(in input, peers []lease.Lease, states, have []xstate, now time.Time) bool {
	packets := make(map[stateID]uint64, len(have))
	for _, s := range have {
		packets[s.id()] = s.Packets
	}
	type sums struct{ cur, prev uint64 }
	per := map[int]*sums{}
	for _, s := range states {
		if s.Out || s.Peer < 0 {
			continue
		}
		sm := per[s.Peer]
		if sm == nil {
			sm = &sums{}
			per[s.Peer] = sm
		}
		if s.ToPrev {
			sm.prev += packets[s.id()]
		} else {
			sm.cur += packets[s.id()]
		}
	}
	changed := false
	for i, sm := range per {
		key := peers[i].Key()
		u := b.use[key]
		if u == nil {
			// First look since the rekey: the baseline.
			u = &keyUse{prevPackets: sm.prev, prevUsedAt: b.rekeyedAt}
			b.use[key] = u
		}
		if sm.prev > u.prevPackets {
			u.prevUsedAt = now
		}
		u.prevPackets = sm.prev
		if sm.cur > 0 && !u.knowsCur {
			u.knowsCur = true
			b.log.Debug("peer sends with our new key", "subnet", peers[i].String())
		}
		if sp := b.sendPrev(key, now); sp != in.peers[i].SendPrev {
			in.peers[i].SendPrev = sp
			changed = true
		}
	}
	return changed
}

// retirePrev drops our previous key once Grace has passed since the rekey
// and no peer has sent with it for Grace/2 (or knows the current one), and
// after RekeyInterval in any case.
func (b *keyBook) retirePrev(now time.Time) {
	if b.keys.prev == nil {
		return
	}
	elapsed := now.Sub(b.rekeyedAt)
	if elapsed < b.grace {
		return
	}
	var inUse []string
	for key, u := range b.use {
		if !u.knowsCur && now.Sub(u.prevUsedAt) < b.grace/2 {
			inUse = append(inUse, key)
		}
	}
	if len(inUse) > 0 && elapsed < b.rekeyInterval {
		return
	}
	if len(inUse) > 0 {
		slices.Sort(inUse)
		b.log.Warn("retiring the previous key although peers still send with it; they have not seen the new key for a whole rekey interval", "peers", inUse)
	}
	b.keys.prev = nil
	clear(b.use)
}
