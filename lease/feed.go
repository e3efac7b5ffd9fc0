package lease

// Feed turns the candidates a store keeps into the valid leases of each
// snapshot its Watch delivers, so that a change that only adds leases (a
// node joining: the common change of a large cluster) copies none of the
// leases delivered before it. Feed is for a store that keeps its
// candidates from one call to the next and replaces the candidate of a
// lease whose value changed by a new Candidate (the etcd store); a store
// that builds new candidates on every change gets what PeerLeases gives.
//
// The leases Next returns are views v[:n:n] of one array, and shared:
// what a view shows is never written again, and the leases a later
// change adds are written past the end of every earlier view. Each
// view's capacity is its length, so a consumer's append copies. A change
// that is not only additions (a lease removed, changed or no longer
// valid, or another own lease) starts a new array. Consumers must treat
// the leases as read-only, as Watch's contract says.
//
// Feed remembers what it delivered in the candidates (an unexported
// mark, carried with a Candidate when the store moves it in its slice).
// The zero Feed is ready to use; it is not safe for concurrent use.
type Feed struct {
	bufs verdictBufs // Next's verdict, kept for its arrays
	all  []Lease     // all[:n] were delivered; the last view is all[:n:n]
	n    int
	own  Lease // whose lease was placed first
	fed  bool  // Next was called
}

// Next judges cands for the node holding own (Config.Peers' rule) and
// returns the valid leases, the ignored candidates in the candidates'
// order, and whether the valid leases changed since the previous call.
// changed is false only when they are those of the previous call (the
// same candidates, valid as before); it is true for every change, and for
// the rare change that leaves equal leases (a subnet's holder replaced by
// an equal lease under another key). Own's lease (same subnets as own,
// when own is not zero) comes first; then the others: in the candidates'
// order after a change that started a new array, with the leases each
// later change added after them in the candidates' order.
func (f *Feed) Next(c Config, cands []Candidate, own Lease) (leases []Lease, ignored []Ignored, changed bool) {
	marks := c.marksInto(&f.bufs, cands, own)
	hasOwn := own.Subnet.IsValid() || own.IPv6Subnet.IsValid()
	kept, added, ownAdded := 0, 0, false
	for i, m := range marks {
		cd := &cands[i]
		switch {
		case m.rule != "":
			ignored = append(ignored, Ignored{Candidate: *cd, Rule: m.rule, Detail: m.detail})
		case cd.fed:
			kept++
		default:
			added++
			ownAdded = ownAdded || (hasOwn && cd.Lease.SameSubnets(own))
		}
	}
	if !f.fed || kept != f.n || ownAdded || !own.SameSubnets(f.own) {
		f.restart(marks, cands, own)
		return f.view(), ignored, true
	}
	if added == 0 {
		return f.view(), ignored, false
	}
	for i, m := range marks {
		if cd := &cands[i]; m.rule == "" && !cd.fed {
			// Past the end of every view handed out: append moves to a new
			// array (copying the delivered ones) only when this one is full.
			f.all = append(f.all[:f.n], cd.Lease)
			f.n++
			cd.fed = true
		}
	}
	return f.view(), ignored, true
}

// restart puts the valid candidates into a new array, own's first, and
// marks exactly them as delivered.
func (f *Feed) restart(marks []mark, cands []Candidate, own Lease) {
	n, first := 0, -1
	hasOwn := own.Subnet.IsValid() || own.IPv6Subnet.IsValid()
	for i, m := range marks {
		if m.rule == "" {
			n++
			if first < 0 && hasOwn && cands[i].Lease.SameSubnets(own) {
				first = i
			}
		}
	}
	f.all = make([]Lease, 0, n)
	if first >= 0 {
		f.all = append(f.all, cands[first].Lease)
	}
	for i, m := range marks {
		cands[i].fed = m.rule == ""
		if m.rule == "" && i != first {
			f.all = append(f.all, cands[i].Lease)
		}
	}
	f.n, f.own, f.fed = n, own, true
}

func (f *Feed) view() []Lease { return f.all[:f.n:f.n] }
