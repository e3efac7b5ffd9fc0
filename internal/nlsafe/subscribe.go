package nlsafe

import (
	"errors"
	"fmt"

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
	s, err := nl.SubscribeAt(SubscribeNamespace(ns), netns.None(), unix.NETLINK_ROUTE, unix.RTNLGRP_NEIGH)
	if err != nil {
		return fmt.Errorf("neighbour notifications: %w", err)
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
				if m.Header.Type != unix.RTM_DELNEIGH {
					continue
				}
				n, err := netlink.NeighDeserialize(m.Data)
				if err != nil {
					onErr(fmt.Errorf("neighbour notification: %w", err))
					continue
				}
				select {
				case ch <- netlink.NeighUpdate{Type: m.Header.Type, Neigh: *n}:
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
// and cannot enter a namespace, hence a socket of its nl package. When the
// kernel refuses the larger buffer the default one stays.
func SubscribeXfrm(ch chan nl.XfrmMsgType, done chan struct{}, ns netns.NsHandle, onErr func(error)) error {
	s, err := nl.SubscribeAt(SubscribeNamespace(ns), netns.None(), unix.NETLINK_XFRM,
		nl.XFRMNLGRP_SA, nl.XFRMNLGRP_POLICY, nl.XFRMNLGRP_EXPIRE)
	if err != nil {
		return fmt.Errorf("xfrm notifications: %w", err)
	}
	// A reconcile of many peers deletes thousands of states at once.
	_ = s.SetReceiveBufferSize(SubscribeBuffer, true)
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
				select {
				case ch <- nl.XfrmMsgType(m.Header.Type):
				case <-done:
					return
				}
			}
		}
	}()
	return nil
}
