package netlab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/nlsafe"
)

// netnsDir is where iproute2 (and netns.NewNamed) keep named namespaces.
const netnsDir = "/run/netns"

// newNamedNS creates the named network namespace name (visible to
// `ip netns exec name ...`) and returns a handle to it, without moving the
// caller's thread (nlsafe.NewNamedNamespace).
func newNamedNS(name string) (netns.NsHandle, error) {
	h, err := nlsafe.NewNamedNamespace(name)
	if err != nil {
		// NewNamed may leave the placeholder file behind when the bind
		// mount fails; never leave a dangling name.
		if !errors.Is(err, os.ErrExist) {
			_ = os.Remove(filepath.Join(netnsDir, name))
		}
		return netns.None(), err
	}
	return h, nil
}

// deleteNamedNS removes the named namespace; a missing name is success.
// The kernel destroys the namespace (and every interface in it) once the last
// reference (bind mount, open fd, socket) is gone.
func deleteNamedNS(name string) error {
	if err := netns.DeleteNamed(name); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		path := filepath.Join(netnsDir, name)
		if _, serr := os.Stat(path); errors.Is(serr, os.ErrNotExist) {
			return nil
		}
		// EINVAL: not mounted (any more). Someone else's delete (another
		// test binary's Sweep) is between its unmount and its unlink, or
		// an earlier one died there: the file holds no namespace.
		if errors.Is(err, unix.EINVAL) {
			if rerr := os.Remove(path); rerr == nil || errors.Is(rerr, os.ErrNotExist) {
				return nil
			}
		}
		return fmt.Errorf("delete namespace %s: %w", name, err)
	}
	return nil
}

// inNS runs fn on a fresh goroutine whose OS thread is locked and switched
// into ns, and waits for it. If switching back fails the thread stays locked
// and dies with the goroutine, so no other goroutine ever runs in ns by
// accident. A panic in fn is re-raised in the caller.
func inNS(ns netns.NsHandle, fn func() error) error {
	var (
		err      error
		panicked bool
		pval     any
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		orig, gerr := netns.Get()
		if gerr != nil {
			runtime.UnlockOSThread()
			err = fmt.Errorf("get current namespace: %w", gerr)
			return
		}
		defer orig.Close()
		if serr := netns.Set(ns); serr != nil {
			if rerr := netns.Set(orig); rerr == nil {
				runtime.UnlockOSThread()
			}
			err = fmt.Errorf("enter namespace %s: %w", ns, serr)
			return
		}
		func() {
			defer func() {
				if r := recover(); r != nil {
					panicked, pval = true, r
				}
			}()
			err = fn()
		}()
		if rerr := netns.Set(orig); rerr != nil {
			err = errors.Join(err, fmt.Errorf("leave namespace %s: %w", ns, rerr))
			return // thread stays locked and is discarded
		}
		runtime.UnlockOSThread()
	}()
	<-done
	if panicked {
		panic(pval)
	}
	return err
}

// sysctl is one /proc/sys/net setting, path relative to /proc/sys with
// slashes, e.g. "net/ipv4/ip_forward".
type sysctl struct {
	path, value string
	// optional settings are skipped when the kernel lacks them (IPv6
	// disabled at boot); whatever needs them fails later with a clearer
	// error.
	optional bool
}

// setSysctls writes the settings inside ns. /proc/sys/net resolves against
// the network namespace of the writing thread, hence inNS.
func setSysctls(ns netns.NsHandle, settings []sysctl) error {
	return inNS(ns, func() error {
		for _, s := range settings {
			p := filepath.Join("/proc/sys", s.path)
			if err := writeFile(p, s.value); err != nil {
				if s.optional && errors.Is(err, os.ErrNotExist) {
					continue
				}
				return fmt.Errorf("set sysctl %s=%s: %w", strings.ReplaceAll(s.path, "/", "."), s.value, err)
			}
		}
		return nil
	})
}

// writeFile writes an existing file without creating it (procfs).
func writeFile(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(value); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
