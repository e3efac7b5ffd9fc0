package rules

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-iptables/iptables"
	"github.com/vishvananda/netns"
	"sigs.k8s.io/knftables"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
)

// Mode selects the implementation.
type Mode string

// Modes. ModeAuto follows the network config's EnableNFTables.
const (
	ModeAuto     Mode = ""
	ModeNFTables Mode = "nftables"
	ModeIPTables Mode = "iptables"
)

// DefaultResyncPeriod is how often Run checks the rules by default, as
// upstream's --iptables-resync (5 seconds).
const DefaultResyncPeriod = 5 * time.Second

// Options configure a Manager.
type Options struct {
	// NS is the node's network namespace; every nft/iptables command runs
	// inside it. Required (the zero value and netns.None() are rejected).
	NS netns.NsHandle
	// Mode picks nftables or iptables. Optional: ModeAuto (default) uses
	// nftables when the network config sets EnableNFTables.
	Mode Mode
	// Masquerade installs the masquerade rules (upstream --ip-masq), for
	// both families as upstream does. Optional: default off.
	Masquerade bool
	// NoIPv6Masquerade limits Masquerade to IPv4: pod traffic leaving over
	// IPv6 keeps its pod source address (K3s's default, which masquerades
	// IPv6 only with --flannel-ipv6-masq; pods with global IPv6 addresses
	// need no NAT). Optional: default off (both families).
	NoIPv6Masquerade bool
	// Forward installs the forward-accept rules (upstream
	// --iptables-forward-rules, on by default there). Optional: default off.
	Forward bool
	// DisableRandomFully masquerades without --random-fully / fully-random.
	// Optional: by default random-fully is used where iptables supports it.
	DisableRandomFully bool
	// ResyncPeriod is how often Run checks and repairs the rules. Optional:
	// default DefaultResyncPeriod.
	ResyncPeriod time.Duration
	// Logger receives the manager's logs; nil discards.
	Logger *slog.Logger
}

// Manager keeps one node's traffic rules. It is safe for concurrent use.
type Manager struct {
	opts Options
	log  *slog.Logger

	mu   sync.Mutex
	want *desired // nil before Ensure and after Cleanup
	nft  map[knftables.Family]knftables.Interface
	ipt  map[iptables.Protocol]*iptables.IPTables
	// iptSeen: our chains as last found right (iptMatches).
	iptSeen map[iptKey]iptListing
	gen     genState
}

// genState lets Check skip the binaries while the namespace's nf_tables
// generation (nlsafe.NFTablesGeneration) stays where a check last found
// every rule right: no rule of any table can have changed since.
type genState struct {
	ok         bool   // the rules were right at generation id
	id         uint32 // (read before that check began)
	skipped    int    // checks skipped in a row
	iptNFT     *bool  // whether iptables and ip6tables go through nf_tables (nil: not asked yet)
	fullChecks int    // checks that ran the binaries (for tests)
}

// fullCheckEvery bounds the checks skipped in a row on an unchanged
// generation: every fullCheckEvery-th check runs the binaries whatever
// the kernel says, one every five minutes at the default period (as often
// as vxlan's full resync). The generation moves with every change to the
// namespace's ruleset, so this is a safety net, not the way changes are
// found; each run of the binaries costs a few forks and about 100 KB of
// garbage, which was most of an idle daemon's allocation at one a minute.
const fullCheckEvery = 60

// desired is what Ensure asked for.
type desired struct {
	mode     Mode
	fams     []family // the enabled families
	disabled []bool   // v6 flags of the families that are off
}

