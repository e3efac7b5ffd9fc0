package wireguard

import (
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/flannelkit/flannel/lease"
)

func newKey(t *testing.T) wgtypes.Key {
	k, err := wgtypes.GeneratePrivateKey()
	require.NoError(t, err)
	return k.PublicKey()
}

func data(t *testing.T, k wgtypes.Key, port int) json.RawMessage {
	d, err := marshalBackendData(k, port)
	require.NoError(t, err)
	return d
}

func TestBackendDataBytes(t *testing.T) {
	k, err := wgtypes.ParseKey("QAcBqzb2k1N6W4ZTTdPpvwgjyLZ0dgcdlBEjkOKJrDo=")
	require.NoError(t, err)
	// What upstream v0.28.9 writes (json.Marshal of {PublicKey string; Port uint16}).
	assert.Equal(t, `{"PublicKey":"QAcBqzb2k1N6W4ZTTdPpvwgjyLZ0dgcdlBEjkOKJrDo=","Port":51820}`, string(data(t, k, 51820)))

	for _, tc := range []struct {
		name, raw string
		port      int
		err       string
	}{
		{name: "upstream", raw: `{"PublicKey":"QAcBqzb2k1N6W4ZTTdPpvwgjyLZ0dgcdlBEjkOKJrDo=","Port":51821}`, port: 51821},
		{name: "before ports were published", raw: `{"PublicKey":"QAcBqzb2k1N6W4ZTTdPpvwgjyLZ0dgcdlBEjkOKJrDo="}`},
		{name: "empty", raw: ``, err: "no wireguard backend data"},
		{name: "no key", raw: `{"Port":1}`, err: "no PublicKey"},
		{name: "bad key", raw: `{"PublicKey":"abc"}`, err: `PublicKey "abc" is not base64 of 32 bytes`},
		{name: "garbled", raw: `{"PublicKey":`, err: "wireguard backend data"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseBackendData(json.RawMessage(tc.raw))
			if tc.err != "" {
				assert.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, k, got.key)
			assert.Equal(t, tc.port, got.port)
		})
	}
}

func TestKeyFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "flannel", "wgkey")
	k, created, err := loadOrCreateKey(path)
	require.NoError(t, err)
	assert.True(t, created)
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, k.String(), string(raw), "upstream's format: base64, no newline")
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o400), st.Mode().Perm())

	again, created, err := loadOrCreateKey(path)
	require.NoError(t, err)
	assert.False(t, created)
	assert.Equal(t, k, again, "a restart reuses the key")

	// A file written by hand with a newline (wg genkey > file) is accepted.
	hand := filepath.Join(t.TempDir(), "wgkey")
	require.NoError(t, os.WriteFile(hand, []byte(k.String()+"\n"), 0o600))
	got, _, err := loadOrCreateKey(hand)
	require.NoError(t, err)
	assert.Equal(t, k, got)

	bad := filepath.Join(t.TempDir(), "wgkey")
	require.NoError(t, os.WriteFile(bad, []byte("garbage-not-a-key"), 0o600))
	_, _, err = loadOrCreateKey(bad)
	assert.ErrorContains(t, err, "not a base64 WireGuard private key")
	assert.NotContains(t, err.Error(), "garbage")
}

func lz(s4, s6, ip4, ip6 string, d4, d6 json.RawMessage) lease.Lease {
	l := lease.Lease{Attrs: lease.Attrs{BackendType: Type, BackendData: d4, BackendV6Data: d6}}
	if s4 != "" {
		l.Subnet = netip.MustParsePrefix(s4)
	}
	if s6 != "" {
		l.IPv6Subnet = netip.MustParsePrefix(s6)
	}
	if ip4 != "" {
		l.Attrs.PublicIP = netip.MustParseAddr(ip4)
	}
	if ip6 != "" {
		l.Attrs.PublicIPv6 = netip.MustParseAddr(ip6)
	}
	return l
}

