package ipsec

import (
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/lease"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/sequence_ops.golden")

// seqStep is one step of a sequence: what happens (the clock moves to at,
// peers send packets or states vanish, then an Apply, a Rekey or a repair)
// and the tables expected afterwards.
type seqStep struct {
	name     string
	at       time.Duration     // the clock since the start; never goes back
	send     map[string]uint64 // packets counted first on the states with these keys ("b1>a2 g0")
	vanish   []string          // states deleted behind our back first, by key
	failAdd  []string          // the kernel refuses to add states with these keys in this step
	rekey    bool              // Rekey (the own key labels come from sequence.keys)
	repair   bool              // the repair of Run: re-apply the last peers
	peers    []string          // otherwise: Apply with these peers ("b1"; "!c": node c with a key of another PSK)
	want     []string          // seqHarness.table afterwards, in the IPv4-only form (see expand)
	errs     []string          // parts of the returned error; none: no error
	log      []string          // parts of lines logged in the step
	noLog    []string          // parts that must not be logged in the step
	noWrites bool              // the step writes nothing
}

type sequence struct {
	name          string
	rekeyInterval time.Duration // default 1h; Grace is 30s
	keys          []string      // own key labels Rekey makes, in order
	steps         []seqStep
	configs       []string // the seqConfigs it runs in; none: all
}

var seqConfigs = []seqConfig{{name: "ipv4"}, {name: "dual-stack", dual: true}, {name: "udp-encap", encap: true}}

// TestSequences runs every sequence in every configuration on the
// in-memory XFRM table, checks the tables after each step and, against
// testdata/sequence_ops.golden, the exact kernel writes in their order
// (go test -run TestSequences -update rewrites it).
func TestSequences(t *testing.T) {
	var golden strings.Builder
	for _, cfg := range seqConfigs {
		for _, sq := range sequences {
			if len(sq.configs) > 0 && !slices.Contains(sq.configs, cfg.name) {
				continue
			}
			t.Run(cfg.name+"/"+sq.name, func(t *testing.T) {
				fmt.Fprintf(&golden, "=== %s/%s\n", cfg.name, sq.name)
				runSequence(t, cfg, sq, &golden)
			})
		}
	}
	path := filepath.Join("testdata", "sequence_ops.golden")
	if *updateGolden {
		require.NoError(t, os.MkdirAll("testdata", 0o755))
		require.NoError(t, os.WriteFile(path, []byte(golden.String()), 0o644))
		return
	}
	want, err := os.ReadFile(path)
	require.NoError(t, err)
	wl, gl := strings.Split(string(want), "\n"), strings.Split(golden.String(), "\n")
	for i := range max(len(wl), len(gl)) {
		w, g := "<end>", "<end>"
		if i < len(wl) {
			w = wl[i]
		}
		if i < len(gl) {
			g = gl[i]
		}
		if w != g {
			t.Fatalf("kernel writes differ from %s at line %d:\nwant %s\ngot  %s\n(the section: %s)", path, i+1, w, g, section(gl[:min(i+1, len(gl))]))
		}
	}
}

// section is the last "===" and "---" headings in lines.
func section(lines []string) string {
	var seq, st string
	for _, l := range lines {
		if strings.HasPrefix(l, "=== ") {
			seq, st = l, ""
		}
		if strings.HasPrefix(l, "--- ") {
			st = l
		}
	}
	return seq + " " + st
}

