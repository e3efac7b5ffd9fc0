package rules

import (
	"net/netip"
)

// Upstream's names, kept so that tools and operators find the same objects.
const (
	// kubeProxyMark is the mark kube-proxy sets on packets it has already
	// decided to masquerade; they are left alone here.
	kubeProxyMark = "0x4000/0x4000"

	iptPostrtgChain = "FLANNEL-POSTRTG"
	iptFwdChain     = "FLANNEL-FWD"
	iptMasqComment  = "flanneld masq"
	iptFwdComment   = "flanneld forward"

	nftTable4      = "flannel-ipv4"
	nftTable6      = "flannel-ipv6"
	nftPostrtg     = "postrtg"
	nftForward     = "forward"
	multicast4     = "224.0.0.0/4"
	multicast6     = "ff00::/8"
	nftMarkReturn  = "meta mark & 0x00004000 == 0x00004000 return"
	nftMasquerade  = "masquerade"
	nftFullyRandom = " fully-random"
)

// family is what one address family's rules are built from.
type family struct {
	// network is the cluster network N, subnet this node's lease S (masked).
	network, subnet netip.Prefix
	randomFully     bool
}

func (f family) v6() bool { return f.network.Addr().Is6() }

func (f family) multicast() string {
	if f.v6() {
		return multicast6
	}
	return multicast4
}

// iptMasqRules returns the FLANNEL-POSTRTG rules, in order, as iptables
// arguments after "-A FLANNEL-POSTRTG".
func iptMasqRules(f family) [][]string {
	n, s := f.network.Masked().String(), f.subnet.Masked().String()
	c := []string{"-m", "comment", "--comment", iptMasqComment}
	masq := []string{"-j", "MASQUERADE"}
	if f.randomFully {
		masq = append(masq, "--random-fully")
	}
	cat := func(parts ...[]string) []string {
		var out []string
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	ret := []string{"-j", "RETURN"}
	return [][]string{
		cat([]string{"-m", "mark", "--mark", kubeProxyMark}, c, ret),
		cat([]string{"-s", s, "-d", n}, c, ret),
		cat([]string{"-s", n, "-d", s}, c, ret),
		cat([]string{"!", "-s", n, "-d", s}, c, ret),
		cat([]string{"-s", n, "!", "-d", f.multicast()}, c, masq),
		cat([]string{"!", "-s", n, "-d", n}, c, masq),
	}
}

// iptMasqJump is the POSTROUTING rule that jumps to FLANNEL-POSTRTG.
func iptMasqJump() []string {
	return []string{"-m", "comment", "--comment", iptMasqComment, "-j", iptPostrtgChain}
}

// iptFwdRules returns the FLANNEL-FWD rules.
func iptFwdRules(f family) [][]string {
	n := f.network.Masked().String()
	return [][]string{
		{"-s", n, "-m", "comment", "--comment", iptFwdComment, "-j", "ACCEPT"},
		{"-d", n, "-m", "comment", "--comment", iptFwdComment, "-j", "ACCEPT"},
	}
}

// iptFwdJump is the FORWARD rule that jumps to FLANNEL-FWD.
func iptFwdJump() []string {
	return []string{"-m", "comment", "--comment", iptFwdComment, "-j", iptFwdChain}
}

// nftMasqRules returns the rules of the postrtg chain in nft syntax.
func nftMasqRules(f family) []string {
	n, s := f.network.Masked().String(), f.subnet.Masked().String()
	ip := "ip"
	if f.v6() {
		ip = "ip6"
	}
	masq := nftMasquerade
	if f.randomFully {
		masq += nftFullyRandom
	}
	return []string{
		nftMarkReturn,
		ip + " saddr " + s + " " + ip + " daddr " + n + " return",
		ip + " saddr " + n + " " + ip + " daddr " + s + " return",
		ip + " saddr != " + n + " " + ip + " daddr " + s + " return",
		ip + " saddr " + n + " " + ip + " daddr != " + f.multicast() + " " + masq,
		ip + " saddr != " + n + " " + ip + " daddr " + n + " " + masq,
	}
}

// nftFwdRules returns the rules of the forward chain in nft syntax.
func nftFwdRules(f family) []string {
	n := f.network.Masked().String()
	ip := "ip"
	if f.v6() {
		ip = "ip6"
	}
	return []string{
		ip + " saddr " + n + " accept",
		ip + " daddr " + n + " accept",
	}
}
