// Package flannel gives every Kubernetes pod its own routable IP across
// nodes, as a library. A node takes a subnet lease from a LeaseStore (the
// Kubernetes API, etcd, or memory), and a Backend programs the kernel so that
// traffic to every other node's subnet reaches that node (host-gw routes, a
// VXLAN overlay, or IPsec).
//
// This package holds the three interfaces that compose a node (LeaseStore,
// Backend, Network) and the Agent that drives them. It imports no concrete
// store or backend: callers link the ones they use. It is wire-compatible
// with upstream flannel (etcd keys, Node annotations, net-conf.json,
// subnet.env), so nodes running it and nodes running upstream flanneld can
// share one network.
package flannel
