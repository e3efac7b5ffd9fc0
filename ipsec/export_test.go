package ipsec

import "encoding/json"

// FakePeerData returns BackendData for a fresh key pair authenticated with
// psk, as a peer would publish (for tests that invent peers).
func FakePeerData(psk []byte) (json.RawMessage, error) {
	k, err := newKeyPair()
	if err != nil {
		return nil, err
	}
	return marshalBackendData(psk, k.pub)
}
