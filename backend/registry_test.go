package backend

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

type fakeBackend struct{ typ string }

func (f fakeBackend) Type() string { return f.typ }
func (fakeBackend) Prepare(context.Context, flannel.Env) (lease.Attrs, error) {
	return lease.Attrs{}, nil
}
func (fakeBackend) Start(context.Context, lease.Lease) (flannel.Network, error) { return nil, nil }
func (fakeBackend) Cleanup(context.Context, flannel.Env) error                  { return nil }

func TestRegistry(t *testing.T) {
	r := NewRegistry()
	mk := func(typ string) Constructor {
		return func(lease.Config) (flannel.Backend, error) { return fakeBackend{typ}, nil }
	}
	require.NoError(t, r.Register("vxlan", mk("vxlan")))
	require.NoError(t, r.Register("host-gw", mk("host-gw")))
	require.NoError(t, r.Register("broken", func(lease.Config) (flannel.Backend, error) {
		return nil, errors.New("unknown key \"Port\"")
	}))

	tests := []struct {
		name    string
		typ     string
		want    string
		wantErr string
		unknown bool
	}{
		{name: "registered", typ: "host-gw", want: "host-gw"},
		{name: "empty means vxlan", typ: "", want: "vxlan"},
		{name: "unknown lists known", typ: "udp", wantErr: `unknown backend type "udp" (known: broken, host-gw, vxlan)`, unknown: true},
		{name: "constructor error names type", typ: "broken", wantErr: `backend "broken": unknown key "Port"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, err := r.New(lease.Config{BackendType: tc.typ})
			if tc.wantErr != "" {
				require.EqualError(t, err, tc.wantErr)
				assert.Equal(t, tc.unknown, errors.Is(err, ErrUnknownBackend))
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, b.Type())
		})
	}

	assert.Error(t, r.Register("vxlan", mk("vxlan")), "duplicate")
	assert.Error(t, r.Register("", mk("x")), "empty type")
	assert.Error(t, r.Register("x", nil), "nil constructor")
	assert.Equal(t, []string{"broken", "host-gw", "vxlan"}, r.Types())

	_, err := NewRegistry().New(lease.Config{BackendType: "vxlan"})
	assert.EqualError(t, err, `unknown backend type "vxlan" (none registered)`)

	var zero Registry // the zero value works too
	require.NoError(t, zero.Register("host-gw", mk("host-gw")))
}

func TestWarnIgnoredKeys(t *testing.T) {
	var buf testenv.LogBuffer
	WarnIgnoredKeys(slog.New(slog.NewTextHandler(&buf, nil)), "vxlan", []string{"MacPrefix", "Name"})
	out := buf.String()
	assert.Contains(t, out, "key=Backend.MacPrefix")
	assert.Contains(t, out, "key=Backend.Name")
	assert.Equal(t, 2, strings.Count(out, "upstream uses it on Windows only"))
}
