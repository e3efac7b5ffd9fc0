package extension_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/goleak"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/extension"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

// TestCommandsInNodeNamespace runs all four commands on a netlab node and
// checks each ran in the node's namespace with upstream's environment and
// stdin: PreStartupCommand's output is the published data, the post
// command adds an address on the node's lo, add and remove program routes
// there (and not in the test's own namespace), a script sees the peer's
// data on stdin.
func TestCommandsInNodeNamespace(t *testing.T) {
	testenv.RequireRoot(t)
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	n := lab.Nodes[0]
	dir := t.TempDir()
	var logs testenv.LogBuffer
	pre := script(t, dir, "pre.sh", `echo "warning on stderr" >&2; echo "  id $(readlink /proc/self/ns/net)  "`)
	add := script(t, dir, "add.sh", `ip route replace "$SUBNET" via "$PUBLIC_IP" dev eth0 || exit 1
data=$(cat)
printf '%s %s %s [%s] %s\n' "$(readlink /proc/self/ns/net)" "$SUBNET" "$PUBLIC_IP" "$IPV6SUBNET" "$data" >> `+dir+`/added`)
	b := extension.New(extension.Options{Commands: extension.Commands{
		PreStartup:   pre,
		PostStartup:  "ip address add ${SUBNET} dev lo label lo:$PUBLIC_IP",
		SubnetAdd:    add + " $SUBNET",
		SubnetRemove: "ip route del $SUBNET via $PUBLIC_IP dev eth0",
	}})
	attrs, nw := start(t, b, env(t, n, config(t), &logs), "10.244.7.0/24")
	inode := nsInode(t, int(n.NS))
	var data string
	require.NoError(t, json.Unmarshal(attrs.BackendData, &data))
	assert.Equal(t, "id "+inode, data, "trimmed stdout, stderr left out")
	assert.Equal(t, "extension", attrs.BackendType)
	assert.Equal(t, n.IP, attrs.PublicIP)
	assert.True(t, logs.HasLine("command ran", "PreStartupCommand", "warning on stderr"), logs.String())

	addrs, err := nlsafe.Wrap(n.Handle).AddrList(nil, netlink.FAMILY_V4)
	require.NoError(t, err)
	var found bool
	for _, a := range addrs {
		found = found || (a.IPNet.String() == "10.244.7.0/24" && a.Label == "lo:"+n.IP.String())
	}
	assert.True(t, found, "post command added the own subnet on lo: %v", addrs)

	p1, p2 := peerLease(1, "vtep-one"), peerLease(2, "")
	require.NoError(t, nw.Apply(context.Background(), []lease.Lease{nw.Lease(), p1, p2}))
	assert.Equal(t, want(p1, p2), routes(t, n.Handle))
	host, err := netlink.NewHandleAt(netns.None())
	require.NoError(t, err)
	defer host.Close()
	assert.Empty(t, routes(t, host), "nothing in the test's namespace")
	assert.ElementsMatch(t, []string{
		fmt.Sprintf("%s 10.244.1.0/24 172.30.0.101 [] vtep-one", inode),
		fmt.Sprintf("%s 10.244.2.0/24 172.30.0.102 [] ", inode), // no data: an empty line on stdin
	}, lines(t, filepath.Join(dir, "added")))

	require.NoError(t, nw.Apply(context.Background(), []lease.Lease{p2}))
	assert.Equal(t, want(p2), routes(t, n.Handle), "p1 removed")
	require.NoError(t, nw.Apply(context.Background(), []lease.Lease{p2}))
	assert.Len(t, lines(t, filepath.Join(dir, "added")), 2, "level-triggered: nothing run again")

	moved := p2
	moved.Attrs.PublicIP = moved.Attrs.PublicIP.Next()
	require.NoError(t, nw.Apply(context.Background(), []lease.Lease{moved}))
	assert.Equal(t, want(moved), routes(t, n.Handle), "a changed peer is removed and added again")
}

