package ipsec

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/lease"
)

var testPSK = strings.Repeat("s3cr3t-psk-", 10) // 110 characters

func TestParseConfig(t *testing.T) {
	for _, tc := range []struct {
		name    string
		js      string
		want    Options
		wantErr string
	}{
		{name: "minimal", js: `{"Type":"ipsec","PSK":"` + testPSK + `"}`, want: Options{PSK: []byte(testPSK)}},
		{name: "all keys", js: `{"Type":"ipsec","PSK":"` + testPSK + `","UDPEncap":true,"ESPProposal":"aes256gcm16-sha256-prfsha256-ecp256","RekeyInterval":"30m"}`,
			want: Options{PSK: []byte(testPSK), UDPEncap: true, Cipher: AESGCM256, RekeyInterval: 30 * time.Minute}},
		{name: "rekey seconds", js: `{"PSK":"` + testPSK + `","RekeyInterval":90}`, want: Options{PSK: []byte(testPSK), RekeyInterval: 90 * time.Second}},
		{name: "upstream default proposal", js: `{"PSK":"` + testPSK + `","ESPProposal":"aes128gcm16-sha256-prfsha256-ecp256"}`, want: Options{PSK: []byte(testPSK), Cipher: AESGCM128}},
		{name: "missing psk", js: `{"Type":"ipsec"}`, wantErr: "Backend.PSK: missing"},
		{name: "no backend object", js: ``, wantErr: "Backend.PSK: missing"},
		{name: "short psk", js: `{"PSK":"tooshort-secret"}`, wantErr: "too short (15 characters, want at least 96)"},
		{name: "psk not a string", js: `{"PSK":12345}`, wantErr: "Backend.PSK: want a string"},
		{name: "cbc proposal", js: `{"PSK":"` + testPSK + `","ESPProposal":"aes128-sha256"}`, wantErr: `unsupported transform "aes128"`},
		{name: "bad rekey", js: `{"PSK":"` + testPSK + `","RekeyInterval":"soon"}`, wantErr: "Backend.RekeyInterval"},
		{name: "unknown key", js: `{"PSK":"` + testPSK + `","Cipher":"x"}`, wantErr: "Backend.Cipher: unknown key"},
		{name: "wrong type", js: `{"Type":"vxlan","PSK":"` + testPSK + `"}`, wantErr: `Backend.Type "vxlan"`},
		{name: "key twice in another case", js: `{"PSK":"` + testPSK + `","psk":"` + strings.Repeat("x", 100) + `"}`, wantErr: "Backend.PSK and Backend.psk: the same key twice"},
		{name: "key twice", js: `{"UDPEncap":true,"PSK":"` + testPSK + `","UDPEncap":false}`, wantErr: "Backend.UDPEncap and Backend.UDPEncap"},
		{name: "huge rekey seconds", js: `{"PSK":"` + testPSK + `","RekeyInterval":1e30}`, wantErr: "Backend.RekeyInterval 1e30: want at most 720h0m0s"},
		{name: "huge rekey duration", js: `{"PSK":"` + testPSK + `","RekeyInterval":"2000000h"}`, wantErr: "Backend.RekeyInterval"},
		{name: "not an object", js: `["PSK"]`, wantErr: "Backend: not a JSON object"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseConfig(json.RawMessage(tc.js))
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.ErrorIs(t, err, lease.ErrInvalidConfig)
				assert.Contains(t, err.Error(), tc.wantErr)
				assert.NotContains(t, err.Error(), "s3cr3t", "errors never quote the PSK")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestFromConfig(t *testing.T) {
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"ipsec","PSK":"` + testPSK + `"}}`))
	require.NoError(t, err)
	b, err := FromConfig(cfg)
	require.NoError(t, err)
	assert.Equal(t, "ipsec", b.Type())
	cfg, err = lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"ipsec","PSK":"short-secret-value"}}`))
	require.NoError(t, err)
	_, err = FromConfig(cfg)
	require.ErrorIs(t, err, lease.ErrInvalidConfig)
	assert.NotContains(t, err.Error(), "short-secret-value")
}

