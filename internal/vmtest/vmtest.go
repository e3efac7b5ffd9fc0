// Package vmtest runs a package's tests inside a small qemu VM booting
// Debian's stock kernel, for what the host kernel lacks (ESP/XFRM crypto).
// It builds the package's test binary statically, packs an initramfs with
// busybox, the requested kernel modules (with a modules.dep made by
// depmod -b) and the binary, boots it (kvm when it works, else TCG
// software emulation, chosen from a probe boot: see ChooseAccel), streams
// the console output and reports whether the inner tests passed.
//
// The init script sets InsideEnv=1 for the test binary; inner tests call
// Inside to run only there, outer tests skip there. Prerequisites (Debian
// packages qemu-system-x86, linux-image-cloud-amd64, busybox-static, kmod)
// are looked up by Find; hack/test.sh installs them.
package vmtest

import (
	"bufio"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"
)

// InsideEnv is the environment variable the VM's init sets to "1".
const InsideEnv = "FLANNEL_VMTEST"

// Inside reports whether the test binary runs inside the VM.
func Inside() bool { return os.Getenv(InsideEnv) == "1" }

// Tools are the host files the harness needs.
type Tools struct {
	Qemu    string // qemu-system-x86_64
	Kernel  string // /boot/vmlinuz-<version>
	Version string // kernel version, the /lib/modules/<version> directory
	Busybox string // static busybox
	Depmod  string
	Go      string
	// KVMDevice is the kvm device node (default /dev/kvm).
	KVMDevice string
	// CacheDir keeps the accelerator probe's result per machine boot
	// (default: a directory under os.TempDir).
	CacheDir string
}

// Find locates the tools; the error says what is missing and which Debian
// package provides it.
func Find() (Tools, error) {
	var t Tools
	var missing []string
	var err error
	if t.Qemu, err = exec.LookPath("qemu-system-x86_64"); err != nil {
		missing = append(missing, "qemu-system-x86_64 (Debian package qemu-system-x86)")
	}
	kernels, _ := filepath.Glob("/boot/vmlinuz-*")
	sort.Sort(sort.Reverse(sort.StringSlice(kernels)))
	for _, k := range kernels {
		v := strings.TrimPrefix(filepath.Base(k), "vmlinuz-")
		if _, err := os.Stat(filepath.Join("/lib/modules", v, "modules.dep")); err == nil {
			if t.Kernel == "" || strings.Contains(v, "cloud") && !strings.Contains(t.Version, "cloud") {
				t.Kernel, t.Version = k, v
			}
		}
	}
	if t.Kernel == "" {
		missing = append(missing, "a kernel in /boot with its modules (Debian package linux-image-cloud-amd64)")
	}
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		if isStatic(p) {
			t.Busybox = p
			break
		}
	}
	if t.Busybox == "" {
		missing = append(missing, "a static busybox (Debian package busybox-static)")
	}
	for _, p := range []string{"/usr/sbin/depmod", "/sbin/depmod"} {
		if fileExists(p) {
			t.Depmod = p
			break
		}
	}
	if t.Depmod == "" {
		missing = append(missing, "depmod (Debian package kmod)")
	}
	if t.Go, err = exec.LookPath("go"); err != nil {
		missing = append(missing, "the go command")
	}
	if len(missing) > 0 {
		return t, fmt.Errorf("vmtest: missing %s", strings.Join(missing, ", "))
	}
	return t, nil
}

