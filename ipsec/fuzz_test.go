package ipsec

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/flannelkit/flannel/lease"
)

// FuzzParseConfig: ParseConfig never panics, its errors wrap
// lease.ErrInvalidConfig and never quote the PSK, and what it accepts is
// valid with a RekeyInterval in range.
func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{
		``, `null`, `{}`, `[]`, `{"PSK":1}`,
		`{"Type":"ipsec","PSK":"` + testPSK + `","UDPEncap":true,"ESPProposal":"aes256gcm16","RekeyInterval":"30m"}`,
		`{"PSK":"` + testPSK + `","RekeyInterval":90}`,
		`{"PSK":"` + testPSK + `","psk":"` + testPSK + `"}`,
		`{"PSK":"` + testPSK + `","RekeyInterval":1e300}`,
		`{"PSK":"` + testPSK + `","ESPProposal":"rfc4106(gcm(aes))-256"}`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		o, err := ParseConfig(json.RawMessage(s))
		if err != nil {
			if !errors.Is(err, lease.ErrInvalidConfig) {
				t.Fatalf("error does not wrap ErrInvalidConfig: %v", err)
			}
			if len(o.PSK) >= MinPSKLen && strings.Contains(err.Error(), string(o.PSK)) {
				t.Fatalf("error quotes the PSK: %v", err)
			}
			return
		}
		if err := o.withDefaults().validate(); err != nil {
			t.Fatalf("accepted options do not validate: %v", err)
		}
		if o.RekeyInterval != 0 && (o.RekeyInterval < time.Second || o.RekeyInterval > MaxRekeyInterval) {
			t.Fatalf("RekeyInterval %v out of range", o.RekeyInterval)
		}
	})
}

// FuzzParsePeerKey: parsePeerKey never panics on any BackendData, accepts
// only a 32-byte key whose tag verifies for the lease, and accepts what
// marshalBackendData made for the lease.
func FuzzParsePeerKey(f *testing.F) {
	psk := []byte(testPSK)
	l := lease.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), Attrs: lease.Attrs{BackendType: Type, PublicIP: netip.MustParseAddr("172.30.0.11")}}
	k, err := newKeyPair()
	if err != nil {
		f.Fatal(err)
	}
	good, err := marshalBackendData(psk, bindingOf(l, k.pub, 3))
	if err != nil {
		f.Fatal(err)
	}
	for _, s := range []string{string(good), ``, `{`, `null`, `{"PublicKey":"AAAA","Auth":"AAAA"}`, `{"PublicKey":null,"Epoch":-1}`, `{"Epoch":1e30}`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		o := l
		o.Attrs.BackendData = json.RawMessage(s)
		pk, err := parsePeerKey(psk, o)
		if err != nil {
			return
		}
		if len(pk.pub) != 32 {
			t.Fatalf("accepted a key of %d bytes", len(pk.pub))
		}
		again, err := marshalBackendData(psk, bindingOf(l, pk.pub, pk.epoch))
		if err != nil {
			t.Fatal(err)
		}
		o.Attrs.BackendData = again
		if back, err := parsePeerKey(psk, o); err != nil || back.epoch != pk.epoch {
			t.Fatalf("re-marshalled data does not verify: %v", err)
		}
	})
}