func TestDesiredPeers(t *testing.T) {
	own, k1, k2 := newKey(t), newKey(t), newKey(t)
	opts := Options{}.withDefaults()
	ownLease := lz("10.244.1.0/24", "fd00:10:244:1::/64", "172.30.0.10", "fd00:172:30::10", nil, nil)
	l := local{own: ownLease, pub: own, opts: opts, publicIP: netip.MustParseAddr("172.30.0.10"), publicIPv6: netip.MustParseAddr("fd00:172:30::10")}
	peers := []lease.Lease{
		lz("10.244.2.0/24", "fd00:10:244:2::/64", "172.30.0.11", "fd00:172:30::11", data(t, k1, 51820), data(t, k1, 51821)),
		lz("10.244.3.0/24", "", "172.30.0.12", "", data(t, k2, 0), nil),                            // an old upstream: no port
		lz("10.244.4.0/24", "", "172.30.0.13", "", json.RawMessage(`{"PublicKey":"x"}`), nil),      // bad key
		{Subnet: netip.MustParsePrefix("10.244.5.0/24"), Attrs: lease.Attrs{BackendType: "vxlan"}}, // other backend
		ownLease, // own
		lz("10.244.6.0/24", "", "172.30.0.10", "", data(t, own, 51820), nil), // a stale lease of ours
		lz("10.244.7.0/24", "", "", "", data(t, newKey(t), 51820), nil),      // no public IP
	}
	dev4 := devSpec{name: DeviceName, port: 51820, v4: true}
	dev6 := devSpec{name: DeviceNameV6, port: 51821, v6: true}

	failed := map[int]error{}
	got := desiredPeers(l, dev4, peers, failed)
	require.Len(t, got, 2)
	assert.Equal(t, wantPeer{key: k1, endpoint: netip.MustParseAddrPort("172.30.0.11:51820"), allowed: []netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")}, leases: []int{0}}, got[0])
	assert.Equal(t, netip.MustParseAddrPort("172.30.0.12:51820"), got[1].endpoint, "no published port: our own")
	require.Len(t, failed, 2)
	assert.ErrorContains(t, failed[2], "is not base64")
	assert.ErrorContains(t, failed[6], "no public IPv4 address")

	failed = map[int]error{}
	got = desiredPeers(l, dev6, peers, failed)
	require.Len(t, got, 1, "only peer 0 has IPv6")
	assert.Equal(t, netip.MustParseAddrPort("[fd00:172:30::11]:51821"), got[0].endpoint)
	assert.Equal(t, []netip.Prefix{netip.MustParsePrefix("fd00:10:244:2::/64")}, got[0].allowed)
	assert.Empty(t, failed)

	// One device: both subnets, the IPv4 data's port.
	for _, tc := range []struct {
		mode Mode
		ep   string
	}{{ModeAuto, "172.30.0.11:51820"}, {ModeIPv4, "172.30.0.11:51820"}, {ModeIPv6, "[fd00:172:30::11]:51820"}} {
		l.opts.Mode = tc.mode
		single := devSpec{name: DeviceName, port: 51820, v4: true, v6: true, single: true}
		// Upstream's single-device nodes publish ListenPortV6 in BackendV6Data.
		p := lz("10.244.2.0/24", "fd00:10:244:2::/64", "172.30.0.11", "fd00:172:30::11", data(t, k1, 51820), data(t, k1, 51821))
		got = desiredPeers(l, single, []lease.Lease{p}, map[int]error{})
		require.Len(t, got, 1)
		assert.Equal(t, tc.ep, got[0].endpoint.String(), "mode %s", tc.mode)
		assert.Len(t, got[0].allowed, 2)
	}

	// Two leases with one key: one peer with both subnets.
	l.opts.Mode = ModeSeparate
	dup := []lease.Lease{
		lz("10.244.2.0/24", "", "172.30.0.11", "", data(t, k1, 51820), nil),
		lz("10.244.9.0/24", "", "172.30.0.11", "", data(t, k1, 51820), nil),
	}
	got = desiredPeers(l, dev4, dup, map[int]error{})
	require.Len(t, got, 1)
	assert.Equal(t, []int{0, 1}, got[0].leases)
	assert.Len(t, got[0].allowed, 2)
}

func TestEndpointAuto(t *testing.T) {
	a := netip.MustParseAddr
	single := devSpec{single: true, v4: true, v6: true}
	for _, tc := range []struct {
		name             string
		my4, my6, p4, p6 string
		v6               bool
	}{
		{name: "private v4, ula v6: v4", my4: "172.30.0.10", my6: "fd00::10", p4: "172.30.0.11", p6: "fd00::11"},
		{name: "public v4: v4", my4: "192.0.2.1", my6: "2001:db8::1", p4: "198.51.100.1", p6: "2001:db8::2"},
		{name: "private v4, public v6 both: v6", my4: "10.0.0.1", my6: "2001:db8::1", p4: "10.0.0.2", p6: "2001:db8::2", v6: true},
		{name: "peer without v6: v4", my4: "10.0.0.1", my6: "2001:db8::1", p4: "10.0.0.2"},
		{name: "peer without v4: v6", my4: "10.0.0.1", my6: "fd00::1", p6: "fd00::2", v6: true},
		{name: "we have no v4: v6", my6: "fd00::1", p4: "10.0.0.2", p6: "fd00::2", v6: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := local{opts: Options{Mode: ModeAuto}}
			p := lease.Lease{}
			if tc.my4 != "" {
				l.publicIP = a(tc.my4)
			}
			if tc.my6 != "" {
				l.publicIPv6 = a(tc.my6)
			}
			if tc.p4 != "" {
				p.Attrs.PublicIP = a(tc.p4)
			}
			if tc.p6 != "" {
				p.Attrs.PublicIPv6 = a(tc.p6)
			}
			assert.Equal(t, tc.v6, endpointV6(l, single, p))
		})
	}
}

func kernelPeer(k wgtypes.Key, ep string, ka time.Duration, psk wgtypes.Key, allowed ...string) wgtypes.Peer {
	p := wgtypes.Peer{PublicKey: k, Endpoint: net.UDPAddrFromAddrPort(netip.MustParseAddrPort(ep)), PersistentKeepaliveInterval: ka, PresharedKey: psk}
	for _, a := range allowed {
		_, n, _ := net.ParseCIDR(a)
		p.AllowedIPs = append(p.AllowedIPs, *n)
	}
	return p
}

func TestPlanPeers(t *testing.T) {
	k1, k2, k3, stale := newKey(t), newKey(t), newKey(t), newKey(t)
	var psk wgtypes.Key
	copy(psk[:], testPSK)
	s := settings{psk: psk, keepalive: 25 * time.Second}
	w := func(k wgtypes.Key, ep string, allowed ...string) wantPeer {
		wp := wantPeer{key: k, endpoint: netip.MustParseAddrPort(ep)}
		for _, a := range allowed {
			wp.allowed = append(wp.allowed, netip.MustParsePrefix(a))
		}
		return wp
	}
	want := []wantPeer{
		w(k1, "172.30.0.11:51820", "10.244.2.0/24"),
		w(k2, "172.30.0.12:51820", "10.244.3.0/24"),
		w(k3, "172.30.0.13:51820", "10.244.4.0/24"),
	}
	actual := []wgtypes.Peer{
		kernelPeer(k1, "172.30.0.11:51820", 25*time.Second, psk, "10.244.2.0/24"),    // as wanted
		kernelPeer(k2, "172.30.0.99:51820", 25*time.Second, psk, "10.244.3.0/24"),    // endpoint changed
		kernelPeer(stale, "172.30.0.13:51820", 25*time.Second, psk, "10.244.4.0/24"), // k3's subnet under an old key
	}
	ops := planPeers(want, actual, s)
	require.Len(t, ops, 3)
	assert.Equal(t, k2, ops[0].PublicKey)
	assert.Equal(t, "172.30.0.12:51820", ops[0].Endpoint.String())
	assert.True(t, ops[0].ReplaceAllowedIPs)
	assert.Equal(t, 25*time.Second, *ops[0].PersistentKeepaliveInterval)
	assert.Equal(t, psk, *ops[0].PresharedKey)
	assert.Equal(t, k3, ops[1].PublicKey, "the new key takes the subnet first")
	assert.Equal(t, stale, ops[2].PublicKey)
	assert.True(t, ops[2].Remove, "then the old key goes")

	// Applied: nothing to do.
	applied := []wgtypes.Peer{
		kernelPeer(k1, "172.30.0.11:51820", 25*time.Second, psk, "10.244.2.0/24"),
		kernelPeer(k2, "172.30.0.12:51820", 25*time.Second, psk, "10.244.3.0/24"),
		kernelPeer(k3, "172.30.0.13:51820", 25*time.Second, psk, "10.244.4.0/24"),
	}
	assert.Empty(t, planPeers(want, applied, s))
	// Keepalive, PSK and AllowedIPs differences are fixed too.
	assert.Len(t, planPeers(want, applied, settings{psk: psk}), 3)
	assert.Len(t, planPeers(want, applied, settings{keepalive: 25 * time.Second}), 3)
	applied[0].AllowedIPs = append(applied[0].AllowedIPs, net.IPNet{IP: net.ParseIP("10.99.0.0").To4(), Mask: net.CIDRMask(16, 32)})
	assert.Len(t, planPeers(want, applied, s), 1)
	// An empty set removes every peer.
	assert.Len(t, planPeers(nil, applied, s), 3)
}
