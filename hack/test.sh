#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls it).
# Sets up a fresh Debian machine, then runs vet, every test in strict mode
# (a missing prerequisite fails instead of skipping) with the race detector,
# and the one-machine cluster demo. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH

if [ "$(id -u)" -ne 0 ]; then
	echo "hack/test.sh: needs root (network namespaces, netlink)" >&2
	exit 1
fi

# Debian packages: iproute2 for `ip netns` (the demo prints how to enter a
# pod) and kmod to load the kernel modules the dataplane tests use.
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v modprobe >/dev/null || need+=(kmod)
# nftables and iptables: the traffic rules (package rules) run the nft and
# iptables binaries inside node namespaces.
command -v nft >/dev/null || need+=(nftables)
command -v iptables >/dev/null || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
# iptables through nf_tables (Debian's default), chosen explicitly.
for t in iptables ip6tables; do
	update-alternatives --set "$t" "/usr/sbin/$t-nft" >/dev/null 2>&1 || true
done
for m in veth bridge vxlan; do
	modprobe "$m" 2>/dev/null || true
done
mkdir -p /run/netns

export FLANNEL_STRICT=1
go vet ./...
go test -race -count=1 -timeout 45m ./...
go run ./examples/cluster -nodes 3
go run ./examples/cluster -nodes 3 -ipv6
