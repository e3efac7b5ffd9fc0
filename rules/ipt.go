package rules

import (
	"fmt"
	"slices"
	"strings"

	"github.com/coreos/go-iptables/iptables"
)

// iptFor returns the iptables (or ip6tables) runner, creating it (which
// runs the binary for its version) on first use. Called in the namespace,
// under m.mu.
func (m *Manager) iptFor(v6 bool) (*iptables.IPTables, error) {
	proto := iptables.ProtocolIPv4
	if v6 {
		proto = iptables.ProtocolIPv6
	}
	if ipt, ok := m.ipt[proto]; ok {
		return ipt, nil
	}
	ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Timeout(5))
	if err != nil {
		return nil, fmt.Errorf("iptables for %s: %w", protoName(proto), err)
	}
	m.ipt[proto] = ipt
	return ipt, nil
}

func protoName(p iptables.Protocol) string {
	if p == iptables.ProtocolIPv6 {
		return "ip6tables"
	}
	return "iptables"
}

// iptChain is one chain of ours, its rules and the jump to it.
type iptChain struct {
	table, chain, from string
	jump               []string
	rules              [][]string
	want               bool
}

func (m *Manager) iptChains(ipt *iptables.IPTables, f family) []iptChain {
	f.randomFully = f.randomFully && ipt.HasRandomFully()
	return []iptChain{
		{table: "nat", chain: iptPostrtgChain, from: "POSTROUTING", jump: iptMasqJump(), rules: iptMasqRules(f), want: m.masquerades(f)},
		{table: "filter", chain: iptFwdChain, from: "FORWARD", jump: iptFwdJump(), rules: iptFwdRules(f), want: m.opts.Forward},
	}
}

// iptEnsure makes our chains hold exactly the wanted rules, in order, and
// the jumps to them exist. A chain is rewritten (flushed and refilled)
// only when it differs, so a running node's rules are not touched.
func (m *Manager) iptEnsure(f family) (bool, error) {
	ipt, err := m.iptFor(f.v6())
	if err != nil {
		return false, err
	}
	changed := false
	for _, c := range m.iptChains(ipt, f) {
		if !c.want {
			removed, err := m.iptRemoveChain(ipt, f.v6(), c)
			if err != nil {
				return changed, err
			}
			changed = changed || removed
			continue
		}
		ok, err := m.iptMatches(ipt, f.v6(), c)
		if err != nil {
			return changed, err
		}
		if !ok {
			changed = true
			// ClearChain creates the chain when missing.
			if err := ipt.ClearChain(c.table, c.chain); err != nil {
				return changed, fmt.Errorf("flush chain %s/%s: %w", c.table, c.chain, err)
			}
			for _, r := range c.rules {
				if err := ipt.Append(c.table, c.chain, r...); err != nil {
					return changed, fmt.Errorf("append to %s/%s rule %q: %w", c.table, c.chain, strings.Join(r, " "), err)
				}
			}
		}
		exists, err := ipt.Exists(c.table, c.from, c.jump...)
		if err != nil {
			return changed, fmt.Errorf("check jump %s/%s -> %s: %w", c.table, c.from, c.chain, err)
		}
		if !exists {
			changed = true
			// First, so that our rules see the packets before any other.
			if err := ipt.Insert(c.table, c.from, 1, c.jump...); err != nil {
				return changed, fmt.Errorf("insert jump %s/%s -> %s: %w", c.table, c.from, c.chain, err)
			}
		}
	}
	return changed, nil
}

// iptKey names one chain of one family.
type iptKey struct {
	v6           bool
	table, chain string
}

// iptListing is a chain's listing (iptables -S) as read by the check that
// last found it holding exactly rules.
type iptListing struct {
	rules [][]string
	lines []string
}

// iptMatches reports whether chain c exists and holds exactly its rules.
// While the chain lists as it did when a check last found it right (and
// its rules are the same), that listing is the answer: one run of the
// binary instead of one per rule. Otherwise each rule is checked, and a
// chain found right is remembered.
func (m *Manager) iptMatches(ipt *iptables.IPTables, v6 bool, c iptChain) (bool, error) {
	k := iptKey{v6: v6, table: c.table, chain: c.chain}
	if seen, ok := m.iptSeen[k]; ok && slices.EqualFunc(seen.rules, c.rules, slices.Equal) {
		if lines, err := ipt.List(c.table, c.chain); err == nil && slices.Equal(lines, seen.lines) {
			return true, nil
		}
	}
	delete(m.iptSeen, k)
	ok, err := ipt.ChainExists(c.table, c.chain)
	if err != nil || !ok {
		return false, err
	}
	lines, err := ipt.List(c.table, c.chain)
	if err != nil {
		return false, fmt.Errorf("list %s/%s: %w", c.table, c.chain, err)
	}
	n := 0
	for _, l := range lines {
		if strings.HasPrefix(l, "-A ") {
			n++
		}
	}
	if n != len(c.rules) {
		return false, nil
	}
	for _, r := range c.rules {
		ok, err := ipt.Exists(c.table, c.chain, r...)
		if err != nil {
			return false, fmt.Errorf("check %s/%s rule %q: %w", c.table, c.chain, strings.Join(r, " "), err)
		}
		if !ok {
			return false, nil
		}
	}
	m.iptSeen[k] = iptListing{rules: c.rules, lines: lines}
	return true, nil
}

// iptRemoveChain deletes every jump to c and c itself. It reports whether
// anything was there.
func (m *Manager) iptRemoveChain(ipt *iptables.IPTables, v6 bool, c iptChain) (bool, error) {
	delete(m.iptSeen, iptKey{v6: v6, table: c.table, chain: c.chain})
	// A jump to a missing chain cannot exist (iptables refuses it, and
	// fails on checking for it).
	ok, err := ipt.ChainExists(c.table, c.chain)
	if err != nil {
		return false, fmt.Errorf("find chain %s/%s: %w", c.table, c.chain, err)
	}
	if !ok {
		return false, nil
	}
	for {
		exists, err := ipt.Exists(c.table, c.from, c.jump...)
		if err != nil {
			return true, fmt.Errorf("check jump %s/%s -> %s: %w", c.table, c.from, c.chain, err)
		}
		if !exists {
			break
		}
		if err := ipt.Delete(c.table, c.from, c.jump...); err != nil {
			return true, fmt.Errorf("delete jump %s/%s -> %s: %w", c.table, c.from, c.chain, err)
		}
	}
	if err := ipt.ClearAndDeleteChain(c.table, c.chain); err != nil {
		return true, fmt.Errorf("delete chain %s/%s: %w", c.table, c.chain, err)
	}
	return true, nil
}

// iptRemove deletes our chains and jumps of one family.
func (m *Manager) iptRemove(v6 bool) error {
	ipt, err := m.iptFor(v6)
	if err != nil {
		return err
	}
	for _, c := range m.iptChains(ipt, family{}) {
		if _, err := m.iptRemoveChain(ipt, v6, c); err != nil {
			return err
		}
	}
	return nil
}
