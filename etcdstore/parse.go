package etcdstore

import (
	"cmp"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flannelkit/flannel/lease"
)

// parse turns one etcd key-value under <prefix>/subnets/ into a lease. The
// error names the key. Expiration is left zero. When only the value is
// malformed, the lease still has its subnets.
func (s *Store) parse(key, value []byte) (lease.Lease, error) {
	k := string(key)
	name, ok := strings.CutPrefix(k, s.subnetsKey)
	if !ok {
		return lease.Lease{}, fmt.Errorf("etcd key %s is not under %s", k, s.subnetsKey)
	}
	v4, v6, err := lease.ParseKey(name)
	if err != nil {
		return lease.Lease{}, fmt.Errorf("etcd key %s: %w", k, err)
	}
	l := lease.Lease{Subnet: v4, IPv6Subnet: v6}
	if err := json.Unmarshal(value, &l.Attrs); err != nil {
		return l, fmt.Errorf("etcd key %s: value: %w", k, err)
	}
	return l, nil
}

// entry is one key under <prefix>/subnets/ as the store lists or watches it.
type entry struct {
	key       string
	l         lease.Lease // subnets when the key parsed; attributes only when ok
	ok        bool        // key and value parsed
	err       error       // why not, when !ok
	modRev    int64
	createRev int64            // decides between overlapping leases: the older wins
	leaseID   clientv3.LeaseID // NoLease: a reservation
}

func (e entry) reservation() bool { return e.leaseID == clientv3.NoLease }

func (s *Store) entryOf(kv *mvccpb.KeyValue) entry {
	l, err := s.parse(kv.Key, kv.Value)
	if err != nil {
		l.Attrs = lease.Attrs{}
	}
	return entry{key: string(kv.Key), l: l, ok: err == nil, err: err, modRev: kv.ModRevision,
		createRev: kv.CreateRevision, leaseID: clientv3.LeaseID(kv.Lease)}
}

// taken judges cands (sorted by key, Own set) for the node holding own
// (lease.Config.PeerLeases; own may be zero), warns about each ignored or
// malformed key once per change to its value, and returns what allocation
// must count: the valid leases, those ignored only for holding a subnet
// another holds (lease.Taken), and the malformed keys whose subnets fit the
// network (the key exists, so it cannot be created). No copy of the
// candidates is made: at 5,000 keys a starting node's busiest moment.
func (s *Store) taken(cfg lease.Config, cands []lease.Candidate, malformed []lease.Ignored, own lease.Lease) []lease.Lease {
	leases, ignored := cfg.PeerLeases(cands, own)
	s.warnIgnored(ignored, malformed)
	taken := lease.Taken(leases, ignored)
	for _, m := range malformed {
		if r, _ := cfg.Shape(m.Lease); r == "" {
			taken = append(taken, m.Lease)
		}
	}
	return taken
}

// candidates turns the entries that parsed into candidates, sorted by key
// (etcd lists in key order), with Own set for the node with attrs, and
// returns the others as malformed. The slice has room for one more: the
// key Acquire writes, which Watch inserts.
func (s *Store) candidates(cfg lease.Config, entries []entry, attrs lease.Attrs) ([]lease.Candidate, []lease.Ignored) {
	cands := make([]lease.Candidate, 0, len(entries)+1)
	var malformed []lease.Ignored
	for _, e := range entries {
		if !e.ok {
			malformed = append(malformed, s.malformedOf(e))
			continue
		}
		c := s.candidateOf(e)
		c.Own = cfg.SameNode(attrs, e.l.Attrs)
		cands = append(cands, c)
	}
	if !slices.IsSortedFunc(cands, byCandName) {
		slices.SortFunc(cands, byCandName)
	}
	if !slices.IsSortedFunc(malformed, byIgnoredNames) {
		slices.SortFunc(malformed, byIgnoredNames)
	}
	return cands, malformed
}

// candidateOf is e as a candidate for lease.Config.Peers (Own unset). Its
// Name is the key under <prefix>/subnets/ ("10.244.3.0-24"), a string of
// its own: 16 bytes per key kept instead of the whole key's 48.
func (s *Store) candidateOf(e entry) lease.Candidate {
	return lease.Candidate{Name: strings.Clone(s.name(e.key)), Lease: e.l, Order: e.createRev}
}

// name is key under <prefix>/subnets/, as candidates are named (sharing
// key's bytes). Removing a common prefix keeps the keys' order.
func (s *Store) name(key string) string { return strings.TrimPrefix(key, s.subnetsKey) }

// malformedOf is the warning's record of e, which did not parse.
func (s *Store) malformedOf(e entry) lease.Ignored {
	return lease.Ignored{Candidate: s.candidateOf(e), Rule: lease.RuleMalformed, Detail: e.err.Error()}
}

// warnIgnored warns about each ignored or malformed key once per change
// to its value.
func (s *Store) warnIgnored(ignored, malformed []lease.Ignored) {
	for _, ig := range s.warn.Fresh(append(slices.Clip(ignored), malformed...)) {
		s.log.Warn("ignoring lease", "key", s.subnetsKey+ig.Name, "rule", string(ig.Rule), "reason", ig.Detail)
	}
}

func byCandName(a, b lease.Candidate) int { return cmp.Compare(a.Name, b.Name) }

func byIgnoredNames(a, b lease.Ignored) int { return cmp.Compare(a.Name, b.Name) }

// ownLease returns the lease the last successful Acquire returned.
func (s *Store) ownLease() lease.Lease {
	s.ownMu.Lock()
	defer s.ownMu.Unlock()
	return s.own
}

func (s *Store) setOwn(l lease.Lease) {
	s.ownMu.Lock()
	defer s.ownMu.Unlock()
	s.own = l
}
