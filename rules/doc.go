// Package rules keeps a node's masquerade and forward rules, the netfilter
// side of flannel: pods reaching outside the cluster network leave with the
// node's address, pod-to-pod traffic keeps its source, and the FORWARD hook
// accepts traffic from and to the cluster network.
//
// Two implementations give the same semantics (see the project's
// compat/FORMATS.md): nftables through sigs.k8s.io/knftables (tables
// "flannel-ipv4" and "flannel-ipv6") and iptables through
// github.com/coreos/go-iptables (chains FLANNEL-POSTRTG in nat and
// FLANNEL-FWD in filter, jumped to from POSTROUTING and FORWARD). Both drive
// the nft / iptables binaries, which they run inside the node's network
// namespace (nlsafe.InNamespace): the binaries must be installed.
//
// A Manager ensures the rules for a network and lease, repairs them
// periodically, and removes what it owns, never other tables or chains. A
// periodic check costs one netlink request while the namespace's nf_tables
// generation shows that no rule changed since the last check found them
// right (iptables-nft included; iptables-legacy is always checked), and
// runs the binaries at least every 12th period regardless.
// Choosing one mode removes the other mode's leftovers.
//
// It is not a firewall: it adds no rule beyond what flannel needs.
package rules
