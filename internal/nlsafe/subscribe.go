package nlsafe

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// SubscribeBuffer is the receive buffer of the subscriptions' sockets.
// Programming thousands of peers at once emits as many notifications; with
// the default buffer (about 200 KiB) the socket overflows, which ends the
// subscription and costs a resubscribe and a full repair. Setting it beyond
// rmem_max needs CAP_NET_ADMIN (which an agent has); without it the default
// is used.
const SubscribeBuffer = 16 << 20

// The subscriptions below share one shape (backend.Subscribe): they deliver
// updates from namespace ns on ch until done is closed, then close ch, and
// hand the errors the subscription reports while it runs to onErr.

// withBuffer subscribes with a SubscribeBuffer-sized receive buffer, and
// with the default one when the kernel refuses the larger size.
func withBuffer(sub func(size int, force bool) error) error {
	err := sub(SubscribeBuffer, true)
	if errors.Is(err, unix.EPERM) {
		err = sub(0, false)
	}
	return err
}

// SubscribeLinks subscribes to the link updates of ns.
func SubscribeLinks(ch chan netlink.LinkUpdate, done chan struct{}, ns netns.NsHandle, onErr func(error)) error {
	ns = SubscribeNamespace(ns)
	return withBuffer(func(size int, force bool) error {
		return netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{
			Namespace: &ns, ErrorCallback: onErr, ReceiveBufferSize: size, ReceiveBufferForceSize: force,
		})
	})
}

// SubscribeNeighDeletes subscribes to the neighbour (and FDB) deletions
// of ns. Other notifications are dropped by their type, unparsed: the echo
// of each entry a bulk apply adds (two per vxlan peer) would otherwise be
// decoded into a netlink.Neigh and thrown away, 15 MB of garbage while
// 20,000 peers are programmed.
func SubscribeNeighDeletes(ch chan netlink.NeighUpdate, done chan struct{}, ns netns.NsHandle, onErr func(error)) error {
	return subscribeRaw("neighbour", unix.NETLINK_ROUTE, []uint{unix.RTNLGRP_NEIGH}, ch, done, ns, onErr,
		deletions(unix.RTM_DELNEIGH, func(m syscall.NetlinkMessage) (netlink.NeighUpdate, error) {
			n, err := netlink.NeighDeserialize(m.Data)
			if err != nil {
				return netlink.NeighUpdate{}, err
			}
			return netlink.NeighUpdate{Type: m.Header.Type, Neigh: *n}, nil
		}))
}

// SubscribeRouteDeletes subscribes to the IPv4 and IPv6 route deletions of
// ns, likewise without decoding the other notifications. vishvananda/netlink
// does not export its route decoder, so a deletion carries what the
// repair watchers look at: the header's family, table, protocol, scope and
// type, and the destination, gateway, output link and metric.
func SubscribeRouteDeletes(ch chan netlink.RouteUpdate, done chan struct{}, ns netns.NsHandle, onErr func(error)) error {
	return subscribeRaw("route", unix.NETLINK_ROUTE, []uint{unix.RTNLGRP_IPV4_ROUTE, unix.RTNLGRP_IPV6_ROUTE}, ch, done, ns, onErr,
		deletions(unix.RTM_DELROUTE, routeDeletion))
}

func routeDeletion(m syscall.NetlinkMessage) (netlink.RouteUpdate, error) {
	if len(m.Data) < unix.SizeofRtMsg {
		return netlink.RouteUpdate{}, fmt.Errorf("route message of %d bytes", len(m.Data))
	}
	h := nl.DeserializeRtMsg(m.Data)
	attrs, err := nl.ParseRouteAttr(m.Data[unix.SizeofRtMsg:])
	if err != nil {
		return netlink.RouteUpdate{}, err
	}
	r := netlink.Route{Family: int(h.Family), Table: int(h.Table), Protocol: netlink.RouteProtocol(h.Protocol),
		Scope: netlink.Scope(h.Scope), Type: int(h.Type), Flags: int(h.Flags), Tos: int(h.Tos)}
	u32 := func(b []byte) int {
		if len(b) < 4 {
			return 0
		}
		return int(binary.NativeEndian.Uint32(b))
	}
	for _, a := range attrs {
		switch a.Attr.Type {
		case unix.RTA_DST:
			r.Dst = &net.IPNet{IP: net.IP(a.Value), Mask: net.CIDRMask(int(h.Dst_len), 8*len(a.Value))}
		case unix.RTA_GATEWAY:
			r.Gw = net.IP(a.Value)
		case unix.RTA_OIF:
			r.LinkIndex = u32(a.Value)
		case unix.RTA_PRIORITY:
			r.Priority = u32(a.Value)
		case unix.RTA_TABLE:
			r.Table = u32(a.Value)
		}
	}
	return netlink.RouteUpdate{Type: m.Header.Type, NlFlags: m.Header.Flags, Route: r}, nil
}

