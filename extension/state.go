package extension

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"

	"github.com/flannelkit/flannel/lease"
)

// peer is what the add and remove commands of one peer were run with. Two
// peers with the same subnets but other addresses or data are a change: the
// old one is removed, the new one added.
type peer struct {
	Subnet     netip.Prefix `json:"subnet,omitzero"`
	IPv6Subnet netip.Prefix `json:"ipv6Subnet,omitzero"`
	PublicIP   netip.Addr   `json:"publicIP,omitzero"`
	PublicIPv6 netip.Addr   `json:"publicIPv6,omitzero"`
	// Data is the peer's backend data, decoded: the command's stdin.
	Data string `json:"data,omitempty"`
}

// key identifies a peer by its subnets.
func (p peer) key() string { return p.Subnet.String() + "," + p.IPv6Subnet.String() }

// lease is p as a lease, for *flannel.PeerError.
func (p peer) lease() lease.Lease {
	return lease.Lease{Subnet: p.Subnet, IPv6Subnet: p.IPv6Subnet, Attrs: lease.Attrs{
		BackendType: Type, PublicIP: p.PublicIP, PublicIPv6: p.PublicIPv6,
	}}
}

// vars are the environment variables of its commands.
func (p peer) vars() []string {
	return []string{
		"SUBNET=" + str(p.Subnet), "IPV6SUBNET=" + str(p.IPv6Subnet),
		"PUBLIC_IP=" + str(p.PublicIP), "PUBLIC_IPV6=" + str(p.PublicIPv6),
	}
}

// str renders an address or prefix, "" when it is the zero value.
func str[T interface {
	IsValid() bool
	String() string
}](v T) string {
	if !v.IsValid() {
		return ""
	}
	return v.String()
}

// peerOf converts a lease; its backend data must be absent or a JSON string.
func peerOf(l lease.Lease) (peer, error) {
	p := peer{Subnet: l.Subnet, IPv6Subnet: l.IPv6Subnet, PublicIP: l.Attrs.PublicIP, PublicIPv6: l.Attrs.PublicIPv6}
	if len(l.Attrs.BackendData) > 0 {
		if err := json.Unmarshal(l.Attrs.BackendData, &p.Data); err != nil {
			return p, fmt.Errorf("backend data %s is not a JSON string: %w", clip(string(l.Attrs.BackendData)), err)
		}
	}
	return p, nil
}

// stateFile keeps the set of added peers. The zero value (no path) keeps
// nothing.
type stateFile struct{ path string }

type stateDoc struct {
	Version int    `json:"version"`
	Peers   []peer `json:"peers"`
}

// load reads the added peers; a missing file is an empty set.
func (s stateFile) load() (map[string]peer, error) {
	out := map[string]peer{}
	if s.path == "" {
		return out, nil
	}
	b, err := os.ReadFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read state %s: %w", s.path, err)
	}
	var doc stateDoc
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("read state %s: %w", s.path, err)
	}
	for _, p := range doc.Peers {
		out[p.key()] = p
	}
	return out, nil
}

// save writes the added peers atomically (a temporary file renamed over
// the old one), creating the directory when needed.
func (s stateFile) save(added map[string]peer) error {
	if s.path == "" {
		return nil
	}
	doc := stateDoc{Version: 1, Peers: []peer{}}
	for _, k := range slices.Sorted(maps.Keys(added)) {
		doc.Peers = append(doc.Peers, added[k])
	}
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	dir := filepath.Dir(s.path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("write state %s: %w", s.path, err)
	}
	f, err := os.CreateTemp(dir, ".extension-peers-*")
	if err != nil {
		return fmt.Errorf("write state %s: %w", s.path, err)
	}
	_, werr := f.Write(append(b, '\n'))
	if err := errors.Join(werr, f.Sync(), f.Close()); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("write state %s: %w", s.path, err)
	}
	if err := os.Rename(f.Name(), s.path); err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("write state %s: %w", s.path, err)
	}
	return nil
}

// remove deletes the state file; a missing one is fine.
func (s stateFile) remove() error {
	if s.path == "" {
		return nil
	}
	if err := os.Remove(s.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove state %s: %w", s.path, err)
	}
	return nil
}
