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
//
// # Layers
//
// The module's packages form layers, listed from the bottom. Each entry
// says what its packages may import from the module; nothing imports a
// package listed after its own, so each contract has one home and no
// import runs back up. layers_test.go checks these rules.
//
//   - lease: leases, attributes, the network config (net-conf.json), the
//     subnet allocator, lease-set tracking and the sentinel errors. Pure
//     data and logic: no I/O, no kernel, no network; it imports no package
//     of the module.
//   - Leaf helpers under internal/ that any layer may use: internal/retry
//     (the one capped, jittered backoff), internal/nlsafe (the one door to
//     the kernel: namespace-bound netlink whose dumps retry interrupted
//     dumps, namespace switches, sysctls, subscriptions), internal/ipconv
//     and internal/confjson (net-conf values). They import lease at most.
//   - flannel (this package): LeaseStore, Backend, Network, Agent,
//     subnet.env. It imports lease and leaf helpers only: no store, no
//     backend, no traffic rules.
//   - backend: what every dataplane shares (interface discovery, MTU, the
//     route reconciler, the Reconciler Apply/repair shell, the Registry).
//     It imports flannel, lease and the leaf helpers.
//   - Dataplanes, one package each (hostgw, vxlan, ipsec, wireguard, ipip,
//     extension, alloc): they import backend, flannel and lease, never
//     another dataplane or a store.
//   - Stores, one LeaseStore each (kubestore, etcdstore, memstore): they
//     import flannel, lease and leaf helpers, never backend, a dataplane or
//     another store. Only kubestore imports client-go; only etcdstore
//     imports the etcd client.
//   - rules: the masquerade and forward rules (TrafficRules). It imports
//     flannel, lease and internal/nlsafe (to run nft and iptables in the
//     node's namespace); never a store or a dataplane.
//   - cni: the CNI plugin. It imports flannel only, for subnet.env; it
//     never reaches a store, a backend or the kernel itself.
//   - internal/daemon: the flanneld program minus its main. It wires the
//     layers above together and is imported by examples/flanneld only.
//   - examples/* and hack/*: thin mains. They wire, parse flags and exit;
//     anything worth testing lives in a package below them. deploy holds
//     the manifests and their tests, and no code.
//
// Test harnesses sit beside the layers: internal/netlab (namespaces and
// veth pairs), internal/etcdtest, internal/kubetest, internal/vmtest and
// internal/vmlab, internal/cnilab, internal/testenv, internal/kubecluster,
// internal/image, and the contract suites internal/storetest and
// internal/backendtest.
// Tests, examples and hack commands import them; a library package's
// non-test code never does.
package flannel
