package backend

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// ReconcilerConfig is what a dataplane hands a Reconciler.
type ReconcilerConfig struct {
	// Apply makes the kernel match peers. Required. It is called with the
	// Reconciler's lock held, so it never runs twice at once, and may
	// return *flannel.PeerError values (joined) for peers it could not
	// program; peers is the Reconciler's own copy and must not be kept
	// past the call.
	Apply func(ctx context.Context, peers []lease.Lease) error
	// Repair re-applies the last peer set on a repair (a tick, an event,
	// Update). Optional: Apply. A dataplane that applies only the changes
	// of a peer set sets it to its full, dump-and-diff pass.
	Repair func(ctx context.Context, peers []lease.Lease) error
	// BeforeRepair, when set, is called by Run before each repair, without
	// the lock, with the trigger ("periodic" for the timer, else the
	// reason a watcher gave); the repair is skipped when it returns false.
	// It lets a dataplane do periodic work of its own on the same loop
	// (e.g. rekeying) and tick faster than it repairs. Run calls it from
	// one goroutine only.
	BeforeRepair func(ctx context.Context, why string) bool
	// Interval is the period of Run's timer. Optional:
	// DefaultReconcileInterval.
	Interval time.Duration
	// Logger receives the repair warnings (nil: discard).
	Logger *slog.Logger
	// Resync, when longer than Interval, makes the periodic repair rare: a
	// tick repairs only when Resync has passed since the last repair (of
	// any trigger) or when the kernel may not hold the last peer set (the
	// last Apply or repair failed, or Synced says so). Kernel-event
	// repairs (watchers' pokes) are not affected: they run at once.
	// Optional: zero, every tick repairs.
	Resync time.Duration
	// Synced, when set, reports (with the lock held) whether the kernel is
	// known to hold what the last Apply or repair programmed; a false
	// answer makes the next tick repair. Optional: the last Apply or
	// repair returned no error other than *flannel.PeerError values.
	Synced func() bool
}

// Periodic is the trigger of a repair that Run's timer started.
const Periodic = "periodic"

// DefaultReconcileInterval is Run's period when ReconcilerConfig.Interval
// is not positive.
const DefaultReconcileInterval = 10 * time.Second

// Reconciler is the Apply/repair shell every dataplane shares. It owns the
// lock that serializes Apply and repairs, the last peer set Apply was
// given, and whether Apply was called at all: nothing is repaired before
// the first Apply, so entries of a previous run stay until the caller has
// said which peers exist. Run repairs drift on a timer and when a watcher
// (a kernel subscription) reports it.
//
// A repair logs what it could not fix. A peer that cannot be programmed
// (a *flannel.PeerError) is warned about once per change of its lease
// value: not again on later repairs while the same lease keeps failing,
// and not at all when Apply already returned that error to its caller.
// Other repair errors are logged every time.
//
// A Reconciler is safe for concurrent use. Its zero value is not usable:
// build one with NewReconciler.
type Reconciler struct {
	cfg ReconcilerConfig
	log *slog.Logger

	mu      sync.Mutex
	peers   []lease.Lease
	applied bool
	warned  map[string]lease.Lease // by lease key: the failing lease last reported
	// lastRepair is when the last repair (or the first Apply) began;
	// lastOK whether the last Apply or repair returned no error.
	lastRepair time.Time
	lastOK     bool
	now        func() time.Time // time.Now; tests replace it
}

// NewReconciler returns a Reconciler driving cfg.Apply and cfg.Repair.
func NewReconciler(cfg ReconcilerConfig) *Reconciler {
	if cfg.Apply == nil { // a misuse; programming nothing beats a panic
		cfg.Apply = func(context.Context, []lease.Lease) error { return nil }
	}
	if cfg.Repair == nil {
		cfg.Repair = cfg.Apply
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultReconcileInterval
	}
	return &Reconciler{cfg: cfg, log: Logger(cfg.Logger), warned: map[string]lease.Lease{}, now: time.Now}
}

// Apply records peers as the peer set to keep programmed, enables repairs
// and calls the dataplane's Apply with them, returning its error. The
// peers it names in *flannel.PeerError are not warned about again by
// repairs until their lease changes.
func (r *Reconciler) Apply(ctx context.Context, peers []lease.Lease) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	// Kept, not copied: peers is read-only and stays valid until the next
	// Apply (flannel.Network.Apply), so repairs program the caller's set
	// (a copy was a second array of every lease: 1 MB at 5,000 peers).
	r.peers = peers
	if !r.applied {
		r.lastRepair = r.now()
	}
	r.applied = true
	err := r.cfg.Apply(ctx, r.peers)
	r.lastOK = len(r.notePeerErrs(err, "")) == 0
	return err
}

