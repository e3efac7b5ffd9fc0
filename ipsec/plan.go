package ipsec

import (
	"bytes"
	"cmp"
	"slices"
)

// stepKind is what a step writes.
type stepKind uint8

const (
	stepUpsertPolicy stepKind = iota
	stepAddState
	stepDelState
	stepDelPolicy
)

// step is one kernel write: a state added or deleted, or a policy added
// or updated (upsert) or deleted.
type step struct {
	kind   stepKind
	state  xstate  // stepAddState, stepDelState
	policy xpolicy // stepUpsertPolicy, stepDelPolicy
}

// peer is the index of the peer whose traffic needs the step, -1 for none:
// a failed add or upsert is that peer's error, a failed deletion nobody's.
func (s step) peer() int {
	switch s.kind {
	case stepAddState:
		return s.state.Peer
	case stepUpsertPolicy:
		return s.policy.Peer
	}
	return -1
}

// plan returns the writes that take the kernel from have and havePol to
// want and wantPol, in the order that keeps the cluster network closed:
// the block and allow policies first (so it is closed before anything
// else changes), then the deletion of states replaced by one with the
// same id and other key material, then new states, then the peer policies
// (whose outbound templates name a state that now exists), then stale
// policies, then stale states. Until a peer's policy is in place its
// traffic meets the block policy. It is pure.
func plan(want []xstate, wantPol []xpolicy, have []xstate, havePol []xpolicy) []step {
	addS, delS := diffStates(want, have)
	upP, delP := diffPolicies(wantPol, havePol)
	replaced := make(map[stateID]bool, len(addS))
	for _, s := range addS {
		replaced[s.id()] = true
	}
	var steps []step
	for _, p := range upP {
		if !p.TmplSrc.IsValid() {
			steps = append(steps, step{kind: stepUpsertPolicy, policy: p})
		}
	}
	for _, s := range delS {
		if replaced[s.id()] {
			steps = append(steps, step{kind: stepDelState, state: s})
		}
	}
	for _, s := range addS {
		steps = append(steps, step{kind: stepAddState, state: s})
	}
	for _, p := range upP {
		if p.TmplSrc.IsValid() {
			steps = append(steps, step{kind: stepUpsertPolicy, policy: p})
		}
	}
	for _, p := range delP {
		steps = append(steps, step{kind: stepDelPolicy, policy: p})
	}
	for _, s := range delS {
		if !replaced[s.id()] {
			steps = append(steps, step{kind: stepDelState, state: s})
		}
	}
	return steps
}

// execute performs steps on x in order, all of them: a failed write is
// passed to onErr and the next one is tried.
func execute(x xfrm, steps []step, onErr func(step, error)) {
	for _, s := range steps {
		var err error
		switch s.kind {
		case stepUpsertPolicy:
			err = x.upsertPolicy(s.policy)
		case stepAddState:
			err = x.addState(s.state)
		case stepDelState:
			err = x.delState(s.state)
		case stepDelPolicy:
			err = x.delPolicy(s.policy)
		}
		if err != nil {
			onErr(s, err)
		}
	}
}

// stepCounts counts steps by kind.
func stepCounts(steps []step) map[stepKind]int {
	n := map[stepKind]int{}
	for _, s := range steps {
		n[s.kind]++
	}
	return n
}

// diffStates returns the states to add and to delete to go from have to
// want. A state with the same id but other key material or encapsulation
// is deleted and added again.
func diffStates(want, have []xstate) (add, del []xstate) {
	h := make(map[stateID]xstate, len(have))
	for _, s := range have {
		h[s.id()] = s
	}
	w := make(map[stateID]bool, len(want))
	for _, s := range want {
		w[s.id()] = true
		old, ok := h[s.id()]
		if ok && bytes.Equal(old.Key, s.Key) && old.Encap == s.Encap {
			continue
		}
		if ok {
			del = append(del, old)
		}
		add = append(add, s)
	}
	for _, s := range have {
		if !w[s.id()] {
			del = append(del, s)
		}
	}
	sortStates(add)
	sortStates(del)
	return add, del
}

func sortStates(s []xstate) {
	slices.SortFunc(s, func(a, b xstate) int {
		return cmp.Or(a.Src.Compare(b.Src), a.Dst.Compare(b.Dst), cmp.Compare(a.SPI, b.SPI))
	})
}

// samePolicy compares what we set on a policy.
func samePolicy(a, b xpolicy) bool {
	return a.id() == b.id() && a.Priority == b.Priority && a.Block == b.Block &&
		a.TmplSrc == b.TmplSrc && a.TmplDst == b.TmplDst && a.TmplSPI == b.TmplSPI
}

// diffPolicies returns the policies to add or update and those to delete.
// Block and allow policies come first in upsert, so the cluster network is
// closed before anything else changes.
func diffPolicies(want, have []xpolicy) (upsert, del []xpolicy) {
	h := make(map[policyID]xpolicy, len(have))
	for _, p := range have {
		h[p.id()] = p
	}
	w := make(map[policyID]bool, len(want))
	for _, p := range want {
		w[p.id()] = true
		if old, ok := h[p.id()]; ok && samePolicy(old, p) {
			continue
		}
		upsert = append(upsert, p)
	}
	for _, p := range have {
		if !w[p.id()] {
			del = append(del, p)
		}
	}
	slices.SortStableFunc(upsert, func(a, b xpolicy) int {
		return cmp.Compare(b.Priority, a.Priority) // block first
	})
	return upsert, del
}
