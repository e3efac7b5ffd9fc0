// Package vmlab is test support shared by the dataplanes whose tests run
// in the qemu VM (ipsec, wireguard, ipip): the host-side boot wrapper, the
// guard for in-VM tests, the pod-pair reachability matrix, a frame tap on
// the lab's underlay and a UDP echo with DF set. Its helpers call
// t.Fatal; it is for tests only.
package vmlab

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/internal/cnilab"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/internal/vmtest"
)

// Boot is one run of a package's tests inside the VM.
type Boot struct {
	Run      string            // -test.run pattern inside the VM
	Modules  []string          // kernel modules loaded at boot
	Timeout  time.Duration     // the whole VM run
	Commands map[string]string // vmtest.Options.Commands
	Files    map[string]string // vmtest.Options.Files
	MemoryMB int               // vmtest.Options.MemoryMB (0: its default)
}

// RunVM boots the VM with the tests of the package in the current
// directory and fails t unless they all passed. On the VM itself it skips
// t; without root or the VM tools it skips (a failure in strict mode).
func RunVM(t *testing.T, b Boot) vmtest.Result {
	t.Helper()
	if vmtest.Inside() {
		t.Skip("already inside the VM")
	}
	testenv.RequireRoot(t)
	tools, err := vmtest.Find()
	testenv.Require(t, err == nil, fmt.Sprint(err))
	accel, err := vmtest.AccelFromEnv()
	require.NoError(t, err)
	res, err := vmtest.Run(t.Context(), tools, vmtest.Options{
		Accel:    accel,
		Package:  ".",
		Run:      b.Run,
		Modules:  b.Modules,
		Timeout:  b.Timeout,
		Out:      t.Output(),
		Verbose:  true,
		Commands: b.Commands,
		Files:    b.Files,
		MemoryMB: b.MemoryMB,
	})
	t.Logf("VM: accelerator %s (%s), boot %v, total %v", res.Accel, res.AccelReason, res.Boot.Round(time.Millisecond), res.Total.Round(time.Millisecond))
	require.NoError(t, err)
	if !res.Passed {
		t.Fatal("tests inside the VM failed (output above)")
	}
	return res
}

// InVM skips t unless it runs inside the VM.
func InVM(t *testing.T) {
	t.Helper()
	if !vmtest.Inside() {
		t.Skip("runs inside the VM (TestVM)")
	}
}

// CNIPlugins maps the reference CNI plugins to /opt/cni/bin in the VM
// (Boot.Files), for runs of examples/cluster there.
func CNIPlugins(t *testing.T) map[string]string {
	t.Helper()
	plugins := map[string]string{}
	dir := cnilab.PluginDir(t)
	for _, p := range cnilab.ReferencePlugins() {
		plugins["opt/cni/bin/"+p] = filepath.Join(dir, p)
	}
	return plugins
}

// Ctx is a context that ends after d or with t.
func Ctx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// CheckPairs pings and TCP-checks every ordered pair of pods, on each of
// the target's addresses (IPv4, IPv6) that is set; nil pods (nodes that
// are gone) are left out. Each check may take up to timeout.
func CheckPairs(t *testing.T, pods []*netlab.Pod, timeout time.Duration) {
	t.Helper()
	for i, a := range pods {
		for j, b := range pods {
			if i == j || a == nil || b == nil {
				continue
			}
			for _, ip := range []netip.Addr{b.IP, b.IPv6} {
				if !ip.IsValid() {
					continue
				}
				require.NoError(t, a.Ping(Ctx(t, timeout), ip), "ping %d->%d %s", i, j, ip)
				require.NoError(t, a.TCPCheck(Ctx(t, timeout), b, ip), "tcp %d->%d %s", i, j, ip)
			}
		}
	}
}
