package ipsec

// ReplayWindow is the anti-replay window of our ESP states, in packets.
// States use extended (64-bit) sequence numbers (ESN), so the sequence
// number never runs out and the kernel keeps a window of this size (without
// ESN it clamps the window to 32).
const ReplayWindow = 128

// stateLimits are the lifetime limits of our outbound ESP states, in
// packets and bytes. Reaching a soft limit makes Run rekey early (the
// kernel reports it as an expiry, which starts a repair that reads the
// counters); the hard limit, which the kernel enforces by deleting the
// state, is twice as far, so the new key is in use long before. Inbound
// states have none: a deleted inbound state would come back with the same
// key and an empty replay window.
type stateLimits struct {
	softPackets, softBytes uint64
}

// defaultLimits: a rekey after 2^31 packets or 1 TiB with one key pair,
// whatever RekeyInterval says.
var defaultLimits = stateLimits{softPackets: 1 << 31, softBytes: 1 << 40}

func (l stateLimits) withDefaults() stateLimits {
	if l.softPackets == 0 {
		l.softPackets = defaultLimits.softPackets
	}
	if l.softBytes == 0 {
		l.softBytes = defaultLimits.softBytes
	}
	return l
}

// reached reports whether an outbound state with these counters reached
// a soft limit.
func (l stateLimits) reached(packets, bytes uint64) bool {
	return packets >= l.softPackets || bytes >= l.softBytes
}
