// Package netlab builds throwaway network topologies out of real Linux
// network namespaces: L2 segments (a bridge each) joined by a router, nodes
// on those segments, and pods behind a "cni0" bridge on each node. It is the
// kernel every dataplane test and the examples/cluster demo run against.
//
// Everything a Lab creates lives in namespaces named "<lab>-...", so several
// Labs can run in parallel and `ip netns exec <name> ...` works for
// debugging; nothing is created in, and no sysctl is changed in, the
// caller's own namespace. Close removes it all.
//
// netlab is test infrastructure: it is not a CNI plugin and does not try to
// be fast or to survive a crash of the process that built it (a crashed
// test leaves "<lab>-*" names in /run/netns; `ip netns del` removes them).
package netlab

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Options describe a Lab. The zero value (after defaults) is one IPv4
// segment; Nodes is required.
type Options struct {
	// Nodes is the number of nodes, 1..245 (required).
	Nodes int
	// IPv4 and IPv6 select the underlay families; both false means IPv4.
	IPv4, IPv6 bool
	// Segments is the number of L2 segments, 1..256 (default 1). Node i is
	// on segment i % Segments; segments are joined by a router namespace
	// that routes between them.
	Segments int
	// MTU of every underlay link (default 1500; at least 1280 with IPv6).
	MTU int
}

const (
	maxNodes    = 245 // nodes are .10+i in a /24
	maxSegments = 256
	defaultMTU  = 1500

	// UnderlayIface is the name of every node's underlay interface.
	UnderlayIface = "eth0"
	// BridgeName is the name of the pod bridge AddPod creates in a node.
	BridgeName = "cni0"
	// PodIface is the name of the interface inside every pod namespace.
	PodIface = "eth0"

	segmentBridge = "br0"
)

func (o Options) withDefaults() (Options, error) {
	if !o.IPv4 && !o.IPv6 {
		o.IPv4 = true
	}
	if o.Segments == 0 {
		o.Segments = 1
	}
	if o.MTU == 0 {
		o.MTU = defaultMTU
	}
	switch {
	case o.Nodes < 1 || o.Nodes > maxNodes:
		return o, fmt.Errorf("netlab: nodes %d: want 1..%d", o.Nodes, maxNodes)
	case o.Segments < 1 || o.Segments > maxSegments:
		return o, fmt.Errorf("netlab: segments %d: want 1..%d", o.Segments, maxSegments)
	case o.MTU < 576 || o.MTU > 65535:
		return o, fmt.Errorf("netlab: mtu %d: want 576..65535", o.MTU)
	case o.IPv6 && o.MTU < 1280:
		return o, fmt.Errorf("netlab: mtu %d: IPv6 needs at least 1280", o.MTU)
	}
	return o, nil
}

// Lab is a topology of namespaces. Its exported fields are set by New and
// must not be changed.
type Lab struct {
	// Name is the unique prefix of every namespace the Lab owns.
	Name string
	// Nodes in index order; node i is named "node<i>".
	Nodes []*Node

	opts     Options
	routerNS netns.NsHandle
	router   *netlink.Handle

	mu     sync.Mutex
	owned  []*ownedNS // in creation order
	closed bool
	ops    sync.WaitGroup // in-flight AddPod, Do, Ping, TCPCheck
}

// ErrClosed is returned by operations on a Lab (or its nodes and pods) after
// Close.
var ErrClosed = errors.New("netlab: lab closed")

// begin registers an operation that uses the Lab's namespaces or handles, so
// that Close waits for it; it fails with ErrClosed once Close has started.
// Every successful begin is paired with end.
func (l *Lab) begin() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("netlab %s: %w", l.Name, ErrClosed)
	}
	l.ops.Add(1)
	return nil
}

func (l *Lab) end() { l.ops.Done() }

// ownedNS is one namespace the Lab created and must delete.
type ownedNS struct {
	name string
	ns   netns.NsHandle
	h    *netlink.Handle
}

// New builds the topology described by opts. On failure everything created
// so far is removed again.
func New(opts Options) (*Lab, error) {
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	l := &Lab{opts: opts}
	if err := l.build(); err != nil {
		return nil, errors.Join(err, l.Close())
	}
	return l, nil
}

func newPrefix() (string, error) {
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("random lab name: %w", err)
	}
	return "fl" + hex.EncodeToString(b[:]), nil
}

