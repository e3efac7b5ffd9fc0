package ipsec

// xfrm is the part of the kernel's XFRM tables a Network reads and writes:
// our ESP states and policies. kernel implements it on a netlink handle;
// the sequence tests implement it with an in-memory table. Adding a state
// that exists (same id) keeps the existing one and succeeds, deleting one
// that does not exist succeeds, and upsertPolicy adds or replaces.
type xfrm interface {
	states() ([]xstate, error)
	policies() ([]xpolicy, error)
	addState(xstate) error
	delState(xstate) error
	upsertPolicy(xpolicy) error
	delPolicy(xpolicy) error
}

var _ xfrm = kernel{}
