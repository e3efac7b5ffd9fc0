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

// judge applies the valid-peer rule (lease.Config.Peers) to entries for
// the node with attrs holding own (either may be zero), and warns about
// each ignored or malformed key once per change to its value. taken is
// what allocation must count: the verdict's Taken plus keys whose value is
// malformed but whose subnets fit the network (the key exists, so it
// cannot be created).
func (s *Store) judge(cfg lease.Config, entries []entry, attrs lease.Attrs, own lease.Lease) (v lease.Verdict, taken []lease.Lease) {
	v, malformed := s.verdict(cfg, entries, attrs, own)
	taken = v.Taken()
	for _, m := range malformed {
		if r, _ := cfg.Shape(m.Lease); r == "" {
			taken = append(taken, m.Lease)
		}
	}
	return v, taken
}

// verdict is judge without what allocation needs: the verdict and the
// malformed entries.
func (s *Store) verdict(cfg lease.Config, entries []entry, attrs lease.Attrs, own lease.Lease) (lease.Verdict, []lease.Ignored) {
	cands, malformed := candidates(cfg, entries, attrs)
	if !slices.IsSortedFunc(cands, byCandName) {
		slices.SortFunc(cands, byCandName)
	}
	v := cfg.Peers(cands, own)
	s.warnIgnored(v.Ignored, malformed)
	return v, malformed
}

// candidates turns the entries that parsed into candidates (in the
// entries' order) and returns the others as malformed.
func candidates(cfg lease.Config, entries []entry, attrs lease.Attrs) ([]lease.Candidate, []lease.Ignored) {
	cands := make([]lease.Candidate, 0, len(entries))
	var malformed []lease.Ignored
	for _, e := range entries {
		if !e.ok {
			malformed = append(malformed, malformedOf(e))
			continue
		}
		c := candidateOf(e)
		c.Own = cfg.SameNode(attrs, e.l.Attrs)
		cands = append(cands, c)
	}
	return cands, malformed
}

// candidateOf is e as a candidate for lease.Config.Peers (Own unset).
func candidateOf(e entry) lease.Candidate {
	return lease.Candidate{Name: e.key, Lease: e.l, Order: e.createRev}
}

// malformedOf is the warning's record of e, which did not parse.
func malformedOf(e entry) lease.Ignored {
	return lease.Ignored{Candidate: candidateOf(e), Rule: lease.RuleMalformed, Detail: e.err.Error()}
}

// warnIgnored warns about each ignored or malformed key once per change
// to its value.
func (s *Store) warnIgnored(ignored, malformed []lease.Ignored) {
	for _, ig := range s.warn.Fresh(append(slices.Clip(ignored), malformed...)) {
		s.log.Warn("ignoring lease", "key", ig.Name, "rule", string(ig.Rule), "reason", ig.Detail)
	}
}

func byCandName(a, b lease.Candidate) int { return cmp.Compare(a.Name, b.Name) }

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
