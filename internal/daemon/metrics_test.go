package daemon

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	return rec.Code, rec.Body.String()
}

func TestMetricsEndpoints(t *testing.T) {
	t.Parallel()
	m := NewMetrics()
	h := m.Handler()
	code, _ := get(t, h, "/healthz")
	assert.Equal(t, http.StatusOK, code)
	code, _ = get(t, h, "/readyz")
	assert.Equal(t, http.StatusServiceUnavailable, code, "no agent yet")

	var opts flannel.AgentOptions
	m.Hook(&opts)
	opts.OnApply(3, 2*time.Millisecond, nil)
	opts.OnApply(3, time.Millisecond, &flannel.PeerError{Err: errors.New("boom")})
	opts.OnWatchRestart(errors.New("gone"))
	opts.OnKeepError(errors.New("etcd down"))
	opts.OnKeepError(lease.ErrLeaseLost)

	code, body := get(t, h, "/metrics")
	require.Equal(t, http.StatusOK, code)
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	require.NoError(t, err)
	val := func(name string) float64 {
		f, ok := fams[name]
		require.True(t, ok, "metric %s missing", name)
		mt := f.GetMetric()[0]
		switch {
		case mt.Counter != nil:
			return mt.Counter.GetValue()
		case mt.Gauge != nil:
			return mt.Gauge.GetValue()
		case mt.Histogram != nil:
			return float64(mt.Histogram.GetSampleCount())
		}
		return -1
	}
	assert.Equal(t, 2.0, val("flannel_reconcile_total"))
	assert.Equal(t, 1.0, val("flannel_reconcile_errors_total"))
	assert.Equal(t, 2.0, val("flannel_reconcile_duration_seconds"))
	assert.Equal(t, 1.0, val("flannel_store_watch_restarts_total"))
	assert.Equal(t, 2.0, val("flannel_lease_keep_errors_total"))
	assert.Equal(t, 1.0, val("flannel_lease_lost_total"))
	assert.Equal(t, 0.0, val("flannel_peers"))
	assert.Equal(t, 0.0, val("flannel_ready"))
	assert.Equal(t, 0.0, val("flannel_lease_expiry_timestamp_seconds"))
	assert.Equal(t, 0.0, val("flannel_lease_renewals_total"))
	m.LeaseRenewed("/coreos.com/network/subnets/10.244.1.0-24")
	m.LeaseRenewed("/coreos.com/network/subnets/10.244.1.0-24")
	_, body = get(t, h, "/metrics")
	assert.Contains(t, body, "flannel_lease_renewals_total 2\n")

	m.RunDone(errors.New("network failed"))
	code, body = get(t, h, "/healthz")
	assert.Equal(t, http.StatusInternalServerError, code)
	assert.Contains(t, body, "network failed")
}

func TestRegistryLinksBackends(t *testing.T) {
	t.Parallel()
	r, err := Registry(Config{WireguardKeyFile: "/nonexistent/wgkey"})
	require.NoError(t, err)
	assert.Equal(t, []string{"alloc", "extension", "host-gw", "ipip", "ipsec", "vxlan", "wireguard"}, r.Types())
}
