// Package lease holds the pure data and logic of subnet leases: the Lease and
// its Attrs (wire-compatible with upstream flannel's etcd values), the network
// Config parsed from net-conf.json, the subnet allocator, the one rule for
// valid peers every store applies (Config.Peers, with Warnings to report an
// ignored lease once per change), how a node is identified
// (Config.Identity), and the sentinel errors stores and agents branch on.
//
// It does no I/O: no kernel, no network, no files. Stores (memstore,
// etcdstore, kubestore) and the Agent build on it.
package lease
