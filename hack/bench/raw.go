package main

import (
	"encoding/binary"
	"fmt"
	"syscall"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// rawMessages encodes, for every peer, the three requests the vxlan
// backend makes (FDB entry, neighbour entry, onlink route), grouped by
// table (every FDB entry, then every neighbour, then every route) as the
// backend orders them; the kernel takes them a little faster that way than
// interleaved per peer.
func rawMessages(ps []peer, link int) [][]byte {
	var fdbs, neighs, routes [][]byte
	for _, p := range ps {
		gw := p.subnet.Addr().AsSlice()
		fdb := nlmsg(unix.RTM_NEWNEIGH, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, ndmsg(unix.AF_BRIDGE, link, unix.NTF_SELF),
			attr(unix.NDA_LLADDR, p.mac), attr(unix.NDA_DST, p.public.AsSlice()))
		neigh := nlmsg(unix.RTM_NEWNEIGH, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, ndmsg(unix.AF_INET, link, 0),
			attr(unix.NDA_LLADDR, p.mac), attr(unix.NDA_DST, gw))
		rt := []byte{unix.AF_INET, 24, 0, 0, unix.RT_TABLE_MAIN, byte(backend.RouteProtocol), unix.RT_SCOPE_UNIVERSE, unix.RTN_UNICAST}
		rt = binary.NativeEndian.AppendUint32(rt, unix.RTNH_F_ONLINK)
		route := nlmsg(unix.RTM_NEWROUTE, unix.NLM_F_CREATE|unix.NLM_F_REPLACE, rt,
			attr(unix.RTA_DST, p.subnet.Addr().AsSlice()), attr(unix.RTA_GATEWAY, gw),
			attr(unix.RTA_OIF, binary.NativeEndian.AppendUint32(nil, uint32(link))))
		fdbs, neighs, routes = append(fdbs, fdb), append(neighs, neigh), append(routes, route)
	}
	return append(append(fdbs, neighs...), routes...)
}

func ndmsg(family uint8, link int, flags uint8) []byte {
	b := []byte{family, 0, 0, 0}
	b = binary.NativeEndian.AppendUint32(b, uint32(link))
	b = binary.NativeEndian.AppendUint16(b, unix.NUD_PERMANENT)
	return append(b, flags, 0)
}

func attr(typ uint16, data []byte) []byte {
	b := binary.NativeEndian.AppendUint16(nil, uint16(4+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// nlmsg builds a request; the sequence number and NLM_F_ACK are set when
// it is sent.
func nlmsg(typ, flags uint16, hdr []byte, attrs ...[]byte) []byte {
	b := make([]byte, 16, 64)
	binary.NativeEndian.PutUint16(b[4:], typ)
	binary.NativeEndian.PutUint16(b[6:], flags|unix.NLM_F_REQUEST)
	b = append(b, hdr...)
	for _, a := range attrs {
		b = append(b, a...)
	}
	binary.NativeEndian.PutUint32(b, uint32(len(b)))
	return b
}

type raw struct{ fd int }

func openRaw(ns netns.NsHandle) (*raw, error) {
	var fd int
	err := nlsafe.InNamespace(ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1)
	return &raw{fd: fd}, nil
}

func (r *raw) close() { unix.Close(r.fd) }

// send writes msgs in 64 KiB batches, asking an acknowledgement only for
// the last request of each batch, and fails on the first kernel error.
func (r *raw) send(msgs [][]byte) error {
	buf := make([]byte, 0, 64<<10)
	rbuf := make([]byte, 64<<10)
	seq := uint32(0)
	for i := 0; i < len(msgs); {
		buf = buf[:0]
		for i < len(msgs) && len(buf)+len(msgs[i]) <= cap(buf) {
			m := msgs[i]
			seq++
			binary.NativeEndian.PutUint32(m[8:], seq)
			flags := binary.NativeEndian.Uint16(m[6:]) &^ unix.NLM_F_ACK
			i++
			if i == len(msgs) || len(buf)+len(m)+len(msgs[i]) > cap(buf) {
				flags |= unix.NLM_F_ACK
			}
			binary.NativeEndian.PutUint16(m[6:], flags)
			buf = append(buf, m...)
		}
		if err := unix.Sendto(r.fd, buf, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
			return err
		}
		for done := false; !done; {
			n, _, err := unix.Recvfrom(r.fd, rbuf, 0)
			if err != nil {
				return err
			}
			ms, err := syscall.ParseNetlinkMessage(rbuf[:n])
			if err != nil {
				return err
			}
			for _, m := range ms {
				if m.Header.Type != unix.NLMSG_ERROR {
					continue
				}
				if code := int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
					return fmt.Errorf("request %d: %w", m.Header.Seq, syscall.Errno(-code))
				}
				if m.Header.Seq == seq {
					done = true
				}
			}
		}
	}
	return nil
}
