// Package cni is the flannel CNI plugin: what the container runtime calls
// for every pod so that the pod gets an address from the node's subnet
// lease. It is compatible with upstream flannel's plugin of type
// "flannel": it reads the subnet.env that the Agent writes and delegates
// to the standard bridge and host-local plugins, with the same config keys
// (subnetFile, dataDir, delegate, ipam, runtimeConfig) and the same
// defaults, so upstream's conflist works unchanged.
//
// ADD stores the rendered delegate config in dataDir/<containerID> (mode
// 0600, written atomically) before the delegate runs; DEL replays it and is
// idempotent; CHECK, STATUS and GC delegate. Bad input is a *types.Error
// with a code and a message naming the key or file, and leaves nothing
// behind.
//
// Main serves one call from the CNI_* environment and stdin, for a plugin
// binary (examples/flannel-cni, installed as /opt/cni/bin/flannel) or a
// multicall binary that dispatches on argv[0]. Plugin's methods serve the
// same commands from a skel.CmdArgs. The package keeps no state between
// calls; it does not program the kernel itself (the delegates do).
package cni