func runSequence(t *testing.T, cfg seqConfig, sq sequence, golden *strings.Builder) {
	ri := sq.rekeyInterval
	if ri == 0 {
		ri = time.Hour
	}
	h := newSeqHarness(t, cfg, ri)
	h.own = sq.keys
	var last time.Duration
	for i, st := range sq.steps {
		require.GreaterOrEqual(t, st.at, last, "step %d %q: the clock goes back", i, st.name)
		last = st.at
		err := h.step(st)
		ops := h.x.takeOps()
		fmt.Fprintf(golden, "--- %d %s at %v\n", i, st.name, st.at)
		if err != nil {
			fmt.Fprintf(golden, "error: %v\n", err)
		}
		for _, op := range ops {
			fmt.Fprintln(golden, op)
		}
		logs := h.logs.String()
		h.logs.Reset()
		assert.Equal(t, expand(cfg, st.want), h.table(), "step %d %q: tables", i, st.name)
		h.requireNoOutboundReinstalled()
		if len(st.errs) == 0 {
			assert.NoError(t, err, "step %d %q", i, st.name)
		}
		for _, part := range st.errs {
			if assert.Error(t, err, "step %d %q", i, st.name) {
				assert.Contains(t, err.Error(), part, "step %d %q", i, st.name)
			}
		}
		for _, part := range st.log {
			assert.Contains(t, logs, part, "step %d %q: log", i, st.name)
		}
		for _, part := range st.noLog {
			assert.NotContains(t, logs, part, "step %d %q: log", i, st.name)
		}
		if st.noWrites {
			assert.Empty(t, ops, "step %d %q: writes", i, st.name)
		}
	}
}

// step performs st on h's Network.
func (h *seqHarness) step(st seqStep) error {
	h.clock = h.start.Add(st.at)
	var peers []lease.Lease
	for _, p := range st.peers {
		peers = append(peers, h.peer(p)) // learns the keys' names
	}
	for name, n := range st.send {
		found := false
		for _, k := range h.espKeys(name) {
			found = h.x.count(k, n) || found
		}
		require.True(h.t, found, "no state with key %s to count on", name)
	}
	for _, name := range st.vanish {
		found := false
		for _, k := range h.espKeys(name) {
			found = h.x.vanish(k) || found
		}
		require.True(h.t, found, "no state with key %s to delete", name)
	}
	h.x.failKeys = map[string]error{}
	for _, name := range st.failAdd {
		for _, k := range h.espKeys(name) {
			h.x.failKeys[string(k)] = errors.New("injected add failure")
		}
	}
	switch {
	case st.rekey:
		_, err := h.n.Rekey(h.t.Context())
		return err
	case st.repair:
		var err error
		h.n.r.Locked(func() { err = h.n.applyLocked(h.t.Context(), h.applied) })
		return err
	}
	h.applied = peers
	return h.n.Apply(h.t.Context(), peers)
}

// expand turns the IPv4-only form of a table into the form of cfg: with
// dual, every state and policy has an IPv6 twin (node names with a 6);
// with encap, states are UDP-encapsulated.
func expand(cfg seqConfig, lines []string) []string {
	var out []string
	for _, l := range lines {
		out = append(out, l)
		if !cfg.dual || strings.HasPrefix(l, "route ") {
			continue
		}
		f := strings.Fields(l)
		for i := range f {
			switch {
			case f[i] == "cluster":
				f[i] = "cluster6"
			case len(f[i]) == 1:
				f[i] += "6"
			case strings.Contains(f[i], "->"):
				a, b, _ := strings.Cut(f[i], "->")
				if b == "cluster" {
					b = "cluster6"
				} else {
					b += "6"
				}
				f[i] = a + "6->" + b
			}
		}
		out = append(out, strings.Join(f, " "))
	}
	if cfg.encap {
		for i, l := range out {
			if strings.HasPrefix(l, "out ") || strings.HasPrefix(l, "in ") {
				out[i] = l + " encap"
			}
		}
	}
	slices.Sort(out)
	return out
}