func TestParseProposal(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Cipher
		ok   bool
	}{
		{"", AESGCM128, true},
		{"aes128gcm16", AESGCM128, true},
		{"AES256GCM16-SHA384", AESGCM256, true},
		{"rfc4106(gcm(aes))", AESGCM128, true},
		{"rfc4106(gcm(aes))-256", AESGCM256, true},
		{"rfc4106(gcm(aes))-192", 0, false},
		{"aes128gcm8", 0, false},
		{"3des-md5", 0, false},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseProposal(tc.in)
			if !tc.ok {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.in)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestKeyDerivation(t *testing.T) {
	psk := []byte(testPSK)
	a, err := newKeyPair()
	require.NoError(t, err)
	b, err := newKeyPair()
	require.NoError(t, err)
	c, err := newKeyPair()
	require.NoError(t, err)

	// Both ends compute the same key for a direction.
	abBySender, err := deriveKey(psk, AESGCM128, a.priv, b.pub, a.pub, b.pub, 0, false)
	require.NoError(t, err)
	abByReceiver, err := deriveKey(psk, AESGCM128, b.priv, a.pub, a.pub, b.pub, 0, false)
	require.NoError(t, err)
	assert.Equal(t, abBySender, abByReceiver)
	assert.Len(t, abBySender, 20, "16-byte AES key + 4-byte salt")

	// Directions, pairs, ciphers and PSKs give distinct keys.
	ba, err := deriveKey(psk, AESGCM128, b.priv, a.pub, b.pub, a.pub, 0, false)
	require.NoError(t, err)
	ac, err := deriveKey(psk, AESGCM128, a.priv, c.pub, a.pub, c.pub, 0, false)
	require.NoError(t, err)
	ab256, err := deriveKey(psk, AESGCM256, a.priv, b.pub, a.pub, b.pub, 0, false)
	require.NoError(t, err)
	assert.Len(t, ab256, 36)
	other, err := deriveKey([]byte(strings.Repeat("x", 100)), AESGCM128, a.priv, b.pub, a.pub, b.pub, 0, false)
	require.NoError(t, err)
	// The IPv6 state of the pair: its own key (its own sequence numbers).
	ab6, err := deriveKey(psk, AESGCM128, a.priv, b.pub, a.pub, b.pub, 0, true)
	require.NoError(t, err)
	for _, k := range [][]byte{ba, ac, ab256[:20], other, ab6} {
		assert.NotEqual(t, abBySender, k)
	}
	// A fresh key pair (restart, rekey) gives a fresh key.
	a2, err := newKeyPair()
	require.NoError(t, err)
	fresh, err := deriveKey(psk, AESGCM128, a2.priv, b.pub, a2.pub, b.pub, 0, false)
	require.NoError(t, err)
	assert.NotEqual(t, abBySender, fresh)
}

func TestBackendDataAuth(t *testing.T) {
	psk := []byte(testPSK)
	k, err := newKeyPair()
	require.NoError(t, err)
	l := lease.Lease{
		Subnet: netip.MustParsePrefix("10.244.1.0/24"), IPv6Subnet: netip.MustParsePrefix("fd00:10:244:1::/64"),
		Attrs: lease.Attrs{BackendType: Type, PublicIP: netip.MustParseAddr("172.30.0.11"), PublicIPv6: netip.MustParseAddr("fd00::11")},
	}
	l.Attrs.BackendData, err = marshalBackendData(psk, bindingOf(l, k.pub, 7))
	require.NoError(t, err)
	assert.False(t, bytes.Contains(l.Attrs.BackendData, psk))

	got, err := parsePeerKey(psk, l)
	require.NoError(t, err)
	assert.Equal(t, publishedKey{pub: k.pub, epoch: 7}, got)

	_, err = parsePeerKey([]byte(strings.Repeat("y", 100)), l)
	assert.ErrorIs(t, err, ErrPeerAuth)

	// The (PublicKey, Epoch, Auth) of l pasted into another lease, or
	// with another epoch, does not verify.
	for name, change := range map[string]func(*lease.Lease){
		"subnet":      func(o *lease.Lease) { o.Subnet = netip.MustParsePrefix("10.244.2.0/24") },
		"ipv6 subnet": func(o *lease.Lease) { o.IPv6Subnet = netip.Prefix{} },
		"public ip":   func(o *lease.Lease) { o.Attrs.PublicIP = netip.MustParseAddr("172.30.0.12") },
		"public ipv6": func(o *lease.Lease) { o.Attrs.PublicIPv6 = netip.MustParseAddr("fd00::12") },
		"epoch": func(o *lease.Lease) {
			o.Attrs.BackendData = bytes.Replace(o.Attrs.BackendData, []byte(`"Epoch":7`), []byte(`"Epoch":8`), 1)
		},
	} {
		o := l
		change(&o)
		_, err := parsePeerKey(psk, o)
		assert.ErrorIs(t, err, ErrPeerAuth, name)
	}

	for name, raw := range map[string]string{
		"empty":     ``,
		"not json":  `{`,
		"short key": `{"PublicKey":"AAAA","Auth":"AAAA"}`,
	} {
		o := l
		o.Attrs.BackendData = json.RawMessage(raw)
		_, err := parsePeerKey(psk, o)
		assert.Error(t, err, name)
		assert.False(t, errors.Is(err, ErrPeerAuth), name)
	}
}

func TestAssignSPIs(t *testing.T) {
	recv := "R"
	var pairs []keyPairID
	for i := range 200 {
		pairs = append(pairs, keyPairID{sender: string(rune('a' + i)), receiver: recv})
	}
	got := assignSPIs(pairs, map[uint32]bool{})
	require.Len(t, got, 200)
	seen := map[uint32]bool{}
	for _, s := range got {
		assert.GreaterOrEqual(t, s, uint32(256))
		assert.False(t, seen[s], "SPIs unique per receiver")
		seen[s] = true
	}
	// Order-independent: every node computes the same.
	rev := make([]keyPairID, len(pairs))
	for i, p := range pairs {
		rev[len(pairs)-1-i] = p
	}
	assert.Equal(t, got, assignSPIs(rev, map[uint32]bool{}))

	// A collision probes further, deterministically.
	first := spiCandidate([]byte("a"), []byte(recv), 0)
	forced := assignSPIs(pairs[:1], map[uint32]bool{first: true})
	assert.Equal(t, spiCandidate([]byte("a"), []byte(recv), 1), forced[pairs[0]])
}

func TestMTU(t *testing.T) {
	for _, tc := range []struct {
		name         string
		link         int
		v6, encap    bool
		want         int
		cipherKeyLen int
	}{
		{"ipv4", 1500, false, false, 1446, 128},
		{"ipv4 udp encap", 1500, false, true, 1438, 128},
		{"ipv6", 1500, true, false, 1426, 128},
		{"ipv4 aes256 same overhead", 1500, false, false, 1446, 256},
		{"jumbo", 9000, false, false, 8946, 128},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := AESGCM128
			if tc.cipherKeyLen == 256 {
				c = AESGCM256
			}
			got := MTU(tc.link, tc.v6, tc.encap, c)
			assert.Equal(t, tc.want, got)
			// The ESP packet of an inner packet of got bytes fits.
			outer := 20
			if tc.v6 {
				outer = 40
			}
			if tc.encap {
				outer += 8
			}
			payload := (got + 2 + 3) / 4 * 4
			assert.LessOrEqual(t, outer+8+8+payload+16, tc.link)
			payload = (got + 1 + 2 + 3) / 4 * 4
			assert.Greater(t, outer+8+8+payload+16, tc.link, "one more byte would not fit")
		})
	}
}

