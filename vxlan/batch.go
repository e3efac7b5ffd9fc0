package vxlan

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// kind is the table an op changes.
type kind uint8

const (
	kindFDB kind = iota
	kindNeigh
	kindRoute
)

// op is one kernel change: set (create or replace) or delete one entry.
type op struct {
	kind  kind
	del   bool
	v6    bool // a memo's route: its IPv6 one
	link  int
	ip    netip.Addr       // neighbour: the peer subnet address; FDB: the peer public IP
	mac   net.HardwareAddr // neighbour and FDB
	route *netlink.Route   // route deletes and DiffRoutes' replaces (normalized: protocol, table, family)
	memo  *peerMemo        // other route sets: the peer whose route this is, rendered as it is written
	peer  int              // index into the peer set; -1 for stale entries
}

// netlinkRoute is the route o changes.
func (o op) netlinkRoute() netlink.Route {
	if o.memo != nil {
		s := o.memo.spec(o.v6)
		return s.netlink()
	}
	return *o.route
}

func (o op) String() string {
	verb := "set"
	if o.del {
		verb = "delete"
	}
	switch o.kind {
	case kindFDB:
		return fmt.Sprintf("%s fdb %s dst %s dev %d", verb, o.mac, o.ip, o.link)
	case kindNeigh:
		return fmt.Sprintf("%s neighbour %s lladdr %s dev %d", verb, o.ip, o.mac, o.link)
	}
	if !o.del {
		verb = "replace"
	}
	return fmt.Sprintf("%s route %s", verb, backend.FormatRoute(o.netlinkRoute()))
}

// appendMsg appends o as one netlink request with sequence number seq.
// ack asks the kernel to acknowledge it (errors are always reported).
func (o op) appendMsg(b []byte, seq uint32, ack bool) []byte {
	start := len(b)
	var typ, flags uint16
	flags = unix.NLM_F_REQUEST
	if ack {
		flags |= unix.NLM_F_ACK
	}
	switch {
	case o.kind == kindRoute && o.del:
		typ = unix.RTM_DELROUTE
	case o.kind == kindRoute:
		typ, flags = unix.RTM_NEWROUTE, flags|unix.NLM_F_CREATE|unix.NLM_F_REPLACE
	case o.del:
		typ = unix.RTM_DELNEIGH
	default:
		typ, flags = unix.RTM_NEWNEIGH, flags|unix.NLM_F_CREATE|unix.NLM_F_REPLACE
	}
	b = binary.NativeEndian.AppendUint32(b, 0) // length, patched below
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = binary.NativeEndian.AppendUint16(b, flags)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 0)
	if o.kind == kindRoute {
		b = appendRoute(b, o)
	} else {
		b = appendNeigh(b, o)
	}
	binary.NativeEndian.PutUint32(b[start:], uint32(len(b)-start))
	return b
}

func appendNeigh(b []byte, o op) []byte {
	family, state, flags := uint8(unix.AF_INET), uint16(unix.NUD_PERMANENT), uint8(0)
	if o.ip.Is6() {
		family = unix.AF_INET6
	}
	if o.kind == kindFDB {
		family, flags = unix.AF_BRIDGE, unix.NTF_SELF
	}
	if o.del {
		state = 0
	}
	b = append(b, family, 0, 0, 0)
	b = binary.NativeEndian.AppendUint32(b, uint32(o.link))
	b = binary.NativeEndian.AppendUint16(b, state)
	b = append(b, flags, 0)
	if o.kind == kindFDB || !o.del {
		b = appendAttr(b, unix.NDA_LLADDR, o.mac)
	}
	return appendAttr(b, unix.NDA_DST, o.ip.AsSlice())
}

func appendRoute(b []byte, o op) []byte {
	var m routeMsg
	if o.memo != nil {
		s := o.memo.spec(o.v6)
		m = routeMsg{dst: s.dst, gw: s.gw, link: s.link, table: int(s.table), proto: s.proto}
		if s.onlink {
			m.flags = int(netlink.FLAG_ONLINK)
		}
	} else {
		r := o.route
		m.dst, _ = ipconv.PrefixFromIPNet(r.Dst)
		m.gw = ipconv.AddrFromIP(r.Gw)
		m.link, m.table, m.proto, m.scope, m.flags, m.priority = r.LinkIndex, r.Table, uint8(r.Protocol), uint8(r.Scope), r.Flags, r.Priority
	}
	return m.append(b, o.del)
}

// routeMsg is the body of an rtnetlink route request.
type routeMsg struct {
	dst             netip.Prefix
	gw              netip.Addr
	link, table     int
	proto, scope    uint8
	flags, priority int
}

func (m routeMsg) append(b []byte, del bool) []byte {
	family := uint8(unix.AF_INET)
	if m.dst.Addr().Is6() {
		family = unix.AF_INET6
	}
	typ := uint8(unix.RTN_UNICAST)
	if del {
		typ = unix.RTN_UNSPEC
	}
	table := m.table
	if table == 0 {
		table = unix.RT_TABLE_MAIN
	}
	b = append(b, family, uint8(m.dst.Bits()), 0, 0, uint8(table), m.proto, m.scope, typ)
	b = binary.NativeEndian.AppendUint32(b, uint32(m.flags))
	b = appendAttr(b, unix.RTA_DST, m.dst.Addr().AsSlice())
	if m.gw.IsValid() {
		b = appendAttr(b, unix.RTA_GATEWAY, m.gw.AsSlice())
	}
	if m.link != 0 {
		b = appendAttr(b, unix.RTA_OIF, binary.NativeEndian.AppendUint32(nil, uint32(m.link)))
	}
	if m.priority != 0 {
		b = appendAttr(b, unix.RTA_PRIORITY, binary.NativeEndian.AppendUint32(nil, uint32(m.priority)))
	}
	return b
}

