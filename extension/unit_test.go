package extension_test

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/extension"
	"github.com/flannelkit/flannel/lease"
)

func TestParseCommands(t *testing.T) {
	tests := []struct {
		name, raw, wantErr string
		want               extension.Commands
	}{
		{name: "empty"},
		{name: "null", raw: `null`},
		{name: "all four", raw: `{"Type":"extension","PreStartupCommand":"a","PostStartupCommand":"b","SubnetAddCommand":"c","SubnetRemoveCommand":"d"}`,
			want: extension.Commands{PreStartup: "a", PostStartup: "b", SubnetAdd: "c", SubnetRemove: "d"}},
		{name: "keys in another case", raw: `{"type":"extension","subnetaddcommand":"c"}`, want: extension.Commands{SubnetAdd: "c"}},
		{name: "unknown key named", raw: `{"SubnetAddCommandV6":"x"}`, wantErr: "Backend.SubnetAddCommandV6: unknown key"},
		{name: "not a string", raw: `{"SubnetAddCommand":["ip","route"]}`, wantErr: "Backend.SubnetAddCommand: not a string"},
		{name: "not an object", raw: `[]`, wantErr: "Backend:"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := extension.ParseCommands(json.RawMessage(tc.raw))
			if tc.wantErr != "" {
				assert.ErrorContains(t, err, tc.wantErr)
				assert.ErrorIs(t, err, lease.ErrInvalidConfig)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestRegistryBuildsExtension(t *testing.T) {
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"extension","SubnetAddCommand":"true"}}`))
	require.NoError(t, err)
	r := backend.NewRegistry()
	require.NoError(t, r.Register(extension.Type, extension.FromConfig))
	b, err := r.New(cfg)
	require.NoError(t, err)
	assert.Equal(t, extension.Type, b.Type())
	_, err = r.New(lease.Config{BackendType: "extension", Backend: json.RawMessage(`{"Type":"extension","VNI":1}`)})
	assert.ErrorContains(t, err, "Backend.VNI")
	_, err = extension.FromConfig(lease.Config{BackendType: "vxlan"})
	assert.ErrorIs(t, err, lease.ErrInvalidConfig)
}

func TestArgv(t *testing.T) {
	env := []string{"PATH=/bin", "HOME=/root"}
	vars := []string{"SUBNET=10.244.1.0/24", "PUBLIC_IP=172.30.0.11", "EVIL=a; rm -rf / $(x)"}
	tests := []struct {
		line string
		want []string
	}{
		{"ip route add $SUBNET via ${PUBLIC_IP}", []string{"ip", "route", "add", "10.244.1.0/24", "via", "172.30.0.11"}},
		{"  echo   x  ", []string{"echo", "x"}},
		{"echo $EVIL", []string{"echo", "a; rm -rf / $(x)"}}, // one word, never re-split
		{"echo ${HOME}/x $NOPE-", []string{"echo", "/root/x", "-"}},
		{"", []string{}},
	}
	for _, tc := range tests {
		assert.Equal(t, tc.want, extension.Argv(tc.line, vars, env), tc.line)
	}
}
