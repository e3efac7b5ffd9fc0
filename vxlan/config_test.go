package vxlan

import (
	"context"
	"encoding/json"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/lease"
)

func TestParseOptions(t *testing.T) {
	tests := []struct {
		name    string
		raw     string
		want    Options
		wantErr string
	}{
		{name: "absent"},
		{name: "null", raw: `null`},
		{name: "type only", raw: `{"Type":"vxlan"}`},
		{name: "every key", raw: `{"Type":"vxlan","VNI":42,"Port":4789,"GBP":true,"Learning":true,"DirectRouting":true,"MTU":9000}`,
			want: Options{VNI: 42, Port: 4789, GBP: true, Learning: true, DirectRouting: true, MTU: 9000}},
		{name: "keys in any case", raw: `{"type":"vxlan","vni":7,"port":4789,"directrouting":true}`,
			want: Options{VNI: 7, Port: 4789, DirectRouting: true}},
		{name: "unknown key", raw: `{"Type":"vxlan","PSK":"x"}`, wantErr: "Backend.PSK: unknown key"},
		{name: "windows keys accepted, ignored", raw: `{"Type":"vxlan","Name":"vxlan0","macprefix":"0E-2A","VNI":4096}`,
			want: Options{VNI: 4096, Ignored: []string{"MacPrefix", "Name"}}},
		{name: "vni zero", raw: `{"VNI":0}`, wantErr: "Backend.VNI: 0 out of range 1..16777215"},
		{name: "vni too big", raw: `{"VNI":16777216}`, wantErr: "Backend.VNI"},
		{name: "vni fraction", raw: `{"VNI":1.5}`, wantErr: "Backend.VNI: not an integer"},
		{name: "vni string", raw: `{"VNI":"1"}`, wantErr: "Backend.VNI: not a number"},
		{name: "port range", raw: `{"Port":70000}`, wantErr: "Backend.Port"},
		{name: "mtu small", raw: `{"MTU":100}`, wantErr: "Backend.MTU"},
		{name: "gbp not bool", raw: `{"GBP":"yes"}`, wantErr: "Backend.GBP: a JSON string where a bool is expected"},
		{name: "not an object", raw: `[1]`, wantErr: "Backend:"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseOptions(json.RawMessage(tc.raw))
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.wantErr)
				assert.ErrorIs(t, err, lease.ErrInvalidConfig)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestFromConfigAndRegistry(t *testing.T) {
	r := backend.NewRegistry()
	require.NoError(t, r.Register(Type, FromConfig))
	b, err := r.New(lease.Config{Backend: json.RawMessage(`{"Type":"vxlan","VNI":3}`)})
	require.NoError(t, err)
	assert.Equal(t, "vxlan", b.Type())
	opts := b.(*Backend).opts
	assert.Equal(t, 3, opts.VNI)
	assert.Equal(t, DefaultPort, opts.Port)
	assert.Equal(t, DefaultRepairInterval, opts.RepairInterval)
	assert.Equal(t, DefaultResyncInterval, opts.ResyncInterval, "the daemon's default: a rare full resync")
	assert.Equal(t, time.Second, Options{RepairInterval: time.Second}.withDefaults().ResyncInterval, "a caller's RepairInterval alone: every tick")
	assert.Equal(t, time.Minute, Options{RepairInterval: time.Second, ResyncInterval: time.Minute}.withDefaults().ResyncInterval)
	_, err = r.New(lease.Config{BackendType: "vxlan", Backend: json.RawMessage(`{"Type":"vxlan","Foo":1}`)})
	assert.ErrorContains(t, err, "Backend.Foo")
	_, err = FromConfig(lease.Config{BackendType: "host-gw"})
	assert.ErrorIs(t, err, lease.ErrInvalidConfig)
	_, err = New(Options{VtepMAC: net.HardwareAddr{1, 2, 3, 4, 5, 6}})
	assert.ErrorContains(t, err, "multicast")
}

func TestBackendDataWire(t *testing.T) {
	mac, _ := net.ParseMAC("7a:1e:6c:d2:4a:09")
	b, err := json.Marshal(BackendData{VNI: 1, VtepMAC: mac})
	require.NoError(t, err)
	assert.Equal(t, `{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:09"}`, string(b))
	// Byte-compatible inside the etcd value upstream writes.
	a := lease.Attrs{BackendType: Type, BackendData: b}
	a.PublicIP = mustAddr("192.168.1.11")
	v, err := json.Marshal(a)
	require.NoError(t, err)
	assert.Equal(t, `{"PublicIP":"192.168.1.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:09"}}`, string(v))

	tests := []struct {
		name, raw, wantErr string
	}{
		{name: "upstream", raw: `{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:09"}`},
		{name: "lower-case keys", raw: `{"vni":1,"vtepmac":"7a:1e:6c:d2:4a:09"}`},
		{name: "empty", raw: ``, wantErr: "no vxlan backend data"},
		{name: "no mac", raw: `{"VNI":1}`, wantErr: "no VtepMAC"},
		{name: "bad mac", raw: `{"VNI":1,"VtepMAC":"zz"}`, wantErr: "VtepMAC"},
		{name: "multicast mac", raw: `{"VtepMAC":"01:00:5e:00:00:01"}`, wantErr: "multicast"},
		{name: "long mac", raw: `{"VtepMAC":"00:00:00:00:fe:80:00:00:00:00:00:00:02:00:5e:10:00:00:00:01"}`, wantErr: "6-byte"},
		{name: "not json", raw: `{`, wantErr: "vxlan backend data"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d, err := ParseBackendData(json.RawMessage(tc.raw))
			if tc.wantErr != "" {
				assert.ErrorContains(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, mac, d.VtepMAC)
		})
	}
}

func TestPreconditions(t *testing.T) {
	ctx := context.Background()
	b, err := New(Options{})
	require.NoError(t, err)
	_, err = b.Prepare(ctx, flannel.Env{})
	assert.ErrorContains(t, err, "no netlink handle")
	_, err = b.Start(ctx, lease.Lease{})
	assert.ErrorContains(t, err, "Prepare was not called")
	assert.ErrorContains(t, b.Cleanup(ctx, flannel.Env{}), "no netlink handle")
}

func FuzzParseBackendData(f *testing.F) {
	f.Add([]byte(`{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:09"}`))
	f.Add([]byte(`{"VtepMAC":"01:00:5e:00:00:01"}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		d, err := ParseBackendData(raw)
		if err != nil {
			return
		}
		// What parses re-encodes to something that parses the same.
		b, err := json.Marshal(d)
		require.NoError(t, err)
		d2, err := ParseBackendData(b)
		require.NoError(t, err)
		assert.Equal(t, d.VtepMAC, d2.VtepMAC)
		assert.Len(t, d.VtepMAC, 6)
	})
}

func FuzzParseOptions(f *testing.F) {
	f.Add([]byte(`{"Type":"vxlan","VNI":42,"Port":4789,"GBP":true,"Learning":true,"DirectRouting":true,"MTU":9000}`))
	f.Add([]byte(`{"vni":1.0e3}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		o, err := ParseOptions(raw)
		if err != nil {
			assert.ErrorIs(t, err, lease.ErrInvalidConfig)
			return
		}
		// Whatever parses builds a backend.
		_, err = New(o)
		require.NoError(t, err)
	})
}
