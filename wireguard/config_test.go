package wireguard

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/lease"
)

var testPSK = []byte("0123456789abcdef0123456789abcdef")

func TestParseConfig(t *testing.T) {
	psk := base64.StdEncoding.EncodeToString(testPSK)
	tests := []struct {
		name    string
		raw     string
		want    Options
		wantErr string
	}{
		{name: "absent"},
		{name: "null", raw: `null`},
		{name: "type only", raw: `{"Type":"wireguard"}`},
		{name: "every key", raw: `{"Type":"wireguard","PSK":"` + psk + `","ListenPort":51000,"ListenPortV6":51001,"MTU":9000,"PersistentKeepaliveInterval":25,"Mode":"auto"}`,
			want: Options{PSK: testPSK, ListenPort: 51000, ListenPortV6: 51001, MTU: 9000, PersistentKeepalive: 25 * time.Second, Mode: ModeAuto}},
		{name: "k3s wireguard-native", raw: `{"Type":"wireguard","PersistentKeepaliveInterval":25}`, want: Options{PersistentKeepalive: 25 * time.Second}},
		{name: "keys in any case", raw: `{"type":"wireguard","listenport":1234,"mode":"ipv6","psk":""}`, want: Options{ListenPort: 1234, Mode: ModeIPv6}},
		{name: "modes", raw: `{"Mode":"separate"}`, want: Options{Mode: ModeSeparate}},
		{name: "mode ipv4", raw: `{"Mode":"ipv4"}`, want: Options{Mode: ModeIPv4}},
		{name: "empty mode is separate", raw: `{"Mode":""}`, want: Options{Mode: ModeSeparate}},
		{name: "unknown key", raw: `{"Type":"wireguard","VNI":1}`, wantErr: "Backend.VNI: unknown key for the wireguard backend"},
		{name: "other type", raw: `{"Type":"vxlan"}`, wantErr: "Backend.Type"},
		{name: "bad mode", raw: `{"Mode":"both"}`, wantErr: `Backend.Mode: "both" unknown`},
		{name: "mode not a string", raw: `{"Mode":1}`, wantErr: "Backend.Mode: want a string"},
		{name: "port zero", raw: `{"ListenPort":0}`, wantErr: "Backend.ListenPort: 0 out of range 1..65535"},
		{name: "port big", raw: `{"ListenPortV6":65536}`, wantErr: "Backend.ListenPortV6: 65536 out of range"},
		{name: "port string", raw: `{"ListenPort":"51820"}`, wantErr: "Backend.ListenPort: not a number"},
		{name: "port fraction", raw: `{"ListenPort":1.5}`, wantErr: "Backend.ListenPort: not an integer"},
		{name: "mtu small", raw: `{"MTU":576}`, wantErr: "Backend.MTU: 576 out of range 1280..65535"},
		{name: "keepalive negative", raw: `{"PersistentKeepaliveInterval":-1}`, wantErr: "Backend.PersistentKeepaliveInterval: -1 out of range"},
		{name: "keepalive string", raw: `{"PersistentKeepaliveInterval":"25s"}`, wantErr: "Backend.PersistentKeepaliveInterval: not a number"},
		{name: "psk not base64", raw: `{"PSK":"not-a-secret-but-secretish!"}`, wantErr: "Backend.PSK: not base64 of 32 bytes"},
		{name: "psk short", raw: `{"PSK":"` + base64.StdEncoding.EncodeToString(testPSK[:16]) + `"}`, wantErr: "Backend.PSK: not base64 of 32 bytes"},
		{name: "psk number", raw: `{"PSK":5}`, wantErr: "Backend.PSK: want a string"},
		{name: "not an object", raw: `[1]`, wantErr: "Backend: not a JSON object"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseConfig(json.RawMessage(tc.raw))
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.wantErr)
				assert.ErrorIs(t, err, lease.ErrInvalidConfig)
				assert.NotContains(t, err.Error(), "secretish")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestOptionsDefaultsAndRedaction(t *testing.T) {
	b, err := New(Options{PSK: testPSK})
	require.NoError(t, err)
	o := b.opts
	assert.Equal(t, DefaultListenPort, o.ListenPort)
	assert.Equal(t, DefaultListenPortV6, o.ListenPortV6)
	assert.Equal(t, ModeSeparate, o.Mode)
	assert.Equal(t, DefaultRepairInterval, o.RepairInterval)
	assert.Zero(t, o.PersistentKeepalive)
	secret := base64.StdEncoding.EncodeToString(testPSK)
	for _, s := range []string{o.String(), fmt.Sprintf("%v %+v %#v", o, o, o), o.LogValue().String()} {
		assert.NotContains(t, s, secret)
		assert.Contains(t, s, "<redacted>")
	}
	_, err = New(Options{PSK: []byte("short")})
	assert.ErrorContains(t, err, "Backend.PSK: a key of 5 bytes")
	_, err = New(Options{PersistentKeepalive: 1500 * time.Millisecond})
	assert.ErrorContains(t, err, "not whole seconds")
}

func TestFromConfigAndRegistry(t *testing.T) {
	r := backend.NewRegistry()
	require.NoError(t, r.Register(Type, Constructor(Options{KeyFile: "/nonexistent/dir/key", RepairInterval: time.Second})))
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","ListenPort":5000,"PersistentKeepaliveInterval":25}}`))
	require.NoError(t, err)
	b, err := r.New(cfg)
	require.NoError(t, err)
	wb := b.(*Backend)
	assert.Equal(t, Type, wb.Type())
	assert.Equal(t, 5000, wb.opts.ListenPort)
	assert.Equal(t, 25*time.Second, wb.opts.PersistentKeepalive)
	assert.Equal(t, "/nonexistent/dir/key", wb.opts.KeyFile, "the constructor's key file")
	assert.Equal(t, time.Second, wb.opts.RepairInterval)

	cfg, err = lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","Mode":"sideways"}}`))
	require.NoError(t, err)
	_, err = r.New(cfg)
	assert.ErrorIs(t, err, lease.ErrInvalidConfig)
	assert.ErrorContains(t, err, "Backend.Mode")

	_, err = FromConfig(lease.Config{BackendType: "vxlan"})
	assert.ErrorContains(t, err, `Backend.Type "vxlan" is not "wireguard"`)
	var _ flannel.Backend = wb
}

// FuzzParseConfig: ParseConfig never panics, fails only with an error
// wrapping lease.ErrInvalidConfig that names a Backend key, and what it
// accepts builds a Backend.
func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{``, `null`, `{"Type":"wireguard"}`, `{"PSK":"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=","Mode":"auto"}`,
		`{"ListenPort":1,"ListenPortV6":65535,"MTU":1280,"PersistentKeepaliveInterval":0}`, `{"mode":"IPV4"}`, `[]`, `{"x":{}}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		o, err := ParseConfig(raw)
		if err != nil {
			if !errors.Is(err, lease.ErrInvalidConfig) || !strings.Contains(err.Error(), "Backend") {
				t.Fatalf("error %v does not wrap ErrInvalidConfig or name the key", err)
			}
			return
		}
		if _, err := New(o); err != nil {
			t.Fatalf("accepted %q but New fails: %v", raw, err)
		}
	})
}
