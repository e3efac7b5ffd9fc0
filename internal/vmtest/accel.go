package vmtest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Accelerators qemu can run the VM with.
const (
	AccelKVM = "kvm" // hardware virtualisation through /dev/kvm
	AccelTCG = "tcg" // software emulation: slower, works everywhere
)

// AccelEnv is the environment variable that forces an accelerator
// ("kvm" or "tcg"); tests read it with AccelFromEnv and pass it as
// Options.Accel.
const AccelEnv = "FLANNEL_VM_ACCEL"

// AccelFromEnv returns the accelerator forced by FLANNEL_VM_ACCEL, or ""
// (choose from evidence), or an error naming the variable and the bad value.
func AccelFromEnv() (string, error) {
	v := strings.TrimSpace(os.Getenv(AccelEnv))
	switch v {
	case "", AccelKVM, AccelTCG:
		return v, nil
	}
	return "", fmt.Errorf("vmtest: %s=%q: want %q or %q (or unset to choose from a probe boot)", AccelEnv, v, AccelTCG, AccelKVM)
}

// Choice is the accelerator a run uses and why.
type Choice struct {
	Accel  string `json:"accel"`
	Reason string `json:"reason"`
}

// probeTimeout bounds the kvm probe boot. A working kvm boots the cloud
// kernel into a tiny initramfs in about a second and TCG in about five; a
// kvm that has not booted after this long is broken (seen: nested
// virtualisation where qemu spins in the kernel forever), and choosing TCG
// by mistake only costs speed.
const probeTimeout = 20 * time.Second

const probeMarker = "VMTEST-PROBE-OK"

// ChooseAccel decides which accelerator to run with. force ("kvm", "tcg")
// wins. Otherwise the device node alone is never trusted: when
// tools.KVMDevice opens read-write, a short probe boot under kvm alone
// (no fallback accelerator) must reach its init and power off; its result is
// cached per machine boot in tools.CacheDir, so later runs on the same
// machine do not pay for it. Any failure of the probe means TCG, with the
// evidence in the reason. The error is only for a bad force value or a
// probe that could not be set up at all.
func ChooseAccel(ctx context.Context, tools Tools, force string) (Choice, error) {
	switch force {
	case AccelKVM, AccelTCG:
		return Choice{force, fmt.Sprintf("forced by %s=%s", AccelEnv, force)}, nil
	case "":
	default:
		return Choice{}, fmt.Errorf("vmtest: accelerator %q: want %q or %q", force, AccelTCG, AccelKVM)
	}
	dev := tools.kvmDevice()
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return Choice{AccelTCG, fmt.Sprintf("%s does not open read-write (%v)", dev, err)}, nil
	}
	f.Close()
	cache := tools.cacheFile()
	if c, ok := readChoice(cache); ok {
		c.Reason = fmt.Sprintf("%s (probe result cached in %s)", c.Reason, cache)
		return c, nil
	}
	c, err := probe(ctx, tools)
	if err != nil {
		return Choice{}, err
	}
	writeChoice(cache, c)
	return c, nil
}

