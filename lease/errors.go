package lease

import "errors"

// Sentinel errors. Callers branch on them with errors.Is; stores and the
// allocator wrap them with context naming the object.
var (
	// ErrNoFreeSubnet: every subnet in [SubnetMin, SubnetMax] is taken.
	ErrNoFreeSubnet = errors.New("no free subnet in the network")
	// ErrLeaseLost: the node's lease expired, was deleted, or was taken by
	// another node; the caller must acquire again.
	ErrLeaseLost = errors.New("lease lost")
	// ErrNotAssigned: the store has not (yet) assigned a subnet to this node,
	// e.g. a Kubernetes Node without spec.podCIDR.
	ErrNotAssigned = errors.New("no subnet assigned to this node")
	// ErrInvalidConfig: the network configuration (net-conf.json) is invalid.
	ErrInvalidConfig = errors.New("invalid network config")
)