// deletions is a subscribeRaw decoder that keeps the messages of type del,
// decoded by parse, and drops the others unread.
func deletions[T any](del uint16, parse func(syscall.NetlinkMessage) (T, error)) func(syscall.NetlinkMessage) (T, bool, error) {
	return func(m syscall.NetlinkMessage) (T, bool, error) {
		if m.Header.Type != del {
			var zero T
			return zero, false, nil
		}
		u, err := parse(m)
		return u, err == nil, err
	}
}

// subscribeRaw delivers the notifications of groups of the netlink
// protocol in ns that decode keeps, through a socket of vishvananda/netlink's
// nl package (for what its subscriptions cannot do). A notification that
// does not decode is reported to onErr and skipped.
func subscribeRaw[T any](what string, protocol int, groups []uint, ch chan T, done chan struct{}, ns netns.NsHandle, onErr func(error),
	decode func(syscall.NetlinkMessage) (T, bool, error)) error {
	s, err := nl.SubscribeAt(SubscribeNamespace(ns), netns.None(), protocol, groups...)
	if err != nil {
		return fmt.Errorf("%s notifications: %w", what, err)
	}
	if s.SetReceiveBufferSize(SubscribeBuffer, true) != nil {
		_ = s.SetReceiveBufferSize(SubscribeBuffer, false) // capped at rmem_max
	}
	go func() {
		<-done
		s.Close() // ends the blocked Receive below
	}()
	go func() {
		defer close(ch)
		for {
			msgs, from, err := s.Receive()
			if err != nil {
				onErr(err)
				return
			}
			if from.Pid != nl.PidKernel {
				continue
			}
			for _, m := range msgs {
				u, keep, err := decode(m)
				if err != nil {
					onErr(fmt.Errorf("%s notification: %w", what, err))
					continue
				}
				if !keep {
					continue
				}
				select {
				case ch <- u:
				case <-done:
					return
				}
			}
		}
	}()
	return nil
}

// SubscribeRoutes subscribes to the route updates of ns.
func SubscribeRoutes(ch chan netlink.RouteUpdate, done chan struct{}, ns netns.NsHandle, onErr func(error)) error {
	ns = SubscribeNamespace(ns)
	return withBuffer(func(size int, force bool) error {
		return netlink.RouteSubscribeWithOptions(ch, done, netlink.RouteSubscribeOptions{
			Namespace: &ns, ErrorCallback: onErr, ReceiveBufferSize: size, ReceiveBufferForceSize: force,
		})
	})
}

// SubscribeXfrm subscribes to the XFRM notifications of ns about states
// and policies (added, deleted, flushed, expired) and delivers each
// message's type. vishvananda/netlink's XfrmMonitor only reports expiries
// and cannot enter a namespace, hence a socket of its nl package.
func SubscribeXfrm(ch chan nl.XfrmMsgType, done chan struct{}, ns netns.NsHandle, onErr func(error)) error {
	// A reconcile of many peers deletes thousands of states at once: the
	// large buffer matters here too.
	return subscribeRaw("xfrm", unix.NETLINK_XFRM, []uint{nl.XFRMNLGRP_SA, nl.XFRMNLGRP_POLICY, nl.XFRMNLGRP_EXPIRE}, ch, done, ns, onErr,
		func(m syscall.NetlinkMessage) (nl.XfrmMsgType, bool, error) {
			return nl.XfrmMsgType(m.Header.Type), true, nil
		})
}
