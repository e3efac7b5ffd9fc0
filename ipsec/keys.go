package ipsec

import (
	"bytes"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/flannelkit/flannel/lease"
)

// ErrPeerAuth is wrapped by the error for a peer whose published key is not
// authenticated with our PSK for its lease (the peer, or this node, has
// another PSK, or the key was copied from another lease).
var ErrPeerAuth = errors.New("peer key not authenticated with this cluster's PSK (different PSK on one side?)")

// keyPair is one X25519 key of this node.
type keyPair struct {
	priv *ecdh.PrivateKey
	pub  []byte
}

func newKeyPair() (keyPair, error) {
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return keyPair{}, fmt.Errorf("generate x25519 key: %w", err)
	}
	return keyPair{priv: k, pub: k.PublicKey().Bytes()}, nil
}

// backendData is the BackendData an ipsec node publishes (JSON; see the
// README): its public key, the key's epoch and the auth tag.
type backendData struct {
	PublicKey []byte // base64 in JSON
	// Epoch goes up with every new key of the node (a rekey, a restart):
	// peers refuse a lease with an older epoch than one they saw.
	Epoch uint64
	Auth  []byte // leaseTag of the lease under the PSK-derived auth key
}

// binding is what the auth tag of a lease covers: its subnets, public
// addresses, public key and epoch. A (PublicKey, Auth) pair copied into
// another lease, or replayed with an older epoch, does not verify.
type binding struct {
	subnet, subnet6 netip.Prefix
	ip, ip6         netip.Addr
	pub             []byte
	epoch           uint64
}

// bindingOf is the binding of l with key pub and epoch.
func bindingOf(l lease.Lease, pub []byte, epoch uint64) binding {
	return binding{subnet: l.Subnet, subnet6: l.IPv6Subnet, ip: l.Attrs.PublicIP, ip6: l.Attrs.PublicIPv6, pub: pub, epoch: epoch}
}

// leaseTag proves that whoever published the lease of b holds psk: an
// HMAC-SHA256 over the length-prefixed fields of b.
func leaseTag(psk []byte, b binding) ([]byte, error) {
	k, err := hkdf.Key(sha256.New, psk, []byte("flannel-ipsec v1"), "flannel-ipsec v2 lease auth", 32)
	if err != nil {
		return nil, fmt.Errorf("derive auth key: %w", err)
	}
	m := hmac.New(sha256.New, k)
	field := func(p []byte) {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(len(p)))
		m.Write(n[:])
		m.Write(p)
	}
	for _, p := range []netip.Prefix{b.subnet, b.subnet6} {
		if p.IsValid() {
			field([]byte(p.String()))
		} else {
			field(nil)
		}
	}
	for _, a := range []netip.Addr{b.ip, b.ip6} {
		if a.IsValid() {
			field(a.AsSlice())
		} else {
			field(nil)
		}
	}
	field(b.pub)
	var e [8]byte
	binary.BigEndian.PutUint64(e[:], b.epoch)
	field(e[:])
	return m.Sum(nil), nil
}

// marshalBackendData renders the BackendData for b.
func marshalBackendData(psk []byte, b binding) (json.RawMessage, error) {
	tag, err := leaseTag(psk, b)
	if err != nil {
		return nil, err
	}
	return json.Marshal(backendData{PublicKey: b.pub, Epoch: b.epoch, Auth: tag})
}

// publishedKey is a peer's published key with its epoch.
type publishedKey struct {
	pub   []byte
	epoch uint64
}

// parsePeerKey reads the BackendData of lease l and checks its auth tag
// against l's subnets and public addresses. The error wraps ErrPeerAuth
// when the tag does not match.
func parsePeerKey(psk []byte, l lease.Lease) (publishedKey, error) {
	raw := l.Attrs.BackendData
	if len(bytes.TrimSpace(raw)) == 0 {
		return publishedKey{}, errors.New("no ipsec BackendData (no public key)")
	}
	var d backendData
	if err := json.Unmarshal(raw, &d); err != nil {
		return publishedKey{}, fmt.Errorf("ipsec BackendData: %w", err)
	}
	if len(d.PublicKey) != 32 {
		return publishedKey{}, fmt.Errorf("ipsec BackendData: public key of %d bytes, want 32", len(d.PublicKey))
	}
	want, err := leaseTag(psk, bindingOf(l, d.PublicKey, d.Epoch))
	if err != nil {
		return publishedKey{}, err
	}
	if !hmac.Equal(want, d.Auth) {
		return publishedKey{}, ErrPeerAuth
	}
	return publishedKey{pub: d.PublicKey, epoch: d.Epoch}, nil
}