// TestRandomPeerSets applies peer sets in a random order (seeded, so a
// failure repeats) and checks after each that the tables are those a
// fresh Network makes for that set: nothing of an earlier set is left and
// nothing is missing.
func TestRandomPeerSets(t *testing.T) {
	sets := [][]string{{}, {"b1"}, {"b1", "c1"}, {"c1", "d1"}, {"b1", "!c", "d1"}, {"d1"}, {"!b", "!d"}, {"b1", "c1", "d1"}}
	for _, cfg := range seqConfigs {
		t.Run(cfg.name, func(t *testing.T) {
			fresh := make([][]string, len(sets))
			for i, set := range sets {
				h := newSeqHarness(t, cfg, time.Hour)
				_ = h.step(seqStep{peers: set})
				fresh[i] = anyGen(h.table())
			}
			// The same tables whatever came before, except for the
			// generation of each outbound state: a peer that returns gets
			// its next one, and none after the last (issue #18).
			h := newSeqHarness(t, cfg, time.Hour)
			rnd := rand.New(rand.NewPCG(1, 2))
			for n := range 60 {
				i := rnd.IntN(len(sets))
				err := h.step(seqStep{at: time.Duration(n) * time.Second, peers: sets[i]})
				require.Equal(t, blockExhausted(fresh[i], err), anyGen(h.table()), "apply %d: set %v", n, sets[i])
				h.requireNoOutboundReinstalled()
			}
		})
	}
}

// requireNoOutboundReinstalled fails unless every outbound key and SPI
// was installed at most once, and no two installed states share a key
// (the IPv4 and IPv6 states of a pair included).
func (h *seqHarness) requireNoOutboundReinstalled() {
	h.t.Helper()
	keys := map[string]stateID{}
	for id, s := range h.x.st {
		other, dup := keys[string(s.Key)]
		require.False(h.t, dup, "states %v and %v share a key", id, other)
		keys[string(s.Key)] = id
	}
	for st, n := range h.x.added {
		if strings.HasPrefix(st, nodeIP(0, false).String()+"->") || strings.HasPrefix(st, nodeIP(0, true).String()+"->") {
			require.Equal(h.t, 1, n, "outbound state %s installed %d times", st, n)
		}
	}
}

// anyGen replaces the generation of the outbound states in a table by *.
func anyGen(table []string) []string {
	out := make([]string, len(table))
	for i, l := range table {
		if strings.HasPrefix(l, "out ") || strings.HasPrefix(l, "policy out ") {
			if j := strings.LastIndex(l, " g"); j > 0 && !strings.HasSuffix(l, "no state") {
				l = l[:j] + " g*"
			}
		}
		out[i] = l
	}
	slices.Sort(out)
	return out
}

// blockExhausted is table without the outbound states of the peers err
// reports out of generations.
func blockExhausted(table []string, err error) []string {
	var out []string
	for _, e := range backendPeerErrs(err) {
		if !errors.Is(e.Err, errExhausted) {
			continue
		}
		p := nodeName(e.Lease.Subnet.Addr())
		table = slices.DeleteFunc(slices.Clone(table), func(l string) bool {
			return strings.HasPrefix(l, "out "+p+" ") || strings.HasPrefix(l, "out "+p+"6 ")
		})
		for i, l := range table {
			if strings.HasPrefix(l, "policy out ") && (strings.Contains(l, "->"+p+" via") || strings.Contains(l, "->"+p+"6 via")) {
				table[i] = l[:strings.Index(l, " via ")] + " via no state"
			}
		}
	}
	out = append(out, table...)
	slices.Sort(out)
	return out
}

// backendPeerErrs returns the *flannel.PeerError values err joins.
func backendPeerErrs(err error) []*flannel.PeerError {
	var out []*flannel.PeerError
	for _, e := range backend.PeerErrorLeaves(err) {
		var pe *flannel.PeerError
		if errors.As(e, &pe) {
			out = append(out, pe)
		}
	}
	return out
}