// TestRestartRemovesPeerGoneWhileDown stops a network with three peers
// added (recorded in the state file), starts a new backend on the same
// state directory and applies two: the remaining ones get no second add,
// and Cleanup drops the state file. (That the peer gone while down gets
// its remove, that nothing runs before the first Apply and that Cleanup
// removes everything, twice, are the contract suite's: TestContract.)
func TestRestartRemovesPeerGoneWhileDown(t *testing.T) {
	testenv.RequireRoot(t)
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	n := lab.Nodes[0]
	dir := t.TempDir()
	var logs testenv.LogBuffer
	add, del := hostgwCommands()
	mark := script(t, dir, "mark.sh", `echo "$1 $SUBNET" >> `+dir+`/log`)
	opts := extension.Options{StateDir: filepath.Join(dir, "state"), Commands: extension.Commands{
		SubnetAdd: add, SubnetRemove: del,
	}}
	p1, p2, p3 := peerLease(1, ""), peerLease(2, ""), peerLease(3, "")
	_, nw := start(t, extension.New(opts), env(t, n, config(t), &logs), "10.244.7.0/24")
	require.NoError(t, nw.Apply(context.Background(), []lease.Lease{p1, p2, p3}))
	require.Equal(t, want(p1, p2, p3), routes(t, n.Handle))
	raw, err := os.ReadFile(filepath.Join(dir, "state", extension.StateFile))
	require.NoError(t, err)
	assert.Contains(t, string(raw), `"subnet": "10.244.2.0/24"`)

	// The agent is down; p2 leaves. A new process starts (other commands
	// only to count what runs).
	opts.Commands = extension.Commands{SubnetAdd: mark + " add", SubnetRemove: del}
	_, nw2 := start(t, extension.New(opts), env(t, n, config(t), &logs), "10.244.7.0/24")
	require.NoError(t, nw2.Apply(context.Background(), []lease.Lease{p3, p1}))
	assert.Empty(t, lines(t, filepath.Join(dir, "log")), "no add run again for peers still there")

	// Cleanup runs remove for what is left and drops the state file.
	b3 := extension.New(opts)
	require.NoError(t, b3.Cleanup(context.Background(), env(t, n, config(t), &logs)))
	_, err = os.Stat(filepath.Join(dir, "state", extension.StateFile))
	assert.True(t, os.IsNotExist(err))
}

// TestFailureRetried makes the add command fail for one peer: its
// *flannel.PeerError carries the command's exit status and stderr, it is
// not retried before its backoff, then retried by Run until it succeeds.
// (That the PeerError names the peer and the others are added is the
// contract suite's: TestContract.)
func TestFailureRetried(t *testing.T) {
	testenv.RequireRoot(t)
	ignore := goleak.IgnoreCurrent()
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	n := lab.Nodes[0]
	dir := t.TempDir()
	var logs testenv.LogBuffer
	add := script(t, dir, "add.sh", `echo "$SUBNET" >> `+dir+`/attempts
if [ "$SUBNET" = 10.244.2.0/24 ] && [ ! -e `+dir+`/fixed ]; then echo "no route for you" >&2; exit 3; fi
ip route replace "$SUBNET" via "$PUBLIC_IP" dev eth0`)
	_, del := hostgwCommands()
	attempts := func() int {
		return strings.Count(strings.Join(lines(t, filepath.Join(dir, "attempts")), "\n"), "10.244.2.0/24")
	}
	p1, p2, p3 := peerLease(1, ""), peerLease(2, ""), peerLease(3, "")
	peers := []lease.Lease{p1, p2, p3}

	t.Run("not before the backoff", func(t *testing.T) {
		b := extension.New(extension.Options{RetryMin: time.Hour, Commands: extension.Commands{SubnetAdd: add, SubnetRemove: del}})
		_, nw := start(t, b, env(t, n, config(t), &logs), "10.244.7.0/24")
		err := nw.Apply(context.Background(), peers)
		var pe *flannel.PeerError
		require.True(t, errors.As(err, &pe), "%v", err)
		assert.ErrorContains(t, err, "exit status 3")
		assert.ErrorContains(t, err, "no route for you")
		assert.Equal(t, 1, attempts())
		err = nw.Apply(context.Background(), peers)
		assert.ErrorContains(t, err, "retry in")
		assert.True(t, errors.As(err, &pe))
		assert.Equal(t, 1, attempts(), "in backoff: not run again")
		require.NoError(t, b.Cleanup(context.Background(), env(t, n, config(t), &logs)))
		require.NoError(t, os.Remove(filepath.Join(dir, "attempts")))
	})

	t.Run("retried by Run", func(t *testing.T) {
		b := extension.New(extension.Options{RetryMin: 20 * time.Millisecond, RetryMax: 100 * time.Millisecond, RepairInterval: time.Hour,
			Commands: extension.Commands{SubnetAdd: add, SubnetRemove: del}})
		_, nw := start(t, b, env(t, n, config(t), &logs), "10.244.7.0/24")
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- nw.Run(ctx) }()
		require.Error(t, nw.Apply(context.Background(), peers))
		require.Eventually(t, func() bool { return attempts() >= 3 }, 30*time.Second, 10*time.Millisecond, "retried with backoff")
		require.NoError(t, os.WriteFile(filepath.Join(dir, "fixed"), nil, 0o644))
		require.Eventually(t, func() bool { return len(routes(t, n.Handle)) == 3 }, 30*time.Second, 10*time.Millisecond, "added once fixed")
		assert.Equal(t, want(p1, p2, p3), routes(t, n.Handle))
		assert.NoError(t, nw.Apply(context.Background(), peers))
		assert.True(t, logs.HasLine("peer command failed; retrying"))
		cancel()
		require.NoError(t, <-done)
		goleak.VerifyNone(t, ignore)
	})
}