// Applied reports whether Apply was called.
func (r *Reconciler) Applied() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.applied
}

// Repair re-applies the last peer set through the dataplane's Repair and
// logs what failed, naming the trigger why. It does nothing before the
// first Apply.
func (r *Reconciler) Repair(ctx context.Context, why string) {
	r.Update(ctx, why, nil)
}

// Update runs change (when not nil) with the lock held and then, once
// Apply was called, repairs as Repair does. A dataplane uses it for a
// change of its own state that the kernel must follow at once (e.g. a new
// key), so that no Apply or repair sees half of it. change must not call
// the Reconciler's methods.
func (r *Reconciler) Update(ctx context.Context, why string, change func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if change != nil {
		change()
	}
	if !r.applied {
		return
	}
	r.log.Debug("repairing", "trigger", why)
	r.lastRepair = r.now()
	err := r.cfg.Repair(ctx, r.peers)
	if ctx.Err() != nil {
		r.lastOK = false
		return
	}
	rest := r.notePeerErrs(err, why)
	r.lastOK = len(rest) == 0
	if len(rest) > 0 {
		r.log.Warn("repair failed", "trigger", why, "err", errors.Join(rest...))
	}
}

// Locked runs fn with the lock held, for reads and writes of dataplane
// state that Apply and repairs also use. fn must not call the
// Reconciler's methods (the lock is not reentrant).
func (r *Reconciler) Locked(fn func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fn()
}

// Run repairs until ctx ends: every cfg.Interval (trigger Periodic) and
// soon after one of watchers pokes (pokes coalesce while a repair runs),
// each time after cfg.BeforeRepair allows it; with cfg.Resync, ticks
// repair only when due (see ReconcilerConfig.Resync). It runs the watchers in
// their own goroutines and joins them before it returns.
func (r *Reconciler) Run(ctx context.Context, watchers ...Watcher) {
	RepairLoop(ctx, r.cfg.Interval, func(ctx context.Context, why string) {
		if r.cfg.BeforeRepair != nil && !r.cfg.BeforeRepair(ctx, why) {
			return
		}
		if why == Periodic && !r.tickDue() {
			return
		}
		r.Repair(ctx, why)
	}, watchers...)
}

// tickDue reports whether a periodic tick should repair (see
// ReconcilerConfig.Resync).
func (r *Reconciler) tickDue() bool {
	if r.cfg.Resync <= r.cfg.Interval {
		return true
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	synced := r.lastOK
	if r.cfg.Synced != nil {
		synced = r.cfg.Synced()
	}
	return !synced || r.now().Sub(r.lastRepair) >= r.cfg.Resync
}

// notePeerErrs logs (when why is not empty: a repair) each peer error of
// err whose lease differs from the one last reported for that peer, and
// records the failing peers; a peer that no longer fails is forgotten, so
// a later failure is reported again. It returns the other errors. Called
// with the lock held.
func (r *Reconciler) notePeerErrs(err error, why string) (rest []error) {
	failing := map[string]bool{}
	for _, e := range PeerErrorLeaves(err) {
		var pe *flannel.PeerError
		if !errors.As(e, &pe) {
			rest = append(rest, e)
			continue
		}
		k := pe.Lease.Key()
		failing[k] = true
		if old, ok := r.warned[k]; ok && old.SameSubnets(pe.Lease) && old.Attrs.Equal(pe.Lease.Attrs) {
			continue
		}
		r.warned[k] = pe.Lease
		if why != "" {
			r.log.Warn("peer not programmed", "trigger", why, "peer", pe.Lease.String(), "err", pe.Err)
		}
	}
	for k := range r.warned {
		if !failing[k] {
			delete(r.warned, k)
		}
	}
	return rest
}

// PeerErrorLeaves flattens err into the errors it joins (errors.Join,
// fmt.Errorf with several %w, through single wrappers), stopping at each
// *flannel.PeerError. A nil err has none.
func PeerErrorLeaves(err error) []error {
	for e := err; e != nil; {
		if _, ok := e.(*flannel.PeerError); ok {
			return []error{e}
		}
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			var out []error
			for _, x := range j.Unwrap() {
				out = append(out, PeerErrorLeaves(x)...)
			}
			return out
		}
		u, ok := e.(interface{ Unwrap() error })
		if !ok {
			break
		}
		e = u.Unwrap()
	}
	if err == nil {
		return nil
	}
	return []error{err}
}

// Logger returns l, or a logger that discards everything when l is nil.
func Logger(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}