// TestPeerKeyBinding: a key is bound to its lease and epoch (issue #18):
// copied into another lease, replayed with an older epoch, or used by two
// nodes, it is refused, and the refused peer is warned about once.
func TestPeerKeyBinding(t *testing.T) {
	h := newSeqHarness(t, seqConfigs[0], time.Hour)
	b1, c1 := h.peer("b1"), h.peer("c1")
	require.NoError(t, h.n.Apply(t.Context(), []lease.Lease{b1, c1}))
	refused := func(err error, want error, peers ...lease.Lease) {
		t.Helper()
		pes := backendPeerErrs(err)
		require.Len(t, pes, len(peers), "%v", err)
		for i, pe := range pes {
			assert.Equal(t, peers[i].Subnet, pe.Lease.Subnet)
			assert.ErrorIs(t, pe, want)
		}
	}
	rebind := func(l lease.Lease, key string, epoch uint64) lease.Lease {
		data, err := marshalBackendData([]byte(testPSK), bindingOf(l, h.key(key).pub, epoch))
		require.NoError(t, err)
		l.Attrs.BackendData = data
		return l
	}

	pasted := c1
	pasted.Attrs.BackendData = b1.Attrs.BackendData
	refused(h.n.Apply(t.Context(), []lease.Lease{b1, pasted}), ErrPeerAuth, pasted)

	// Holders of the PSK publishing one key twice: both refused; our own
	// key in a peer's lease: refused.
	twice := rebind(c1, "b1", 5)
	h.logs.Reset()
	for range 2 {
		refused(h.n.Apply(t.Context(), []lease.Lease{b1, twice}), ErrDuplicateKey, b1, twice)
	}
	assert.Equal(t, 1, strings.Count(h.logs.String(), "subnet="+twice.String()), "warned once:\n%s", h.logs)
	ours := rebind(c1, "a1", 6)
	refused(h.n.Apply(t.Context(), []lease.Lease{b1, ours}), ErrDuplicateKey, ours)

	// Epochs: a newer key is taken, the older one replayed is refused, and
	// so is its epoch with another key.
	b2 := h.peer("b2")
	require.NoError(t, h.n.Apply(t.Context(), []lease.Lease{b2}))
	refused(h.n.Apply(t.Context(), []lease.Lease{b1}), ErrOldEpoch, b1)
	refused(h.n.Apply(t.Context(), []lease.Lease{rebind(b1, "b3", 2)}), ErrOldEpoch, b1)
	require.NoError(t, h.n.Apply(t.Context(), []lease.Lease{}))
	refused(h.n.Apply(t.Context(), []lease.Lease{b1}), ErrOldEpoch, b1) // remembered while b was gone
	require.NoError(t, h.n.Apply(t.Context(), []lease.Lease{h.peer("b3")}))
}

// TestSoftLimitRekeysEarly: an outbound state of our current key at its
// soft packet limit asks Run for an early rekey; after the rekey, the old
// key's states at their limit do not ask again.
func TestSoftLimitRekeysEarly(t *testing.T) {
	h := newSeqHarness(t, seqConfigs[0], time.Hour)
	h.n.book.limits = stateLimits{softPackets: 100, softBytes: 1 << 40}
	h.own = []string{"a2"}
	require.NoError(t, h.step(seqStep{peers: []string{"b1"}}))
	require.NoError(t, h.step(seqStep{at: time.Second, send: map[string]uint64{"a1>b1 g0": 99}, repair: true}))
	assert.False(t, h.n.book.earlyRekey)
	require.NoError(t, h.step(seqStep{at: 2 * time.Second, send: map[string]uint64{"a1>b1 g0": 1}, repair: true}))
	assert.True(t, h.n.book.earlyRekey, "soft limit reached")
	assert.Contains(t, h.logs.String(), "reached its soft limit")
	require.NoError(t, h.step(seqStep{at: 3 * time.Second, rekey: true}))
	assert.False(t, h.n.book.earlyRekey)
	require.NoError(t, h.step(seqStep{at: 4 * time.Second, send: map[string]uint64{"a1>b1 g0": 1}, repair: true}))
	assert.False(t, h.n.book.earlyRekey, "the previous key's state does not ask again")
}