// isStatic reports whether p is an ELF executable without an interpreter.
func isStatic(p string) bool {
	f, err := elf.Open(p)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

// Options describe one VM run.
type Options struct {
	// Package is the directory of the package whose tests run inside
	// (required), e.g. "." from that package's own test.
	Package string
	// Run is the -test.run pattern inside the VM (required).
	Run string
	// Modules are kernel modules to pack and load at boot, by name
	// ("esp4", "veth"); their dependencies are added.
	Modules []string
	// Timeout bounds the whole run after the build (default 10m). The
	// inner tests get it minus a margin as -test.timeout.
	Timeout time.Duration
	// MemoryMB is the VM's memory (default 1024).
	MemoryMB int
	// CPUs is the VM's CPU count (default 2).
	CPUs int
	// Out receives the VM's console output as it comes. Optional.
	Out io.Writer
	// Verbose passes -test.v to the inner tests.
	Verbose bool
	// Commands are extra programs built statically and packed at
	// /bin/<name>, by name to package directory (e.g. "cluster":
	// "../examples/cluster"), for inner tests to run. Optional.
	Commands map[string]string
	// Files are extra host files packed into the initramfs, by archive
	// path (e.g. "opt/cni/bin/bridge") to host path, as executables.
	// Optional.
	Files map[string]string
	// Accel forces an accelerator (AccelKVM, AccelTCG); empty chooses one
	// with ChooseAccel and, when a kvm run dies before the tests report
	// their status, runs again under TCG.
	Accel string
}

// Result is what a run produced.
type Result struct {
	// Output is the whole console output.
	Output string
	// Passed is true when the inner test binary exited 0.
	Passed bool
	// Boot is the time from starting qemu to the init script's first line.
	Boot time.Duration
	// Total is the time qemu ran.
	Total time.Duration
	// Accel is the accelerator the reported run used, and AccelReason the
	// evidence it was chosen on (also written to Options.Out).
	Accel       string
	AccelReason string
}

const exitMarker = "VMTEST-EXIT:"

// Run builds, packs, boots and waits. It returns an error when something
// around the tests failed (build, boot, timeout); a failing inner test is
// Result.Passed == false with a nil error.
func Run(ctx context.Context, tools Tools, opts Options) (Result, error) {
	if opts.Timeout <= 0 {
		opts.Timeout = 10 * time.Minute
	}
	if opts.MemoryMB <= 0 {
		opts.MemoryMB = 1024
	}
	if opts.CPUs <= 0 {
		opts.CPUs = 2
	}
	dir, err := os.MkdirTemp("", "vmtest-")
	if err != nil {
		return Result{}, fmt.Errorf("vmtest: %w", err)
	}
	defer os.RemoveAll(dir)

	bin := filepath.Join(dir, "test.bin")
	build := exec.CommandContext(ctx, tools.Go, "test", "-c", "-o", bin, ".")
	build.Dir = opts.Package
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return Result{}, fmt.Errorf("vmtest: build test binary of %s: %w\n%s", opts.Package, err, out)
	}
	cmds := map[string]string{}
	for name, pkg := range opts.Commands {
		out := filepath.Join(dir, "cmd-"+name)
		build := exec.CommandContext(ctx, tools.Go, "build", "-o", out, ".")
		build.Dir = pkg
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := build.CombinedOutput(); err != nil {
			return Result{}, fmt.Errorf("vmtest: build command %s from %s: %w\n%s", name, pkg, err, b)
		}
		cmds["bin/"+name] = out
	}
	initrd := filepath.Join(dir, "initrd.cpio")
	if err := pack(tools, opts, bin, cmds, filepath.Join(dir, "stage"), initrd); err != nil {
		return Result{}, err
	}
	choice, err := ChooseAccel(ctx, tools, opts.Accel)
	if err != nil {
		return Result{}, err
	}
	logf(opts, "vmtest: accelerator %s: %s", choice.Accel, choice.Reason)
	res, err := boot(ctx, tools, opts, initrd, choice.Accel)
	res.Accel, res.AccelReason = choice.Accel, choice.Reason
	var died *diedError
	if opts.Accel == "" && choice.Accel == AccelKVM && errors.As(err, &died) {
		// The probe passed but this run's kvm died (an abort after a
		// failed MSR write, say): TCG from now on, for this machine boot.
		c := Choice{AccelTCG, fmt.Sprintf("a run under kvm ended without the tests' exit status (%v); ran again under tcg", died.qemu)}
		writeChoice(tools.cacheFile(), Choice{AccelTCG, "an earlier run under kvm ended without the tests' exit status"})
		logf(opts, "vmtest: accelerator %s: %s", c.Accel, c.Reason)
		res, err = boot(ctx, tools, opts, initrd, AccelTCG)
		res.Accel, res.AccelReason = c.Accel, c.Reason
	}
	if err != nil && opts.Accel != "" {
		err = fmt.Errorf("%w (accelerator forced by %s=%s)", err, AccelEnv, opts.Accel)
	}
	return res, err
}

func logf(opts Options, format string, args ...any) {
	if opts.Out != nil {
		fmt.Fprintf(opts.Out, format+"\n", args...)
	}
}

// diedError is a VM that ended before the timeout without printing the
// tests' exit status: qemu crashed or the guest died.
type diedError struct{ qemu error }

func (e *diedError) Error() string {
	return fmt.Sprintf("vmtest: VM ended without the test's exit status (qemu: %v)", e.qemu)
}

func boot(ctx context.Context, tools Tools, opts Options, initrd, accel string) (Result, error) {
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	args := append(qemuArgs(tools, initrd, opts.MemoryMB, opts.CPUs), accelArgs(accel)...)
	cmd := exec.CommandContext(ctx, tools.Qemu, args...)
	cmd.WaitDelay = 5 * time.Second
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return Result{}, fmt.Errorf("vmtest: %w", err)
	}
	cmd.Stderr = cmd.Stdout
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return Result{}, fmt.Errorf("vmtest: start qemu: %w", err)
	}
	var (
		res  Result
		buf  strings.Builder
		wg   sync.WaitGroup
		once sync.Once
	)
	wg.Go(func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		for sc.Scan() {
			line := strings.TrimRight(sc.Text(), "\r")
			if strings.HasPrefix(line, "VMTEST-BOOTED") {
				once.Do(func() { res.Boot = time.Since(start) })
			}
			buf.WriteString(line)
			buf.WriteByte('\n')
			if opts.Out != nil {
				fmt.Fprintln(opts.Out, line)
			}
		}
	})
	wg.Wait()
	werr := cmd.Wait()
	res.Total = time.Since(start)
	res.Output = buf.String()
	code := ""
	for _, line := range strings.Split(res.Output, "\n") {
		if rest, ok := strings.CutPrefix(line, exitMarker); ok {
			code = strings.TrimSpace(rest)
		}
	}
	if code == "" {
		if ctx.Err() != nil {
			return res, fmt.Errorf("vmtest: VM timed out after %v", opts.Timeout)
		}
		return res, &diedError{werr}
	}
	res.Passed = code == "0"
	return res, nil
}
