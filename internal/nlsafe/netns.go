package nlsafe

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"github.com/vishvananda/netns"
)

// InNamespace runs fn on a locked OS thread switched into ns, for what has
// no namespace-bound handle (sysctls, sockets opened in the namespace). It
// runs fn on a goroutine of its own and waits for it: if switching the
// thread back fails, that goroutine exits still locked, so the runtime
// destroys the thread instead of reusing it in the wrong namespace. The
// error joins fn's error with any failure to switch.
//
// When ns is the namespace the process already runs in, fn runs directly:
// setns needs CAP_SYS_ADMIN even into the current namespace, and an agent
// in a container with only NET_ADMIN (as the manifests run it) has not.
func InNamespace(ns netns.NsHandle, fn func() error) error {
	if !ns.IsOpen() {
		return errors.New("run in namespace: namespace handle is not open")
	}
	if IsCurrentNamespace(ns) {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("run in namespace: get current namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			// setns failed, so the thread is still where it was.
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("run in namespace %s: %w", ns, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// Leave the thread locked: it dies with this goroutine.
			errc <- errors.Join(ferr, fmt.Errorf("run in namespace %s: switch back: %w", ns, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// sysctlPath turns "net.ipv4.ip_forward", "net/ipv4/ip_forward" or
// "/proc/sys/net/ipv4/ip_forward" into the /proc/sys path. Dotted names
// cannot hold interface names with dots; use slashes for those.
func sysctlPath(name string) (string, error) {
	p := strings.TrimPrefix(name, "/proc/sys/")
	if !strings.Contains(p, "/") {
		p = strings.ReplaceAll(p, ".", "/")
	}
	p = filepath.Clean("/proc/sys/" + p)
	if !strings.HasPrefix(p, "/proc/sys/") {
		return "", fmt.Errorf("sysctl %q: not under /proc/sys", name)
	}
	return p, nil
}

// SetSysctl writes value to the sysctl path (e.g. "net/ipv4/ip_forward" or
// "net.ipv4.ip_forward") inside ns. It does nothing to any other namespace.
// A sysctl that already has the value is not written: an agent in a
// container sees /proc/sys read-only, and the node's own set-up (or the
// kubelet) usually has set it already. Writing it when it differs there
// fails with an error that says so.
func SetSysctl(ns netns.NsHandle, path, value string) error {
	p, err := sysctlPath(path)
	if err != nil {
		return err
	}
	var cur string
	err = InNamespace(ns, func() error {
		if b, rerr := os.ReadFile(p); rerr == nil {
			cur = strings.TrimSpace(string(b))
			if cur == value {
				return nil
			}
		}
		return os.WriteFile(p, []byte(value), 0o644)
	})
	if errors.Is(err, syscall.EROFS) {
		return fmt.Errorf("set sysctl %s=%s: it is %s and /proc/sys is read-only here (set it on the node, or run the agent privileged): %w", path, value, cur, err)
	}
	if err != nil {
		return fmt.Errorf("set sysctl %s=%s: %w", path, value, err)
	}
	return nil
}

// GetSysctl reads the sysctl path inside ns, without the trailing newline.
func GetSysctl(ns netns.NsHandle, path string) (string, error) {
	p, err := sysctlPath(path)
	if err != nil {
		return "", err
	}
	var out []byte
	err = InNamespace(ns, func() error {
		var rerr error
		out, rerr = os.ReadFile(p)
		return rerr
	})
	if err != nil {
		return "", fmt.Errorf("read sysctl %s: %w", path, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// IsCurrentNamespace reports whether ns is the network namespace of the
// calling goroutine's thread, which for a goroutine that is not locked to a
// thread is the process's own (threads switched by InNamespace are locked
// to theirs).
func IsCurrentNamespace(ns netns.NsHandle) bool {
	cur, err := netns.Get()
	if err != nil {
		return false
	}
	defer cur.Close()
	return cur.Equal(ns)
}

// SubscribeNamespace is the namespace to pass to a netlink subscription: none
// (the current one, no setns) when ns is the current namespace.
func SubscribeNamespace(ns netns.NsHandle) netns.NsHandle {
	if IsCurrentNamespace(ns) {
		return netns.None()
	}
	return ns
}

// SetSysctl writes value to the sysctl path inside the handle's namespace
// (see the package function SetSysctl).
func (h Handle) SetSysctl(path, value string) error { return SetSysctl(h.NS(), path, value) }

// GetSysctl reads the sysctl path inside the handle's namespace (see the
// package function GetSysctl).
func (h Handle) GetSysctl(path string) (string, error) { return GetSysctl(h.NS(), path) }

// NewNamespace creates a new, unnamed network namespace and returns a
// handle to it; the namespace lives as long as a handle or a process in
// it does, so closing the returned handle destroys it and everything in
// it. The caller's thread never changes namespace (see newNamespace).
func NewNamespace() (netns.NsHandle, error) {
	return newNamespace("new namespace", netns.New, func() {})
}

// NewNamedNamespace creates the named network namespace name under
// /run/netns (visible to `ip netns exec name ...`) and returns a handle to
// it. The caller's thread never changes namespace (see newNamespace).
func NewNamedNamespace(name string) (netns.NsHandle, error) {
	return newNamespace("create namespace "+name, func() (netns.NsHandle, error) { return netns.NewNamed(name) },
		func() { _ = netns.DeleteNamed(name) })
}

// newNamespace runs create, which moves the creating thread into the new
// namespace, on a locked thread of a goroutine of its own that switches
// back afterwards (also when create failed half-way, after the unshare).
// When it cannot switch back, the namespace is closed, undo removes what
// create left, and the thread exits still locked, so the runtime destroys
// it.
func newNamespace(what string, create func() (netns.NsHandle, error), undo func()) (netns.NsHandle, error) {
	type result struct {
		ns  netns.NsHandle
		err error
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			res <- result{netns.None(), fmt.Errorf("%s: get current namespace: %w", what, err)}
			return
		}
		defer orig.Close()
		ns, err := create()
		if err != nil {
			err = fmt.Errorf("%s: %w", what, err)
		}
		if serr := netns.Set(orig); serr != nil {
			if err == nil {
				ns.Close()
				undo()
			}
			res <- result{netns.None(), errors.Join(err, fmt.Errorf("%s: switch back: %w", what, serr))}
			return // stays locked: the thread dies with this goroutine
		}
		runtime.UnlockOSThread()
		res <- result{ns, err}
	}()
	r := <-res
	if r.err != nil {
		return netns.None(), r.err
	}
	return r.ns, nil
}
