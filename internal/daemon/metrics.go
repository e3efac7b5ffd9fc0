package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// Metrics holds the daemon's Prometheus metrics and serves /healthz,
// /readyz and /metrics. It may serve before the agent exists (SetAgent).
type Metrics struct {
	agent atomic.Pointer[flannel.Agent]
	lease atomic.Pointer[func(ctx context.Context, own lease.Lease) (time.Time, error)]

	reg          *prometheus.Registry
	applies      prometheus.Counter
	applyErrors  prometheus.Counter
	applyTime    prometheus.Histogram
	watchRestart prometheus.Counter
	keepErrors   prometheus.Counter
	leaseLost    prometheus.Counter
	renewals     prometheus.Counter

	mu      sync.Mutex
	runErr  error
	runDone bool

	// cache holds the last expiry read for a lease, so that a scrape does
	// not cost store round trips; a renewal (LeaseRenewed) or another
	// lease makes it stale.
	cache struct {
		sync.Mutex
		subnet, subnetV6 string
		at               time.Time
		valid            bool
	}

	// WedgedAfter is how long one Apply of the peers may run before
	// /healthz fails (the kernel or a netlink socket is stuck and a restart
	// is the cure). Set before serving; NewMetrics sets DefaultWedgedAfter.
	WedgedAfter time.Duration
}

// DefaultWedgedAfter is Metrics.WedgedAfter's default: far above the
// seconds that programming tens of thousands of peers takes.
const DefaultWedgedAfter = 5 * time.Minute

// wedged reports whether the agent has been applying one peer set for
// longer than after, and for how long.
func wedged(st flannel.State, now time.Time, after time.Duration) (time.Duration, bool) {
	if st.ApplyingSince.IsZero() || after <= 0 {
		return 0, false
	}
	took := now.Sub(st.ApplyingSince)
	return took, took > after
}

// NewMetrics registers the metrics on a registry of their own, with the Go
// and process collectors.
func NewMetrics() *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry(), WedgedAfter: DefaultWedgedAfter}
	m.applies = prometheus.NewCounter(prometheus.CounterOpts{Name: "flannel_reconcile_total", Help: "Peer sets applied to the kernel."})
	m.applyErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "flannel_reconcile_errors_total", Help: "Peer sets whose application failed (kernel operation errors), in whole or for some peers."})
	m.applyTime = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "flannel_reconcile_duration_seconds", Help: "Time to apply a peer set.", Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10)})
	m.watchRestart = prometheus.NewCounter(prometheus.CounterOpts{Name: "flannel_store_watch_restarts_total", Help: "Restarts of the lease store watch after it failed."})
	m.keepErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "flannel_lease_keep_errors_total", Help: "Failures to keep (renew) the node's lease, including losses."})
	m.leaseLost = prometheus.NewCounter(prometheus.CounterOpts{Name: "flannel_lease_lost_total", Help: "Times the node's lease was lost and re-acquired."})
	m.renewals = prometheus.NewCounter(prometheus.CounterOpts{Name: "flannel_lease_renewals_total", Help: "Renewals of the node's lease by the store."})
	m.reg.MustRegister(m.renewals, m.applies, m.applyErrors, m.applyTime, m.watchRestart, m.keepErrors, m.leaseLost,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "flannel_peers", Help: "Peers in the last set applied to the kernel."}, func() float64 {
			if a := m.agent.Load(); a != nil {
				return float64(a.State().Peers)
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "flannel_ready", Help: "1 when the node is ready (lease held, rules and subnet.env in place, peers programmed)."}, func() float64 {
			if a := m.agent.Load(); a != nil && a.State().Ready {
				return 1
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "flannel_lease_expiry_timestamp_seconds", Help: "When the node's lease expires unless renewed (Unix time; 0 when unknown or it never expires)."}, m.expiry),
	)
	return m
}

// Hook sets the Agent callbacks that feed the metrics on opts.
func (m *Metrics) Hook(opts *flannel.AgentOptions) {
	opts.OnApply = func(_ int, took time.Duration, err error) {
		m.applies.Inc()
		m.applyTime.Observe(took.Seconds())
		if err != nil {
			m.applyErrors.Inc()
		}
	}
	opts.OnWatchRestart = func(error) { m.watchRestart.Inc() }
	opts.OnKeepError = func(err error) {
		m.keepErrors.Inc()
		if errors.Is(err, lease.ErrLeaseLost) {
			m.leaseLost.Inc()
		}
	}
}

// RunDone records that the agent's Run returned (healthz fails when err is
// not nil).
func (m *Metrics) RunDone(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.runDone, m.runErr = true, err
}

// SetAgent sets the agent whose state the endpoints and gauges report.
func (m *Metrics) SetAgent(a *flannel.Agent) { m.agent.Store(a) }

// SetLeaseExpiry sets the function that reports when the node's lease
// expires (zero time when unknown or never).
func (m *Metrics) SetLeaseExpiry(fn func(ctx context.Context, own lease.Lease) (time.Time, error)) {
	m.lease.Store(&fn)
}

func (m *Metrics) expiry() float64 {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if t, ok := m.leaseExpiry(ctx); ok {
		return float64(t.Unix())
	}
	return 0
}

// leaseExpiry reports when the agent's current lease expires; false when
// unknown (no agent or lease yet, a store without expiry, an error). The
// store is asked once per lease and renewal, not on every scrape.
func (m *Metrics) leaseExpiry(ctx context.Context) (time.Time, bool) {
	a, fn := m.agent.Load(), m.lease.Load()
	if a == nil || fn == nil {
		return time.Time{}, false
	}
	own := a.State().Lease
	if !own.Subnet.IsValid() && !own.IPv6Subnet.IsValid() {
		return time.Time{}, false
	}
	c := &m.cache
	c.Lock()
	defer c.Unlock()
	v4, v6 := own.Subnet.String(), own.IPv6Subnet.String()
	if c.valid && c.subnet == v4 && c.subnetV6 == v6 {
		return c.at, !c.at.IsZero()
	}
	t, err := (*fn)(ctx, own)
	if err != nil {
		return time.Time{}, false // asked again at the next scrape
	}
	c.subnet, c.subnetV6, c.at, c.valid = v4, v6, t, true
	return t, !t.IsZero()
}

// LeaseRenewed counts a renewal of the node's lease (the store's OnRenew)
// and makes the cached expiry stale.
func (m *Metrics) LeaseRenewed(string) {
	m.renewals.Inc()
	m.cache.Lock()
	m.cache.valid = false
	m.cache.Unlock()
}

// Handler serves /healthz (200 while the agent runs without a fatal
// error and no Apply has run for longer than WedgedAfter), /readyz (200 once the agent is ready: lease held, rules ensured,
// subnet.env written, first peer set programmed) and /metrics.
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		m.mu.Lock()
		done, err := m.runDone, m.runErr
		m.mu.Unlock()
		if done && err != nil {
			http.Error(w, fmt.Sprintf("agent stopped: %v", err), http.StatusInternalServerError)
			return
		}
		if a := m.agent.Load(); a != nil {
			if took, ok := wedged(a.State(), time.Now(), m.WedgedAfter); ok {
				http.Error(w, fmt.Sprintf("applying peers for %s: wedged", took.Round(time.Second)), http.StatusInternalServerError)
				return
			}
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		a := m.agent.Load()
		if a == nil || !a.State().Ready {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		st := a.State()
		fmt.Fprintf(w, "ready: lease %s, %d peers\n", st.Lease, st.Peers)
	})
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	return mux
}