func TestOptionsNeverPrintPSK(t *testing.T) {
	o := Options{PSK: []byte(testPSK)}.withDefaults()
	var buf strings.Builder
	log := slog.New(slog.NewTextHandler(&buf, nil))
	log.Info("x", "opts", o)
	for _, s := range []string{fmt.Sprint(o), fmt.Sprintf("%v %+v %#v %s", o, o, o, o), buf.String()} {
		assert.NotContains(t, s, "s3cr3t")
		assert.Contains(t, s, "redacted")
	}
}

func TestCipherValues(t *testing.T) {
	// String is part of the key derivation: it must never change.
	assert.Equal(t, "rfc4106(gcm(aes))-128-icv128", AESGCM128.String())
	assert.Equal(t, "rfc4106(gcm(aes))-256-icv128", AESGCM256.String())
	assert.Equal(t, 20, AESGCM128.keyLen())
	assert.Equal(t, 36, AESGCM256.keyLen())
	assert.Equal(t, "rfc4106(gcm(aes))", AESGCM256.Name())
	assert.Equal(t, 128, AESGCM256.ICVBits())
	assert.Equal(t, AESGCM128, Options{}.withDefaults().Cipher)
	assert.ErrorIs(t, Options{PSK: []byte(testPSK), Cipher: 7}.validate(), lease.ErrInvalidConfig)
	assert.Equal(t, "Cipher(7)", Cipher(7).String())
}