func appendAttr(b []byte, typ uint16, data []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(4+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// Writer sends kernel changes through one raw NETLINK_ROUTE socket in
// batches: many requests per sendmsg, without acknowledgements except for
// the last request of a batch, which marks where the kernel's answers end.
// rtnetlink handles a batch synchronously inside sendmsg, so only errors
// come back. It is not safe for concurrent use.
type writer struct {
	fd     int
	broken bool // a send or receive failed: the socket is not reused
	seq    uint32
	sbuf   []byte
	rbuf   []byte
}

// batchBytes bounds one sendmsg; well under the default socket send buffer.
const batchBytes = 64 << 10

// newWriter opens a writer's socket in ns.
func newWriter(ns netns.NsHandle) (*writer, error) {
	fd := -1
	err := nlsafe.InNamespace(ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind netlink socket: %w", err)
	}
	// Room for one error per request of a batch (each is its own skb),
	// and short acknowledgements that do not echo the request.
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 8<<20)
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	// Touched now, while the node programs its peers: acknowledgements use
	// a page of it, and the first dump of a resync, minutes into an idle
	// node's life, would otherwise fault in the rest.
	rbuf := make([]byte, 1<<16)
	for i := 0; i < len(rbuf); i += 4096 {
		rbuf[i] = 0
	}
	return &writer{fd: fd, rbuf: rbuf}, nil
}

func (w *writer) Close() error { return unix.Close(w.fd) }

// write applies ops in order and returns one error per op (nil when it
// succeeded). A delete of an entry already gone succeeds. An error of the
// socket itself is returned for every op it left unconfirmed.
func (w *writer) write(ops []op) []error {
	errs := make([]error, len(ops))
	for start := 0; start < len(ops); {
		w.sbuf = w.sbuf[:0]
		base := w.seq + 1
		end := start
		for end < len(ops) && (end == start || len(w.sbuf) < batchBytes-256) {
			last := end+1 == len(ops) || len(w.sbuf) >= batchBytes-512
			w.seq++
			w.sbuf = ops[end].appendMsg(w.sbuf, w.seq, last)
			end++
			if last {
				break
			}
		}
		if err := w.flush(ops[start:end], errs[start:end], base); err != nil {
			w.broken = true
			for i := start; i < end; i++ {
				if errs[i] == nil {
					errs[i] = err
				}
			}
		}
		start = end
	}
	return errs
}

// flush sends w.sbuf (the requests for ops, sequence numbers from base) and
// reads the answers up to the acknowledgement of the last one.
func (w *writer) flush(ops []op, errs []error, base uint32) error {
	if err := unix.Sendto(w.fd, w.sbuf, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("netlink send: %w", err)
	}
	last := base + uint32(len(ops)) - 1
	for {
		n, _, err := unix.Recvfrom(w.fd, w.rbuf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("netlink receive: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(w.rbuf[:n])
		if err != nil {
			return fmt.Errorf("netlink receive: %w", err)
		}
		done := false
		for _, m := range msgs {
			if m.Header.Type != unix.NLMSG_ERROR || len(m.Data) < 4 {
				continue
			}
			seq := m.Header.Seq
			if seq < base || seq > last {
				continue // an answer to an earlier, failed flush
			}
			if code := int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
				e := syscall.Errno(-code)
				i := seq - base
				if !ops[i].del || e != unix.ENOENT && e != unix.ESRCH {
					errs[i] = e
				}
			}
			if seq == last {
				done = true
			}
		}
		if done {
			return nil
		}
	}
}

// program applies ops through the writers (in parallel, split by peer so
// that every entry of one peer keeps its order) or, without writers,
// through h one call at a time. It returns one error per op.
func program(ws []*writer, h *netlink.Handle, ops []op) []error {
	if len(ws) == 0 {
		errs := make([]error, len(ops))
		for i, o := range ops {
			errs[i] = viaHandle(h, o)
		}
		return errs
	}
	if len(ws) == 1 || len(ops) < 256 {
		return ws[0].write(ops)
	}
	parts := make([][]int, len(ws))
	for i, o := range ops {
		k := (o.peer + len(ws)) % len(ws)
		if o.peer < 0 {
			k = i % len(ws)
		}
		parts[k] = append(parts[k], i)
	}
	errs := make([]error, len(ops))
	var wg sync.WaitGroup
	for k, idx := range parts {
		wg.Go(func() {
			sub := make([]op, len(idx))
			for j, i := range idx {
				sub[j] = ops[i]
			}
			for j, e := range ws[k].write(sub) {
				errs[idx[j]] = e
			}
		})
	}
	wg.Wait()
	return errs
}

// viaHandle applies one op through a netlink handle: the path without a
// namespace handle to open raw sockets in.
func viaHandle(h *netlink.Handle, o op) error {
	var err error
	switch o.kind {
	case kindRoute:
		r := o.netlinkRoute()
		if o.del {
			err = h.RouteDel(&r)
		} else {
			err = h.RouteReplace(&r)
		}
	default:
		n := netlink.Neigh{LinkIndex: o.link, IP: ipconv.IPFromAddr(o.ip), HardwareAddr: o.mac, State: netlink.NUD_PERMANENT}
		switch {
		case o.kind == kindFDB:
			n.Family, n.Flags = unix.AF_BRIDGE, netlink.NTF_SELF
		case o.ip.Is4():
			n.Family = unix.AF_INET
		default:
			n.Family = unix.AF_INET6
		}
		if o.del {
			err = h.NeighDel(&n)
		} else {
			err = h.NeighSet(&n)
		}
	}
	if o.del && (errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH)) {
		return nil
	}
	return err
}