func (l *Lab) build() error {
	// The router namespace is created first and doubles as the claim on the
	// prefix: its name is created with O_EXCL.
	var err error
	for range 5 {
		if l.Name, err = newPrefix(); err != nil {
			return err
		}
		var o *ownedNS
		o, err = l.addNS("rt", l.routerSysctls())
		if errors.Is(err, os.ErrExist) {
			continue
		}
		if err != nil {
			return err
		}
		l.routerNS, l.router = o.ns, o.h
		break
	}
	if err != nil {
		return fmt.Errorf("netlab: pick a unique lab name: %w", err)
	}
	segs := make([]*ownedNS, l.opts.Segments)
	for s := range segs {
		if segs[s], err = l.addSegment(s); err != nil {
			return err
		}
	}
	for i := range l.opts.Nodes {
		n, err := l.addNode(i, segs[i%len(segs)])
		if err != nil {
			return err
		}
		l.Nodes = append(l.Nodes, n)
	}
	return nil
}

// NSName returns the full name of the Lab's namespace with the given suffix
// ("rt", "s0", "node1", "node1-pod0").
func (l *Lab) NSName(suffix string) string { return l.Name + "-" + suffix }

// Namespaces returns the names of all namespaces the Lab currently owns.
func (l *Lab) Namespaces() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	names := make([]string, 0, len(l.owned))
	for _, o := range l.owned {
		names = append(names, o.name)
	}
	return names
}

// addNS creates the namespace "<lab>-<suffix>", applies sysctls, brings lo
// up, and records it for Close.
func (l *Lab) addNS(suffix string, sysctls []sysctl) (*ownedNS, error) {
	name := l.NSName(suffix)
	ns, err := newNamedNS(name)
	if err != nil {
		return nil, err
	}
	o := &ownedNS{name: name, ns: ns}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("netlink handle in %s: %w", name, err), o.close())
	}
	o.h = h
	if err := l.own(o); err != nil {
		return nil, err
	}
	if err := setSysctls(ns, sysctls); err != nil {
		return nil, fmt.Errorf("namespace %s: %w", name, err)
	}
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		return nil, fmt.Errorf("set lo up in %s: %w", name, err)
	}
	return o, nil
}

// own records o for Close; if the Lab is already closed it removes o at once.
func (l *Lab) own(o *ownedNS) error {
	l.mu.Lock()
	closed := l.closed
	if !closed {
		l.owned = append(l.owned, o)
	}
	l.mu.Unlock()
	if closed {
		return errors.Join(fmt.Errorf("netlab %s: %w", l.Name, ErrClosed), o.close())
	}
	return nil
}

func (o *ownedNS) close() error {
	if o.h != nil {
		o.h.Close()
		o.h = nil
	}
	if o.ns.IsOpen() {
		o.ns.Close()
		o.ns = netns.None()
	}
	return deleteNamedNS(o.name)
}

// Close waits for the Lab's own operations in flight (AddPod, Do, Ping,
// TCPCheck; so it must not be called from inside Do), then deletes every
// namespace the Lab created, which destroys the interfaces in them, and
// closes the namespace fds and netlink handles. It is safe to call more than
// once; later calls return nil, and the Lab's methods return ErrClosed.
//
// Stop everything that uses Node.Handle, Pod.Handle or the NS fields before
// Close: a closed netlink.Handle silently falls back to the calling thread's
// namespace (usually the host's), and a closed fd number may be reused.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.mu.Unlock()
	l.ops.Wait()
	l.mu.Lock()
	owned := l.owned
	l.owned = nil
	l.mu.Unlock()
	var errs []error
	for i := len(owned) - 1; i >= 0; i-- {
		errs = append(errs, owned[i].close())
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("netlab %s: close: %w", l.Name, err)
	}
	return nil
}

// disown removes o from the Lab's namespaces and deletes it now (unless
// Close already has).
func (l *Lab) disown(o *ownedNS) error {
	l.mu.Lock()
	found := false
	for i, x := range l.owned {
		if x == o {
			l.owned = append(l.owned[:i], l.owned[i+1:]...)
			found = true
			break
		}
	}
	l.mu.Unlock()
	if !found {
		return nil // Close got it
	}
	return o.close()
}
