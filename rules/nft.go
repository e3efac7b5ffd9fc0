package rules

import (
	"context"
	"fmt"
	"hash/fnv"
	"strings"

	"sigs.k8s.io/knftables"
)

// nftFor returns the knftables interface of a family's table, creating it
// (which runs nft) on first use. Called in the namespace, under m.mu.
func (m *Manager) nftFor(v6 bool) (knftables.Interface, error) {
	fam, table := knftables.IPv4Family, nftTable4
	if v6 {
		fam, table = knftables.IPv6Family, nftTable6
	}
	if nft, ok := m.nft[fam]; ok {
		return nft, nil
	}
	nft, err := knftables.New(fam, table)
	if err != nil {
		return nil, fmt.Errorf("nftables table %s %s: %w", fam, table, err)
	}
	m.nft[fam] = nft
	return nft, nil
}

// nftChain is one chain of ours with the rules it should hold.
type nftChain struct {
	chain *knftables.Chain
	rules []string
	want  bool
}

func nftChains(f family, masq, fwd bool) []nftChain {
	return []nftChain{
		{
			chain: &knftables.Chain{Name: nftPostrtg, Type: knftables.PtrTo(knftables.NATType),
				Hook: knftables.PtrTo(knftables.PostroutingHook), Priority: knftables.PtrTo(knftables.SNATPriority)},
			rules: nftMasqRules(f),
			want:  masq,
		},
		{
			chain: &knftables.Chain{Name: nftForward, Type: knftables.PtrTo(knftables.FilterType),
				Hook: knftables.PtrTo(knftables.ForwardHook), Priority: knftables.PtrTo(knftables.FilterPriority)},
			rules: nftFwdRules(f),
			want:  fwd,
		},
	}
}

// nftComment tags rule i of a chain with a hash of the chain's whole rule
// set, so that a check can tell from the listing (which knftables returns
// without the rule text) that every rule is present and current.
func nftComment(chain string, rules []string, i int) string {
	h := fnv.New32a()
	h.Write([]byte(chain + "\n" + strings.Join(rules, "\n")))
	return fmt.Sprintf("flanneld %s %08x/%d", chain, h.Sum32(), i)
}

// nftEnsure makes the family's table hold exactly the wanted chains and
// rules. The rewrite is one nft transaction: packets never see a partial
// rule set.
func (m *Manager) nftEnsure(ctx context.Context, f family) (bool, error) {
	nft, err := m.nftFor(f.v6())
	if err != nil {
		return false, err
	}
	chains := nftChains(f, m.masquerades(f), m.opts.Forward)
	if ok, err := nftMatches(ctx, nft, chains); err != nil {
		return false, err
	} else if ok {
		return false, nil
	}
	tx := nft.NewTransaction()
	tx.Add(&knftables.Table{Comment: knftables.PtrTo("flannel")})
	for _, c := range chains {
		tx.Add(c.chain)
		if !c.want {
			tx.Delete(&knftables.Chain{Name: c.chain.Name})
			continue
		}
		tx.Flush(&knftables.Chain{Name: c.chain.Name})
		for i, r := range c.rules {
			tx.Add(&knftables.Rule{Chain: c.chain.Name, Rule: r, Comment: knftables.PtrTo(nftComment(c.chain.Name, c.rules, i))})
		}
	}
	if err := nft.Run(ctx, tx); err != nil {
		return false, fmt.Errorf("write nftables table: %w", err)
	}
	return true, nil
}

// nftMatches reports whether the table holds exactly the wanted chains
// with the wanted rules.
func nftMatches(ctx context.Context, nft knftables.Interface, chains []nftChain) (bool, error) {
	have, err := nft.List(ctx, "chains")
	if knftables.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("list nftables chains: %w", err)
	}
	present := map[string]bool{}
	for _, c := range have {
		present[c] = true
	}
	rules, err := nft.ListRules(ctx, "")
	if knftables.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("list nftables rules: %w", err)
	}
	byChain := map[string][]*knftables.Rule{}
	for _, r := range rules {
		byChain[r.Chain] = append(byChain[r.Chain], r)
	}
	for _, c := range chains {
		name := c.chain.Name
		if present[name] != c.want {
			return false, nil
		}
		if !c.want {
			continue
		}
		got := byChain[name]
		if len(got) != len(c.rules) {
			return false, nil
		}
		for i, r := range got {
			if r.Comment == nil || *r.Comment != nftComment(name, c.rules, i) {
				return false, nil
			}
		}
	}
	return true, nil
}

// nftRemove deletes the family's table. Adding it first makes the delete
// succeed when it is absent, without `nft destroy` (nft >= 1.0.8).
func (m *Manager) nftRemove(ctx context.Context, v6 bool) error {
	nft, err := m.nftFor(v6)
	if err != nil {
		return err
	}
	tx := nft.NewTransaction()
	tx.Add(&knftables.Table{})
	tx.Delete(&knftables.Table{})
	if err := nft.Run(ctx, tx); err != nil {
		return fmt.Errorf("delete nftables table: %w", err)
	}
	return nil
}
