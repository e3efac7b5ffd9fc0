package ipsec

import (
	"github.com/vishvananda/netlink/nl"
)

// removal reports whether t, the message type of an XFRM notification
// (nlsafe.SubscribeXfrm), may have taken away a state or policy of ours:
// a deletion, a flush or an expiry.
func removal(t nl.XfrmMsgType) bool {
	switch t {
	case nl.XFRM_MSG_DELSA, nl.XFRM_MSG_DELPOLICY, nl.XFRM_MSG_FLUSHSA, nl.XFRM_MSG_FLUSHPOLICY, nl.XFRM_MSG_EXPIRE, nl.XFRM_MSG_POLEXPIRE:
		return true
	}
	return false
}
