package ipsec

import (
	"fmt"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/backend"
)

// xfrmEvent is the message type of an XFRM notification.
type xfrmEvent nl.XfrmMsgType

// subscribeXfrm subscribes to the kernel's XFRM notifications about states
// and policies (added, deleted, flushed, expired) in namespace ns; it has
// the shape of backend.Subscribe. vishvananda/netlink's XfrmMonitor only
// reports expiries and cannot enter a namespace, hence the subscription
// through its nl package.
func subscribeXfrm(ch chan xfrmEvent, done chan struct{}, ns netns.NsHandle, onErr func(error)) error {
	s, err := nl.SubscribeAt(backend.SubscribeNamespace(ns), netns.None(), unix.NETLINK_XFRM, nl.XFRMNLGRP_SA, nl.XFRMNLGRP_POLICY, nl.XFRMNLGRP_EXPIRE)
	if err != nil {
		return fmt.Errorf("xfrm notifications: %w", err)
	}
	// A reconcile of many peers deletes thousands of states at once: the
	// larger buffer keeps that from overflowing the socket (see
	// backend.SubscribeBuffer); without CAP_NET_ADMIN the default stays.
	_ = s.SetReceiveBufferSize(backend.SubscribeBuffer, true)
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
				case ch <- xfrmEvent(m.Header.Type):
				case <-done:
					return
				}
			}
		}
	}()
	return nil
}

// removal reports whether e may have taken away a state or policy of ours:
// a deletion, a flush or an expiry.
func (e xfrmEvent) removal() bool {
	switch nl.XfrmMsgType(e) {
	case nl.XFRM_MSG_DELSA, nl.XFRM_MSG_DELPOLICY, nl.XFRM_MSG_FLUSHSA, nl.XFRM_MSG_FLUSHPOLICY, nl.XFRM_MSG_EXPIRE, nl.XFRM_MSG_POLEXPIRE:
		return true
	}
	return false
}