// probe boots the kernel into an initramfs holding only busybox and an
// init that prints a marker and powers off, under kvm alone.
func probe(ctx context.Context, tools Tools) (Choice, error) {
	dir, err := os.MkdirTemp("", "vmtest-probe-")
	if err != nil {
		return Choice{}, fmt.Errorf("vmtest: probe: %w", err)
	}
	defer os.RemoveAll(dir)
	initrd := filepath.Join(dir, "probe.cpio")
	if err := writeProbeInitrd(tools, initrd); err != nil {
		return Choice{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	args := append(qemuArgs(tools, initrd, 256, 2), accelArgs(AccelKVM)...)
	cmd := exec.CommandContext(ctx, tools.Qemu, args...)
	cmd.WaitDelay = 2 * time.Second
	start := time.Now()
	out, err := cmd.CombinedOutput()
	took := time.Since(start).Round(10 * time.Millisecond)
	if strings.Contains(string(out), probeMarker) {
		return Choice{AccelKVM, fmt.Sprintf("%s opens and a probe boot under kvm finished in %v", tools.kvmDevice(), took)}, nil
	}
	why := fmt.Sprintf("qemu: %v", err)
	if ctx.Err() != nil {
		why = fmt.Sprintf("it did not finish in %v and was killed", probeTimeout)
	}
	return Choice{AccelTCG, fmt.Sprintf("%s opens but a probe boot under kvm failed: %s; last output: %s",
		tools.kvmDevice(), why, lastLines(string(out), 3))}, nil
}

func writeProbeInitrd(tools Tools, out string) error {
	f, err := os.Create(out)
	if err != nil {
		return fmt.Errorf("vmtest: probe: %w", err)
	}
	w := newCpio(f)
	w.dir("bin")
	if err := w.fileFrom("bin/busybox", tools.Busybox, 0o755); err != nil {
		f.Close()
		return fmt.Errorf("vmtest: probe: %w", err)
	}
	w.file("init", []byte("#!/bin/busybox sh\n/bin/busybox echo "+probeMarker+"\n/bin/busybox poweroff -f\n"), 0o755)
	if err := errors.Join(w.close(), f.Close()); err != nil {
		return fmt.Errorf("vmtest: probe: write initramfs: %w", err)
	}
	return nil
}

// cacheFile names the cached choice for this machine boot, this qemu, this
// kernel and this device node: a new boot (another machine, a changed
// host) or another device probes again.
func (t Tools) cacheFile() string {
	id, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00%s\x00%s\x00", strings.TrimSpace(string(id)), t.Qemu, t.Kernel, t.kvmDevice())
	if st, err := os.Stat(t.Qemu); err == nil {
		fmt.Fprintf(h, "%d\x00%d\x00", st.Size(), st.ModTime().UnixNano())
	}
	// The device itself, so that another node behind the same path (a
	// plain file bound over it, a re-created device) is probed again.
	var st syscall.Stat_t
	if syscall.Stat(t.kvmDevice(), &st) == nil {
		fmt.Fprintf(h, "%d\x00%d\x00%d", st.Rdev, st.Ino, st.Mode)
	}
	dir := t.CacheDir
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "flannelkit-vmtest")
	}
	return filepath.Join(dir, "accel-"+hex.EncodeToString(h.Sum(nil))[:16]+".json")
}

func readChoice(path string) (Choice, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Choice{}, false
	}
	var c Choice
	if json.Unmarshal(b, &c) != nil || (c.Accel != AccelKVM && c.Accel != AccelTCG) {
		return Choice{}, false
	}
	return c, true
}

// writeChoice caches c; a failure only means the next run probes again.
func writeChoice(path string, c Choice) {
	b, err := json.Marshal(c)
	if err != nil || os.MkdirAll(filepath.Dir(path), 0o755) != nil {
		return
	}
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	if os.WriteFile(tmp, b, 0o644) == nil && os.Rename(tmp, path) != nil {
		os.Remove(tmp)
	}
}

func (t Tools) kvmDevice() string {
	if t.KVMDevice != "" {
		return t.KVMDevice
	}
	return "/dev/kvm"
}

// accelArgs are qemu's flags for one accelerator, never a fallback list:
// qemu falls back to the next -accel only when initialisation fails, not
// when kvm aborts later (failed MSR writes under nested virtualisation), so
// a list hides which one ran.
func accelArgs(accel string) []string {
	return []string{"-accel", accel, "-cpu", "max"}
}

func qemuArgs(tools Tools, initrd string, memMB, cpus int) []string {
	return []string{
		"-kernel", tools.Kernel, "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init",
		"-m", fmt.Sprint(memMB), "-smp", fmt.Sprint(cpus),
		"-display", "none", "-serial", "stdio", "-monitor", "none",
		"-no-reboot", "-nodefaults",
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(strings.ReplaceAll(s, "\r", "")), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	out := strings.Join(lines, " | ")
	if out == "" {
		return "(none)"
	}
	return out
}