// New checks opts and returns a Manager. It runs nothing yet.
func New(opts Options) (*Manager, error) {
	if opts.NS <= 0 { // the zero value (fd 0) is never a namespace handle here
		return nil, errors.New("rules options: NS is required")
	}
	switch opts.Mode {
	case ModeAuto, ModeNFTables, ModeIPTables:
	default:
		return nil, fmt.Errorf("rules options: unknown mode %q (want %q or %q)", opts.Mode, ModeNFTables, ModeIPTables)
	}
	if opts.ResyncPeriod < 0 {
		return nil, fmt.Errorf("rules options: ResyncPeriod %s is negative", opts.ResyncPeriod)
	}
	if opts.ResyncPeriod == 0 {
		opts.ResyncPeriod = DefaultResyncPeriod
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Manager{
		opts:    opts,
		log:     log,
		nft:     map[knftables.Family]knftables.Interface{},
		ipt:     map[iptables.Protocol]*iptables.IPTables{},
		iptSeen: map[iptKey]iptListing{},
	}, nil
}

// masquerades reports whether family f gets the masquerade rules.
func (m *Manager) masquerades(f family) bool {
	return m.opts.Masquerade && (!f.v6() || !m.opts.NoIPv6Masquerade)
}

// ModeFor returns the mode the manager uses for cfg.
func (m *Manager) ModeFor(cfg lease.Config) Mode {
	if m.opts.Mode != ModeAuto {
		return m.opts.Mode
	}
	if cfg.EnableNFTables {
		return ModeNFTables
	}
	return ModeIPTables
}

// Ensure installs the rules for network cfg and this node's lease own, in
// the mode chosen for cfg, and removes the other mode's rules and those of
// a family cfg disables. Rules left from another network or subnet (an
// earlier lease) are replaced. It writes nothing when the rules are already
// right, so it is safe to call again; Run keeps them so afterwards.
func (m *Manager) Ensure(ctx context.Context, cfg lease.Config, own lease.Lease) error {
	w := &desired{mode: m.ModeFor(cfg)}
	v4 := cfg.EnableIPv4 && cfg.Network.IsValid() && own.Subnet.IsValid()
	v6 := cfg.EnableIPv6 && cfg.IPv6Network.IsValid() && own.IPv6Subnet.IsValid()
	if v4 {
		w.fams = append(w.fams, family{network: cfg.Network.Masked(), subnet: own.Subnet.Masked(), randomFully: !m.opts.DisableRandomFully})
	} else {
		w.disabled = append(w.disabled, false)
	}
	if v6 {
		w.fams = append(w.fams, family{network: cfg.IPv6Network.Masked(), subnet: own.IPv6Subnet.Masked(), randomFully: !m.opts.DisableRandomFully})
	} else {
		w.disabled = append(w.disabled, true)
	}
	if !v4 && !v6 {
		return fmt.Errorf("ensure rules: lease %s has no subnet of an enabled family", own)
	}

	m.mu.Lock()
	defer m.mu.Unlock()
	m.want = w
	m.gen.ok = false
	return m.inNS(func() error {
		var errs []error
		other := ModeIPTables
		if w.mode == ModeIPTables {
			other = ModeNFTables
		}
		for _, v6 := range []bool{false, true} {
			if err := m.remove(ctx, other, v6, true); err != nil {
				errs = append(errs, err)
			}
		}
		for _, v6 := range w.disabled {
			if err := m.remove(ctx, w.mode, v6, true); err != nil {
				errs = append(errs, err)
			}
		}
		for _, f := range w.fams {
			if _, err := m.ensure(ctx, w.mode, f); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	})
}

// Run checks the rules every ResyncPeriod (see Check) and rewrites those
// that drifted (a rule deleted or changed by hand, a flushed table) until
// ctx ends, then returns nil. Before Ensure, and after Cleanup, it checks nothing. Failures
// are logged and retried at the next period.
func (m *Manager) Run(ctx context.Context) error {
	t := time.NewTicker(m.opts.ResyncPeriod)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if err := m.Check(ctx); err != nil && ctx.Err() == nil {
			m.log.Warn("traffic rules check failed; retrying next period", "error", err)
		}
	}
}

// Check repairs the rules Ensure installed, once: Run's periodic step. It
// runs nothing while the namespace's nf_tables generation has not moved
// since a check found every rule right (rules of iptables-legacy, which
// the generation does not cover, are always checked), and runs the
// binaries at least every fullCheckEvery-th time regardless.
func (m *Manager) Check(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	w := m.want
	if w == nil {
		return nil
	}
	gen, gated := m.generation(ctx, w.mode)
	if gated && m.gen.ok && gen == m.gen.id && m.gen.skipped < fullCheckEvery-1 {
		m.gen.skipped++
		return nil
	}
	m.gen.ok, m.gen.skipped = false, 0
	m.gen.fullChecks++
	changedAny := false
	err := m.inNS(func() error {
		var errs []error
		for _, f := range w.fams {
			changed, err := m.ensure(ctx, w.mode, f)
			if err != nil {
				errs = append(errs, err)
			}
			if changed {
				changedAny = true
				m.log.Info("traffic rules repaired", "mode", w.mode, "network", f.network, "subnet", f.subnet)
			}
		}
		return errors.Join(errs...)
	})
	// The generation was read before the check: a change made while it
	// ran moved it, and the next check looks again. A check that wrote
	// moved it itself; the next one confirms the writes.
	m.gen.ok, m.gen.id = gated && err == nil && !changedAny, gen
	return err
}

// generation reads the namespace's nf_tables generation; gated is false
// when it cannot tell whether mode's rules changed (the iptables binaries
// are iptables-legacy, or the kernel did not answer).
func (m *Manager) generation(ctx context.Context, mode Mode) (gen uint32, gated bool) {
	if mode == ModeIPTables && !m.iptablesThroughNFT(ctx) {
		return 0, false
	}
	gen, err := nlsafe.NFTablesGeneration(m.opts.NS)
	if err != nil {
		m.log.Debug("nftables generation unknown; checking the rules every period", "error", err)
		return 0, false
	}
	return gen, true
}

// iptablesThroughNFT reports whether the iptables and ip6tables binaries
// are iptables-nft ("-V" says "nf_tables"), asking them once.
func (m *Manager) iptablesThroughNFT(ctx context.Context) bool {
	if m.gen.iptNFT != nil {
		return *m.gen.iptNFT
	}
	nft := true
	err := m.inNS(func() error {
		for _, bin := range []string{"iptables", "ip6tables"} {
			out, err := exec.CommandContext(ctx, bin, "-V").Output()
			if err != nil {
				return fmt.Errorf("%s -V: %w", bin, err)
			}
			nft = nft && strings.Contains(string(out), "nf_tables")
		}
		return nil
	})
	if err != nil { // asked again next time
		m.log.Debug("iptables variant unknown; checking the rules every period", "error", err)
		return false
	}
	m.gen.iptNFT = &nft
	return nft
}

// Cleanup removes every rule, chain and table of ours in both modes and
// both families, leaving everything else alone. A missing nft or iptables
// binary means there is nothing of that mode to remove. It is safe to call
// again; Run checks nothing afterwards until the next Ensure.
func (m *Manager) Cleanup(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.want = nil
	m.gen.ok = false
	return m.inNS(func() error {
		var errs []error
		for _, mode := range []Mode{ModeNFTables, ModeIPTables} {
			for _, v6 := range []bool{false, true} {
				if err := m.remove(ctx, mode, v6, true); err != nil {
					errs = append(errs, err)
				}
			}
		}
		return errors.Join(errs...)
	})
}

// inNS runs fn in the node's namespace; the binaries fn starts inherit it
// from the locked thread that forks them.
func (m *Manager) inNS(fn func() error) error {
	return nlsafe.InNamespace(m.opts.NS, fn)
}

// ensure checks family f in mode and rewrites it if it differs. It reports
// whether it wrote.
func (m *Manager) ensure(ctx context.Context, mode Mode, f family) (bool, error) {
	var changed bool
	var err error
	if mode == ModeNFTables {
		changed, err = m.nftEnsure(ctx, f)
	} else {
		changed, err = m.iptEnsure(f)
	}
	if err != nil {
		return changed, fmt.Errorf("ensure %s rules for network %s subnet %s: %w", mode, f.network, f.subnet, err)
	}
	return changed, nil
}

// remove deletes mode's objects for one family. With missingOK, a missing
// binary is not an error.
func (m *Manager) remove(ctx context.Context, mode Mode, v6, missingOK bool) error {
	var err error
	if mode == ModeNFTables {
		err = m.nftRemove(ctx, v6)
	} else {
		err = m.iptRemove(v6)
	}
	if err != nil && missingOK && errors.Is(err, exec.ErrNotFound) {
		m.log.Debug("no binary for mode; nothing to remove", "mode", mode, "ipv6", v6, "error", err)
		return nil
	}
	if err != nil {
		fam := "IPv4"
		if v6 {
			fam = "IPv6"
		}
		return fmt.Errorf("remove %s %s rules: %w", mode, fam, err)
	}
	return nil
}

var _ flannel.TrafficRules = (*Manager)(nil)
