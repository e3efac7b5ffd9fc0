package extension

import (
	"context"
	"log/slog"
	"sync"
	"time"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/lease"
)

// Network is a started extension dataplane: apply, which runs the
// commands that turn the added peers into the peer set, on a
// backend.Reconciler. Apply and the repairs of Run are serialized; it is
// safe for concurrent use.
type Network struct {
	opts  Options
	env   flannel.Env
	own   lease.Lease
	log   *slog.Logger
	cmd   *runner
	state stateFile
	sched *schedule
	cmds  Commands
	r     *backend.Reconciler // serializes Apply and repairs
	// added and failed are apply's, under the Reconciler's lock.
	added  map[string]peer // peers whose add command succeeded (persisted)
	failed map[string]*attempt
}

var _ flannel.Network = (*Network)(nil)

// attempt is the retry state of a peer whose command failed.
type attempt struct {
	failures int
	next     time.Time
	err      error
}

func newNetwork(b *Backend, env flannel.Env, own lease.Lease, added map[string]peer) *Network {
	log := backend.Logger(env.Logger).With("backend", Type)
	n := &Network{
		opts: b.opts, env: env, own: own, log: log,
		cmd: b.runner(env), state: b.state(), cmds: b.opts.Commands,
		sched: newSchedule(), added: added, failed: map[string]*attempt{},
	}
	n.r = backend.NewReconciler(backend.ReconcilerConfig{Apply: n.apply, Interval: b.opts.RepairInterval, Logger: log})
	return n
}

// Lease returns the lease the network was started with.
func (n *Network) Lease() lease.Lease { return n.own }

// MTU is the external interface's MTU, as upstream reports it: what the
// commands build is unknown to flannel.
func (n *Network) MTU() int { return n.env.Iface.MTU }

// Apply runs SubnetRemoveCommand for every added peer that is not in peers
// (or changed: other public addresses or backend data) and then
// SubnetAddCommand for every peer not added yet, and records the result in
// the state file. Leases of other backend types and the own subnets are
// skipped. Commands of different peers run concurrently (Options.Parallel);
// a peer whose command fails or times out yields a *flannel.PeerError and
// is retried with backoff, by a later Apply or by Run, never sooner than
// its backoff allows (its PeerError is returned meanwhile). Apply may be
// called repeatedly with the same peers; it runs nothing then.
func (n *Network) Apply(ctx context.Context, peers []lease.Lease) error {
	return n.r.Apply(ctx, peers)
}

// Run repairs until ctx ends: it re-applies the last peer set every
// RepairInterval and when a failed peer's backoff is over. Nothing runs
// before the first Apply. What fails is logged (a peer once per change of
// its lease, besides the backoff's own warning). Run returns nil when ctx
// ends, with every goroutine joined.
func (n *Network) Run(ctx context.Context) error {
	n.r.Run(ctx, n.watchers()...)
	return nil
}

// watchers are the event sources of Run: the retry schedule.
func (n *Network) watchers() []backend.Watcher {
	return []backend.Watcher{n.sched.watch}
}

// schedule tells the retry watcher when the next retry is due.
type schedule struct {
	mu      sync.Mutex
	due     time.Time // zero: nothing to retry
	changed chan struct{}
}

func newSchedule() *schedule { return &schedule{changed: make(chan struct{}, 1)} }

// set records the next due time (zero for none) and wakes the watcher.
func (s *schedule) set(due time.Time) {
	s.mu.Lock()
	s.due = due
	s.mu.Unlock()
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// watch pokes once the due time is reached, then waits for the next set.
func (s *schedule) watch(ctx context.Context, poke func(why string)) {
	for {
		s.mu.Lock()
		due := s.due
		s.mu.Unlock()
		var fire <-chan time.Time
		var t *time.Timer
		if !due.IsZero() {
			t = time.NewTimer(time.Until(due))
			fire = t.C
		}
		stop := func() {
			if t != nil {
				t.Stop()
			}
		}
		select {
		case <-ctx.Done():
			stop()
			return
		case <-s.changed:
			stop()
		case <-fire:
			poke("retry")
			select { // the repair calls set again
			case <-ctx.Done():
				return
			case <-s.changed:
			}
		}
	}
}