// nextEpoch is the epoch of a new key: above prev, and at least the
// current Unix time in nanoseconds, so that it also goes up across
// restarts that do not know the previous one.
func nextEpoch(prev uint64, now time.Time) uint64 {
	return max(prev+1, uint64(max(now.UnixNano(), 0)))
}

// epochOf is the epoch in BackendData raw, 0 when it has none.
func epochOf(raw json.RawMessage) uint64 {
	var d backendData
	if json.Unmarshal(raw, &d) != nil {
		return 0
	}
	return d.Epoch
}

// deriveKey returns the ESP key material (AES key and GCM salt) for traffic
// from the holder of sender's public key to receiver, computed by either
// end: own is this node's private key, peerPub the other public key.
//
// gen is the generation of the sender's outbound state for the pair: it
// goes up when that state was deleted behind our back and had to be
// installed again, since a new state restarts the sequence number that
// the GCM nonce is made of, so it must never reuse a key. v6 selects the
// key of the IPv6 state: the two families' states of a pair count their
// sequence numbers apart, so they must not share a key either.
func deriveKey(psk []byte, c Cipher, own *ecdh.PrivateKey, peerPub []byte, senderPub, receiverPub []byte, gen uint8, v6 bool) ([]byte, error) {
	pk, err := ecdh.X25519().NewPublicKey(peerPub)
	if err != nil {
		return nil, fmt.Errorf("peer public key: %w", err)
	}
	shared, err := own.ECDH(pk)
	if err != nil {
		return nil, fmt.Errorf("x25519: %w", err)
	}
	secret := make([]byte, 0, len(shared)+len(psk))
	secret = append(append(secret, shared...), psk...)
	info := "flannel-ipsec v1 esp " + c.String() + string(senderPub) + string(receiverPub)
	if gen > 0 {
		info += fmt.Sprintf(" gen %d", gen)
	}
	if v6 {
		info += " ipv6"
	}
	k, err := hkdf.Key(sha256.New, secret, []byte("flannel-ipsec v1"), info, c.keyLen())
	clear(secret)
	clear(shared)
	if err != nil {
		return nil, fmt.Errorf("derive esp key: %w", err)
	}
	return k, nil
}

// spiCandidate is the try-th SPI candidate for (sender, receiver): never
// below 256 (reserved by RFC 4303).
func spiCandidate(senderPub, receiverPub []byte, try uint32) uint32 {
	h := sha256.New()
	h.Write([]byte("flannel-ipsec v1 spi"))
	h.Write(senderPub)
	h.Write(receiverPub)
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], try)
	h.Write(b[:])
	s := binary.BigEndian.Uint32(h.Sum(nil))
	if s < 256 {
		s += 256
	}
	return s
}

// keyPairID is a (sender, receiver) pair of public keys.
type keyPairID struct{ sender, receiver string }

// assignSPIs gives every (sender, receiver) pair an SPI, unique per receiver
// key and, through used, per destination: pairs are taken in sorted order
// and probe further candidates on a collision, so every node that sees the
// same pairs computes the same SPIs. used holds SPIs already taken at the
// destination and is updated.
func assignSPIs(pairs []keyPairID, used map[uint32]bool) map[keyPairID]uint32 {
	sorted := slices.Clone(pairs)
	slices.SortFunc(sorted, func(a, b keyPairID) int {
		if c := bytes.Compare([]byte(a.receiver), []byte(b.receiver)); c != 0 {
			return c
		}
		return bytes.Compare([]byte(a.sender), []byte(b.sender))
	})
	sorted = slices.Compact(sorted)
	out := make(map[keyPairID]uint32, len(sorted))
	for _, p := range sorted {
		for try := uint32(0); ; try++ {
			s := spiCandidate([]byte(p.sender), []byte(p.receiver), try)
			if !used[s] {
				used[s] = true
				out[p] = s
				break
			}
		}
	}
	return out
}
