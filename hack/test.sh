#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls it).
# Sets up a fresh Debian machine, then runs vet, golangci-lint (.golangci.yml),
# every test in strict mode (a missing prerequisite fails instead of
# skipping) with the race detector, and the one-machine cluster demo. Needs
# root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH
# Where the time goes (cold and warm runs differ mostly in the set-up).
SECONDS=0
took() { echo "hack/test.sh: $1 done at $((SECONDS / 60))m$((SECONDS % 60))s" >&2; }

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
# The ipsec dataplane's tests run in a qemu VM (the host kernel may lack
# ESP): qemu, Debian's stock cloud kernel with its modules, a static busybox
# for the initramfs, cpio and kmod (depmod). See internal/vmtest.
vm=()
command -v qemu-system-x86_64 >/dev/null || vm+=(qemu-system-x86)
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || vm+=(linux-image-cloud-amd64)
dpkg -s busybox-static >/dev/null 2>&1 || vm+=(busybox-static)
command -v cpio >/dev/null || vm+=(cpio)
# The one-machine Kubernetes cluster (internal/kubecluster): Debian's
# containerd (1.6) and runc run each node's pods.
command -v containerd >/dev/null || vm+=(containerd)
command -v runc >/dev/null || vm+=(runc)
command -v depmod >/dev/null || [ -x /usr/sbin/depmod ] || vm+=(kmod)
# The Docker hosts (internal/dockerhost): Debian's docker.io (dockerd
# 20.10, docker-init; it depends on the containerd and runc above, so it
# adds no second containerd). The harness starts one dockerd per node
# namespace itself; the package must not start a dockerd on this host (a
# host docker0 and FORWARD policy DROP), so service starts are denied
# while it installs, unless a policy is already in place.
command -v dockerd >/dev/null || vm+=(docker.io)
if [ ${#vm[@]} -gt 0 ]; then
	apt-get update -qq
	policy=
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod +x /usr/sbin/policy-rc.d
		policy=1
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${vm[@]}"
	[ -z "$policy" ] || rm -f /usr/sbin/policy-rc.d
fi
# iptables through nf_tables (Debian's default), chosen explicitly.
for t in iptables ip6tables; do
	update-alternatives --set "$t" "/usr/sbin/$t-nft" >/dev/null 2>&1 || true
done
for m in veth bridge vxlan br_netfilter; do
	modprobe "$m" 2>/dev/null || true
done
mkdir -p /run/netns

# A tool that is installed is not yet a tool that works (a /dev/kvm that
# opens but cannot run a VM, an nft whose kernel lacks nf_tables): check
# each one the tests rely on in a scratch namespace and stop with a clear
# message. The VM accelerator is chosen from a probe boot by internal/vmtest
# (FLANNEL_VM_ACCEL=tcg|kvm forces one).
fail() { echo "hack/test.sh: $*" >&2; exit 1; }
probe_ns="flannel-preflight-$$"
ip netns add "$probe_ns" || fail "ip netns add does not work (need root and iproute2)"
trap 'ip netns del "$probe_ns" 2>/dev/null || true' EXIT
in_ns() { ip netns exec "$probe_ns" "$@"; }
in_ns ip link add pf-a type veth peer name pf-b >/dev/null 2>&1 || fail "the kernel cannot make veth pairs (module veth)"
in_ns ip link add pf-br type bridge >/dev/null 2>&1 || fail "the kernel cannot make bridges (module bridge)"
in_ns ip link add pf-vx type vxlan id 42 dstport 4789 >/dev/null 2>&1 || fail "the kernel cannot make vxlan devices (module vxlan)"
out=$(in_ns nft list ruleset 2>&1) || fail "nft is installed but does not work here: $out"
for t in iptables ip6tables; do
	out=$(in_ns "$t" -S 2>&1) || fail "$t is installed but does not work here: $out"
done
out=$(qemu-system-x86_64 --version 2>&1) || fail "qemu-system-x86_64 is installed but does not run: $out"
out=$(containerd --version 2>&1) || fail "containerd is installed but does not run: $out"
out=$(runc --version 2>&1) || fail "runc is installed but does not run: $out"
out=$(dockerd --version 2>&1) || fail "dockerd is installed but does not run: $out"
out=$(/usr/bin/docker --version 2>&1) || fail "the docker CLI (/usr/bin/docker, docker.io) does not run: $out"
ip netns del "$probe_ns"
trap - EXIT

# The real kube-apiserver for the Kubernetes store tests and the Helm CLI
# for the chart tests, built from the tools modules (tools/go.mod pins
# k8s.io/kubernetes, tools/helm/go.mod helm.sh/helm/v3) once per version
# into the user cache, linked where the tests look (internal/kubetest.Tool).
kas_dir="${XDG_CACHE_HOME:-$HOME/.cache}/flannelkit/bin"
kas="$kas_dir/kube-apiserver-$(sha256sum tools/go.sum | cut -c1-16)"
# A cached binary that no longer runs (a truncated copy, another
# architecture) is rebuilt, not trusted because it is executable.
if ! "$kas" --version >/dev/null 2>&1; then
	mkdir -p "$kas_dir"
	(cd tools && CGO_ENABLED=0 go build -ldflags='-s -w' -o "$kas.tmp" k8s.io/kubernetes/cmd/kube-apiserver)
	mv "$kas.tmp" "$kas"
fi
helm="$kas_dir/helm-$(sha256sum tools/helm/go.sum | cut -c1-16)"
if ! "$helm" version >/dev/null 2>&1; then
	mkdir -p "$kas_dir"
	(cd tools/helm && CGO_ENABLED=0 go build -ldflags='-s -w' -o "$helm.tmp" helm.sh/helm/v3/cmd/helm)
	mv "$helm.tmp" "$helm"
fi
# golangci-lint, from tools/golangci (pinned in its go.mod), for the lint
# rules of .golangci.yml: no netlink call on the calling thread's
# namespace, no unwrapped netlink dump (internal/nlsafe).
golangci="$kas_dir/golangci-lint-$(sha256sum tools/golangci/go.sum | cut -c1-16)"
if ! "$golangci" version >/dev/null 2>&1; then
	mkdir -p "$kas_dir"
	(cd tools/golangci && CGO_ENABLED=0 go build -ldflags='-s -w' -o "$golangci.tmp" github.com/golangci/golangci-lint/v2/cmd/golangci-lint)
	mv "$golangci.tmp" "$golangci"
fi
# The node and control-plane binaries of the one-machine Kubernetes
# cluster (internal/kubecluster), from the same tools module.
k8s_sum=$(sha256sum tools/go.sum | cut -c1-16)
for b in kubelet kube-controller-manager kube-scheduler kube-proxy; do
	out="$kas_dir/$b-$k8s_sum"
	if ! "$out" --version >/dev/null 2>&1; then
		(cd tools && CGO_ENABLED=0 go build -ldflags='-s -w' -o "$out.tmp" "k8s.io/kubernetes/cmd/$b")
		mv "$out.tmp" "$out"
	fi
	mkdir -p .cache/bin
	ln -sfn "$out" ".cache/bin/$b"
done

# The reference CNI plugins the flannel CNI plugin delegates to, from
# tools/cni (github.com/containernetworking/plugins), into one directory
# that the cni tests use as CNI_PATH.
cni="$kas_dir/cni-plugins-$(sha256sum tools/cni/go.sum | cut -c1-16)"
if ! [ -x "$cni/bridge" ] || ! "$cni/host-local" 2>&1 | grep -q "CNI protocol versions"; then
	rm -rf "$cni.tmp" && mkdir -p "$cni.tmp"
	for p in main/bridge ipam/host-local main/loopback meta/portmap; do
		(cd tools/cni && CGO_ENABLED=0 go build -ldflags='-s -w' -o "$cni.tmp/" "github.com/containernetworking/plugins/plugins/$p")
	done
	rm -rf "$cni" && mv "$cni.tmp" "$cni"
fi
# CoreDNS for the cluster's DNS, from tools/coredns.
coredns="$kas_dir/coredns-$(sha256sum tools/coredns/go.sum | cut -c1-16)"
if ! "$coredns" -version >/dev/null 2>&1; then
	(cd tools/coredns && CGO_ENABLED=0 go build -ldflags='-s -w' -o "$coredns.tmp" github.com/coredns/coredns)
	mv "$coredns.tmp" "$coredns"
fi
mkdir -p .cache/bin
ln -sfn "$coredns" .cache/bin/coredns
ln -sfn "$cni" .cache/bin/cni
ln -sfn "$kas" .cache/bin/kube-apiserver
ln -sfn "$helm" .cache/bin/helm
ln -sfn "$golangci" .cache/bin/golangci-lint

took "set-up (packages, tool builds)"
export FLANNEL_STRICT=1
go vet ./...
.cache/bin/golangci-lint run ./...
took "vet and lint"
go test -race -count=1 -timeout 45m ./...
took "go test"
# Each fuzz target also fuzzes briefly (the run above tried only its seed
# corpus): new inputs each run. A crasher fails the command and is kept in
# the package's testdata/fuzz for the next run to replay. A fuzzing run that
# fails without a crasher (the replay of the corpus passes: a fuzz worker
# killed or hung on a loaded machine) is tried once more before it counts.
fuzzlog=$(mktemp)
trap 'rm -f "$fuzzlog"' EXIT
fuzz() { go test -run '^$' -fuzz "^$1\$" -fuzztime "${FLANNEL_FUZZTIME:-5s}" "$2" >"$fuzzlog" 2>&1; }
grep -rl --include='*_test.go' '^func Fuzz' . | grep -v '^./tools/' | sort | while read -r f; do
	pkg="./$(dirname "${f#./}")"
	for fn in $(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' "$f"); do
		fuzz "$fn" "$pkg" && continue
		if go test -run "^$fn\$" "$pkg" >/dev/null 2>&1 && fuzz "$fn" "$pkg"; then
			echo "hack/test.sh: fuzzing $fn in $pkg failed once without a crasher and passed when run again" >&2
			continue
		fi
		echo "hack/test.sh: fuzzing $fn in $pkg failed:" >&2
		cat "$fuzzlog" >&2
		go test -run "^$fn\$" "$pkg" >&2
		exit 1
	done
done
took "fuzzing"
go run ./examples/cluster -nodes 3
go run ./examples/cluster -nodes 3 -ipv6
go run ./examples/cluster -nodes 3 -ipv6 -backend host-gw -store memory
go run ./examples/cluster -nodes 3 -store kube
# A real Kubernetes cluster (kubelets, containerd) with flannel applied from
# deploy/kube-flannel.yaml.
go run ./examples/cluster -kubelet -nodes 3
# The Kubernetes store at scale (figures: time vs the apiserver's list, peak RSS).
go run ./hack/kubebench -nodes 5000
# The vxlan benchmark command keeps working (figures, not a pass/fail bar).
go run ./hack/bench -scenario bulk -peers 1000 -runs 1
took "demos and benchmarks"