// TestTimeout makes the add command hang for one peer (a script whose
// child sleeps): it is killed with its process group after the timeout
// and reported, while the other peers are added.
func TestTimeout(t *testing.T) {
	testenv.RequireRoot(t)
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	n := lab.Nodes[0]
	dir := t.TempDir()
	var logs testenv.LogBuffer
	add := script(t, dir, "add.sh", `if [ "$SUBNET" = 10.244.2.0/24 ]; then echo $$ > `+dir+`/pgid; sleep 600; fi
ip route replace "$SUBNET" via "$PUBLIC_IP" dev eth0`)
	b := extension.New(extension.Options{CommandTimeout: 300 * time.Millisecond, RetryMin: time.Hour, Commands: extension.Commands{SubnetAdd: add}})
	_, nw := start(t, b, env(t, n, config(t), &logs), "10.244.7.0/24")
	p1, p2, p3 := peerLease(1, ""), peerLease(2, ""), peerLease(3, "")
	err := nw.Apply(context.Background(), []lease.Lease{p1, p2, p3})
	var pe *flannel.PeerError
	require.True(t, errors.As(err, &pe), "%v", err)
	assert.Equal(t, p2, pe.Lease)
	assert.ErrorContains(t, err, "timed out after 300ms")
	assert.Equal(t, want(p1, p3), routes(t, n.Handle))
	assert.True(t, logs.HasLine("command failed", "SubnetAddCommand", "timed out"))
	// The script ran in a process group of its own, and all of it (the
	// sleep it started too) was killed.
	pgid := lines(t, filepath.Join(dir, "pgid"))
	require.Len(t, pgid, 1)
	pg, err := strconv.Atoi(pgid[0])
	require.NoError(t, err)
	require.Eventually(t, func() bool { return errors.Is(syscall.Kill(-pg, 0), syscall.ESRCH) }, 10*time.Second, 10*time.Millisecond, "process group %d gone", pg)
}

// TestPrepareNeedsNamespace: commands never run in an implicit namespace.
func TestPrepareNeedsNamespace(t *testing.T) {
	b := extension.New(extension.Options{Commands: extension.Commands{SubnetAdd: "true"}})
	_, err := b.Prepare(context.Background(), flannel.Env{})
	assert.ErrorContains(t, err, "no network namespace")
	_, err = b.Start(context.Background(), lease.Lease{})
	assert.ErrorContains(t, err, "Prepare was not called")
	_, err = extension.New(extension.Options{Commands: extension.Commands{PreStartup: "false"}}).Prepare(context.Background(), flannel.Env{NS: netns.None()})
	assert.Error(t, err)
}

// TestApplyStates replays random peer sets (peers also moving to another
// address) in random order and checks after each that the routes the
// commands made are exactly those of the set, and that only changed peers
// had commands run.
func TestApplyStates(t *testing.T) {
	testenv.RequireRoot(t)
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	n := lab.Nodes[0]
	dir := t.TempDir()
	var logs testenv.LogBuffer
	add, del := hostgwCommands()
	b := extension.New(extension.Options{StateDir: dir, Commands: extension.Commands{SubnetAdd: add, SubnetRemove: del}})
	_, nw := start(t, b, env(t, n, config(t), &logs), "10.244.200.0/24")
	rng := rand.New(rand.NewPCG(3, 4))
	for step := range 25 {
		var set []lease.Lease
		for k := 1; k <= 8; k++ {
			if rng.IntN(2) == 0 {
				continue
			}
			l := peerLease(k, "")
			if rng.IntN(4) == 0 {
				l.Attrs.PublicIP = l.Attrs.PublicIP.Next()
			}
			set = append(set, l)
		}
		rng.Shuffle(len(set), func(i, j int) { set[i], set[j] = set[j], set[i] })
		require.NoError(t, nw.Apply(context.Background(), set), "step %d", step)
		require.Equal(t, want(set...), routes(t, n.Handle), "step %d", step)
	}
}
