package flannel

import (
	"time"

	"github.com/flannelkit/flannel/internal/retry"
	"github.com/flannelkit/flannel/lease"
)

// mutable is what changes in an Agent while it runs. It is guarded by
// Agent.mu and written only through update.
type mutable struct {
	ready       chan struct{} // closed once the current Run is ready
	readyClosed bool
	state       State
	cfg         lease.Config // the network config of the last Run, for Cleanup
	haveCfg     bool
}

// update changes the agent's mutable state under its lock. f must not
// block or call back into the Agent.
func (a *Agent) update(f func(m *mutable)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	f(&a.m)
}

// read returns a copy of the agent's mutable state.
func (a *Agent) read() mutable {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.m
}

// beginRun resets the readiness for a new Run.
func (a *Agent) beginRun() {
	a.update(func(m *mutable) {
		m.state.Ready = false
		m.state.Peers = 0
	})
}

// endRun gives the next Run a fresh Ready channel, so that Ready() called
// between two Runs does not report the previous one's readiness.
func (a *Agent) endRun() {
	a.update(func(m *mutable) {
		m.state.Ready = false
		if m.readyClosed {
			m.ready = make(chan struct{})
			m.readyClosed = false
		}
	})
}

// becomeReady closes the Ready channel and calls OnReady with the state at
// that moment, once per Run: a second call in the same Run does nothing.
func (a *Agent) becomeReady() {
	var st State
	first := false
	a.update(func(m *mutable) {
		if m.readyClosed {
			return
		}
		first = true
		m.readyClosed = true
		m.state.Ready = true
		close(m.ready)
		st = m.state
	})
	if !first {
		return
	}
	a.log.Info("node ready", "lease", st.Lease, "mtu", st.MTU, "peers", st.Peers)
	if a.opts.OnReady != nil {
		a.opts.OnReady(st)
	}
}

// setApplying records when the running Apply began (zero: none running), so
// that State.ApplyingSince lets a health check see a wedged Apply.
func (a *Agent) setApplying(t time.Time) {
	a.update(func(m *mutable) { m.state.ApplyingSince = t })
}

// newBackoff returns a backoff between the agent's retry bounds.
func (a *Agent) newBackoff() *retry.Backoff {
	return &retry.Backoff{Min: a.opts.RetryMin, Max: a.opts.RetryMax}
}
