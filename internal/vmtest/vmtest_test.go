package vmtest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/internal/testenv"
)

func TestCpioNewc(t *testing.T) {
	var b bytes.Buffer
	w := newCpio(&b)
	w.dir("bin")
	w.file("init", []byte("#!/bin/sh\n"), 0o755)
	w.symlink("sbin/modprobe", "/bin/busybox")
	require.NoError(t, w.close())
	out := b.String()
	assert.True(t, strings.HasPrefix(out, "070701"))
	assert.Zero(t, b.Len()%4, "entries are 4-byte aligned")
	for _, s := range []string{"bin\x00", "init\x00", "#!/bin/sh\n", "sbin/modprobe\x00", "/bin/busybox", "TRAILER!!!\x00"} {
		assert.Contains(t, out, s)
	}
}

func TestModuleClosure(t *testing.T) {
	tools, err := Find()
	testenv.Require(t, err == nil, fmt.Sprintf("a VM kernel (hack/test.sh installs linux-image-cloud-amd64): %v", err))
	mods, err := moduleClosure(tools.Version, []string{"esp4", "ghash-generic"})
	require.NoError(t, err)
	joined := strings.Join(mods, " ")
	for _, m := range []string{"esp4.ko", "xfrm_algo.ko", "ghash-generic.ko", "gf128mul.ko"} {
		assert.Contains(t, joined, m)
	}
	_, err = moduleClosure(tools.Version, []string{"no_such_module"})
	assert.ErrorContains(t, err, "no module no_such_module")
}

