package ipsec

import (
	"encoding/json"

	"github.com/flannelkit/flannel/lease"
)

// WithLimits returns o with outbound states whose soft limit is
// softPackets packets (hard: twice that), for tests of the early rekey.
func WithLimits(o Options, softPackets uint64) Options {
	o.limits.softPackets = softPackets
	return o
}

// FakePeerData returns BackendData for a fresh key pair authenticated with
// psk for lease l and epoch, as a peer would publish (for tests that
// invent peers).
func FakePeerData(psk []byte, l lease.Lease, epoch uint64) (json.RawMessage, error) {
	k, err := newKeyPair()
	if err != nil {
		return nil, err
	}
	return marshalBackendData(psk, bindingOf(l, k.pub, epoch))
}
