// Package ipsec is the ipsec dataplane: pod traffic between nodes is carried
// in ESP tunnel mode, programmed directly into the kernel's XFRM tables
// through a netlink handle. There is no IKE daemon (no strongSwan/charon):
// keys are derived from the cluster's pre-shared key and per-node X25519
// keys that every node publishes with its lease.
//
// # Keys
//
// Every Prepare (so every agent start) and every Network.Rekey makes a fresh
// X25519 key pair. The public key is published in the lease's BackendData
// ({"PublicKey":"<base64>","Epoch":<uint64>,"Auth":"<base64>"}). Epoch goes
// up with every new key (the previous lease's epoch + 1, at least the Unix
// time in nanoseconds). Auth is HMAC-SHA256 under
// HKDF-SHA256(PSK, info "flannel-ipsec v2 lease auth") over the lease's
// identity, each field as a 4-byte big-endian length and its bytes: the
// IPv4 and IPv6 subnet (text, empty when none), the public IPv4 and IPv6
// address (4 or 16 bytes, empty when none), the public key and the epoch
// (8 bytes big-endian). So a (PublicKey, Auth) pair pasted into another
// lease does not verify, nor does one with another epoch, and a node with
// another PSK is told apart (a *flannel.PeerError naming the reason,
// ErrPeerAuth) without revealing the PSK. Each node remembers the highest
// epoch it saw per peer lease (subnets) and refuses an older one
// (ErrOldEpoch: a replayed lease), and refuses every peer whose key another
// peer or this node also uses (ErrDuplicateKey); refused peers are warned
// about once per change and stay blocked. Prepare does not know the subnets
// yet: it binds to the previous lease's, and Start binds to the lease it
// gets and publishes again (Options.Publish) when they differ. The ESP key
// for traffic from sender S to receiver R is
//
//	HKDF-SHA256(secret = X25519(S, R) || PSK,
//	            salt   = "flannel-ipsec v1",
//	            info   = "flannel-ipsec v1 esp " + cipher + pub(S) + pub(R)
//	                     [+ " gen <n>" for generation n > 0] [+ " ipv6"])
//
// truncated to the cipher's key length plus the 4-byte GCM salt; the IPv4
// and IPv6 states of a pair have their own keys, since each counts its own
// sequence numbers (the GCM nonces). It is
// distinct per node pair and direction (the info orders the two public
// keys), changes on every restart and rekey (fresh X25519 keys), cannot be
// computed without the PSK even by someone who can write leases, and gives
// forward secrecy per key lifetime (private keys live only in memory).
//
// The SPI of a (sender, receiver) key pair is derived from the two public
// keys; collisions among the senders of one receiver are resolved
// deterministically (sorted probing), so SPIs are unique per destination and
// both ends compute the same value.
//
// A GCM key must never see the same nonce twice, and the kernel makes the
// nonce from the state's sequence number, which starts over in a new
// state. So an outbound state is never installed again with a key it had:
// when one vanishes (deleted by hand, flushed), the sender moves to the next
// generation (a gen-specific info string and SPI); receivers keep inbound
// states for Generations generations per sender key. The generations a key
// pair used are remembered while our key lives, so a pair that comes back
// (a peer that left returns with the same key, our previous key switched
// back to) takes its next unused generation, never one it had. Once a pair
// has none left the peer stays blocked (and is reported) until the next
// rekey, which Run then starts early when it can publish, or restart. Every
// Start needs its own Prepare, i.e. a fresh key pair.
//
// # Rekeying
//
// Network.Rekey makes a new key pair and installs inbound states for it
// next to the old ones; the caller publishes the returned attributes. Peers
// switch their outbound to the new key as soon as they see it. Our outbound
// to a peer switches when the packet counters of our inbound states show
// that the peer sends with the new key, or after Options.Grace/2 when the
// peer has sent nothing with the old key for Grace/2 either (it is idle, or
// sends no traffic back). A peer that keeps sending with the old key has not
// seen the new one, for example because the store is unreachable, so the
// old key stays in use towards it and stays accepted: a rekey during a
// store outage does not cut traffic. The old key is retired after Grace once
// no peer still sends with it, and after RekeyInterval at the latest (with a
// warning); the next rekey waits until then. Network.Run rekeys every
// Options.RekeyInterval when it can publish: Options.Publish, or the flannel
// Agent's Env.Publish, which writes the new attributes with the lease (and
// keeps renewing that).
//
// # Kernel state
//
// For each peer and family: an outbound and an inbound ESP tunnel-mode state
// between the public IPs (AES-GCM, rfc4106, 64-bit extended sequence
// numbers, a replay window of ReplayWindow packets), out/in/fwd policies
// between the own and the peer's pod subnets and the same between our
// public address and the peer's subnet and the peer's public address and
// our subnet (host-sourced traffic, e.g. NodePort traffic that kube-proxy
// masquerades to the node's address), and a route for the peer's subnet
// via the next hop towards its public IP (so peers on other L2 segments
// work). Under the per-peer policies sit, programmed by Start before the
// first Apply: an out block policy for traffic from any source to the whole
// cluster network (with an allow for the own subnet), and in and fwd block
// policies for traffic from the cluster network to the own subnet (with an
// allow from the own subnet). So traffic to remote pods is never sent in
// plain text, whatever its source: not before a peer's states exist, not
// after they were deleted by hand, not while the agent restarts; traffic
// from a host address other than the public one is dropped, not
// encrypted. And plain text with a cluster source address (spoofed, from a
// peer whose key is refused, or before the first Apply) never reaches a
// local pod. Traffic from outside the cluster network (the internet, the
// underlay) to pods is not affected. States and policies are ours when
// they carry Options.Reqid (policies: in their template, or the
// block/allow priorities); reconcile is level-triggered and deletes ours
// that are not wanted, including those of a previous run.
//
// Outbound states have soft limits (2^31 packets, 1 TiB): when one of the
// current key's reaches one, the kernel reports it and Run rekeys early;
// the hard limits, which make the kernel delete the state, are twice as
// far.
//
// The MTU is the external MTU minus the exact ESP tunnel overhead for
// AES-GCM (outer IP header, SPI and sequence number, 8-byte IV, padding to 4
// bytes with the 2 trailer bytes, 16-byte ICV; 8 more with UDPEncap): 1446
// on a 1500-byte IPv4 underlay.
//
// It does not run IKE, does not interoperate with upstream flannel's
// strongSwan-based ipsec backend on the wire, and does not set up
// masquerading.
package ipsec
