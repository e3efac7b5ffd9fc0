package etcdstore_test

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/storetest"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

// roundTrip checks that a client works: config written and read back.
func roundTrip(t *testing.T, opts etcdstore.ClientOptions) {
	t.Helper()
	c, err := etcdstore.NewClient(opts)
	require.NoError(t, err)
	defer c.Close()
	s, err := etcdstore.New(c, etcdstore.Options{})
	require.NoError(t, err)
	require.NoError(t, s.PutConfig(t.Context(), []byte(netConf)))
	_, err = s.Config(t.Context())
	require.NoError(t, err)
}

func TestNewClientTLS(t *testing.T) {
	t.Parallel()
	mtls := etcdtest.NewT(t, etcdtest.Options{ClientCertAuth: true})
	caOnly := etcdtest.NewT(t, etcdtest.Options{TLS: true})
	other, err := etcdtest.WriteCerts(t.TempDir())
	require.NoError(t, err)
	missing := filepath.Join(t.TempDir(), "nope.crt")

	tests := []struct {
		name    string
		opts    etcdstore.ClientOptions
		wantErr []string // substrings; none: must work
	}{
		{name: "client certificate", opts: etcdstore.ClientOptions{Endpoints: mtls.Endpoints,
			CAFile: mtls.Certs.CAFile, CertFile: mtls.Certs.ClientCertFile, KeyFile: mtls.Certs.ClientKeyFile}},
		{name: "ca only", opts: etcdstore.ClientOptions{Endpoints: caOnly.Endpoints, CAFile: caOnly.Certs.CAFile}},
		{name: "wrong ca", opts: etcdstore.ClientOptions{Endpoints: caOnly.Endpoints, CAFile: other.CAFile},
			wantErr: []string{"not signed by a CA in " + other.CAFile}},
		{name: "wrong ca with client certificate", opts: etcdstore.ClientOptions{Endpoints: mtls.Endpoints,
			CAFile: other.CAFile, CertFile: mtls.Certs.ClientCertFile, KeyFile: mtls.Certs.ClientKeyFile},
			wantErr: []string{"not signed by a CA in " + other.CAFile}},
		{name: "system roots", opts: etcdstore.ClientOptions{Endpoints: caOnly.Endpoints},
			wantErr: []string{"not signed by a CA in the system roots"}},
		{name: "client certificate required", opts: etcdstore.ClientOptions{Endpoints: mtls.Endpoints, CAFile: mtls.Certs.CAFile},
			wantErr: []string{"certificate"}},
		{name: "client certificate of another ca", opts: etcdstore.ClientOptions{Endpoints: mtls.Endpoints,
			CAFile: mtls.Certs.CAFile, CertFile: other.ClientCertFile, KeyFile: other.ClientKeyFile},
			wantErr: []string{"rejected the client certificate", other.ClientCertFile}},
		{name: "missing ca file", opts: etcdstore.ClientOptions{Endpoints: caOnly.Endpoints, CAFile: missing},
			wantErr: []string{missing}},
		{name: "ca file without certificates", opts: etcdstore.ClientOptions{Endpoints: caOnly.Endpoints, CAFile: mtls.Certs.ClientKeyFile},
			wantErr: []string{"CA file " + mtls.Certs.ClientKeyFile}},
		{name: "certificate without key", opts: etcdstore.ClientOptions{Endpoints: mtls.Endpoints,
			CAFile: mtls.Certs.CAFile, CertFile: mtls.Certs.ClientCertFile}, wantErr: []string{"must be given together"}},
		{name: "key does not match", opts: etcdstore.ClientOptions{Endpoints: mtls.Endpoints,
			CAFile: mtls.Certs.CAFile, CertFile: mtls.Certs.ClientCertFile, KeyFile: other.ClientKeyFile},
			wantErr: []string{mtls.Certs.ClientCertFile, other.ClientKeyFile}},
		{name: "no endpoints", wantErr: []string{"no endpoints"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.opts.DialTimeout = 2 * time.Second
			if len(tt.wantErr) == 0 {
				roundTrip(t, tt.opts)
				return
			}
			c, err := etcdstore.NewClient(tt.opts)
			if err == nil {
				c.Close()
			}
			require.Error(t, err)
			t.Logf("error: %v", err)
			for _, want := range tt.wantErr {
				assert.Contains(t, err.Error(), want)
			}
		})
	}
}

func TestPasswordNeverLogged(t *testing.T) {
	t.Parallel()
	const password = "hunter2-Zq9"
	srv := etcdtest.NewT(t, etcdtest.Options{RootPassword: password})
	logs := &testenv.LogBuffer{}
	log := logs.Logger()
	// A long dial timeout: the embedded server checks passwords with bcrypt,
	// which under -race on a loaded machine takes seconds.
	opts := etcdstore.ClientOptions{Endpoints: srv.Endpoints, Username: etcdtest.RootUser, Password: password, Logger: log, DialTimeout: 60 * time.Second}

	// Formatting or logging the options never shows the password.
	log.Info("connecting", "etcd", opts)
	for _, s := range []string{fmt.Sprint(opts), fmt.Sprintf("%v %+v %#v %s", opts, opts, opts, opts)} {
		assert.NotContains(t, s, password)
		assert.Contains(t, s, "<redacted>")
	}

	// Wrong password: a clear error without either password.
	bad := opts
	bad.Password = "wrong-Xy7"
	_, err := etcdstore.NewClient(bad)
	require.Error(t, err)
	t.Logf("error: %v", err)
	assert.NotContains(t, err.Error(), bad.Password)
	assert.NotContains(t, err.Error(), password)
	assert.Contains(t, strings.ToLower(err.Error()), "authentication failed")

	// Right password: the store works and its logs stay clean.
	c, err := etcdstore.NewClient(opts)
	require.NoError(t, err)
	defer c.Close()
	s, err := etcdstore.New(c, etcdstore.Options{Logger: log})
	require.NoError(t, err)
	require.NoError(t, s.PutConfig(t.Context(), []byte(netConf)))
	l, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs(1)})
	require.NoError(t, err)
	w := storetest.Watch(t, s)
	w.WaitFor(t, "own lease", storetest.HasKey(l.Key()))
	w.Stop(t)
	require.NoError(t, s.Release(t.Context(), l))

	out := logs.String()
	assert.NotEmpty(t, out)
	assert.NotContains(t, out, password)
	assert.NotContains(t, out, bad.Password)
}