func TestAccelFromEnv(t *testing.T) {
	for _, tc := range []struct {
		name, val, want, err string
	}{
		{name: "unset", val: "", want: ""},
		{name: "tcg", val: "tcg", want: AccelTCG},
		{name: "kvm", val: " kvm ", want: AccelKVM},
		{name: "bad", val: "hvf", err: `FLANNEL_VM_ACCEL="hvf": want "tcg" or "kvm"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(AccelEnv, tc.val)
			got, err := AccelFromEnv()
			if tc.err != "" {
				assert.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestChooseAccelWithoutProbe(t *testing.T) {
	tools := Tools{KVMDevice: filepath.Join(t.TempDir(), "no-kvm"), CacheDir: t.TempDir(), Qemu: "/nonexistent/qemu"}
	c, err := ChooseAccel(t.Context(), tools, "")
	require.NoError(t, err)
	assert.Equal(t, AccelTCG, c.Accel)
	assert.Contains(t, c.Reason, "no-kvm does not open read-write")

	for _, force := range []string{AccelKVM, AccelTCG} {
		c, err := ChooseAccel(t.Context(), tools, force)
		require.NoError(t, err)
		assert.Equal(t, Choice{force, "forced by FLANNEL_VM_ACCEL=" + force}, c)
	}
	_, err = ChooseAccel(t.Context(), tools, "xen")
	assert.ErrorContains(t, err, `accelerator "xen"`)

	// A cached result is used, and says so; a garbled cache is ignored.
	tools.KVMDevice = openableFile(t)
	writeChoice(tools.cacheFile(), Choice{AccelKVM, "probe said so"})
	c, err = ChooseAccel(t.Context(), tools, "")
	require.NoError(t, err)
	assert.Equal(t, AccelKVM, c.Accel)
	assert.Contains(t, c.Reason, "probe said so (probe result cached in ")
	require.NoError(t, os.WriteFile(tools.cacheFile(), []byte(`{"accel":"vmware"}`), 0o644))
	_, ok := readChoice(tools.cacheFile())
	assert.False(t, ok)
}

// openableFile is a plain file that opens read-write, standing in for a
// /dev/kvm that opens but cannot run a VM.
func openableFile(t *testing.T) string {
	p := filepath.Join(t.TempDir(), "kvm")
	require.NoError(t, os.WriteFile(p, nil, 0o600))
	return p
}

// standInQemu is a qemu that dies as qemu does on a host whose kvm
// initialises but cannot set an MSR (nested virtualisation) whenever it is
// given "-accel kvm", and runs the real qemu otherwise.
func standInQemu(t *testing.T, real string) string {
	p := filepath.Join(t.TempDir(), "qemu-system-x86_64")
	script := `#!/bin/sh
prev=
for a in "$@"; do
	if [ "$prev" = "-accel" ] && [ "$a" = "kvm" ]; then
		echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69" >&2
		echo "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion failed." >&2
		kill -ABRT $$
	fi
	prev=$a
done
exec ` + shellQuote(real) + ` "$@"
`
	require.NoError(t, os.WriteFile(p, []byte(script), 0o755))
	return p
}

// standInTools are the real VM tools with the aborting stand-in qemu, a
// /dev/kvm that opens, and a cache of the test's own.
func standInTools(t *testing.T) Tools {
	t.Helper()
	if Inside() {
		t.Skip("outer test: runs on the host and boots the VM")
	}
	tools := vmTools(t)
	tools.Qemu = standInQemu(t, tools.Qemu)
	tools.KVMDevice = openableFile(t)
	tools.CacheDir = t.TempDir()
	return tools
}

func vmTools(t *testing.T) Tools {
	t.Helper()
	testenv.RequireRoot(t)
	tools, err := Find()
	testenv.Require(t, err == nil, fmt.Sprint(err))
	return tools
}

// TestStandInQemuKVMAborts: /dev/kvm opens, kvm aborts. The probe finds
// out, the run goes to TCG, the in-VM test passes, and the next choice on
// this machine comes from the cache without another probe.
func TestStandInQemuKVMAborts(t *testing.T) {
	tools := standInTools(t)
	var out bytes.Buffer
	res, err := Run(t.Context(), tools, Options{Package: ".", Run: "^TestInVMHarness$", Modules: []string{"veth"}, Timeout: 5 * time.Minute, Out: &out, Verbose: true})
	t.Logf("VM output:\n%s", out.String())
	require.NoError(t, err)
	assert.True(t, res.Passed)
	assert.Contains(t, res.Output, "--- PASS: TestInVMHarness")
	assert.Equal(t, AccelTCG, res.Accel)
	assert.Contains(t, res.AccelReason, "opens but a probe boot under kvm failed: qemu: signal: aborted")
	assert.Contains(t, res.AccelReason, "failed to set MSR 0x10a")
	assert.Contains(t, out.String(), "vmtest: accelerator tcg: "+tools.KVMDevice+" opens but a probe boot under kvm failed")

	c, err := ChooseAccel(t.Context(), tools, "")
	require.NoError(t, err)
	assert.Equal(t, AccelTCG, c.Accel)
	assert.Contains(t, c.Reason, "probe result cached in "+tools.CacheDir)
}

// TestStandInQemuKVMAbortsAfterProbe: kvm was judged good (a cached probe)
// but this run's kvm dies: the same run goes again under TCG and passes,
// and the cache now says TCG. Forcing kvm gets no second chance and a
// clear error.
func TestStandInQemuKVMAbortsAfterProbe(t *testing.T) {
	tools := standInTools(t)
	writeChoice(tools.cacheFile(), Choice{AccelKVM, "seeded by the test"})
	var out bytes.Buffer
	opts := Options{Package: ".", Run: "^TestInVMHarness$", Modules: []string{"veth"}, Timeout: 5 * time.Minute, Out: &out}
	res, err := Run(t.Context(), tools, opts)
	t.Logf("VM output:\n%s", out.String())
	require.NoError(t, err)
	assert.True(t, res.Passed)
	assert.Equal(t, AccelTCG, res.Accel)
	assert.Contains(t, res.AccelReason, "a run under kvm ended without the tests' exit status (signal: aborted); ran again under tcg")
	c, ok := readChoice(tools.cacheFile())
	require.True(t, ok)
	assert.Equal(t, AccelTCG, c.Accel)

	opts.Accel = AccelKVM
	_, err = Run(t.Context(), tools, opts)
	assert.ErrorContains(t, err, "VM ended without the test's exit status (qemu: signal: aborted) (accelerator forced by FLANNEL_VM_ACCEL=kvm)")
}

// TestInVMHarness runs inside the VM of the stand-in tests.
func TestInVMHarness(t *testing.T) {
	if !Inside() {
		t.Skip("runs inside the VM (TestStandInQemu*)")
	}
	mods, err := os.ReadFile("/proc/modules")
	require.NoError(t, err)
	assert.Contains(t, string(mods), "veth ", "the requested module is loaded")
	assert.True(t, testenv.Strict(), "strict mode inside the VM")
}
