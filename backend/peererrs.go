package backend

import (
	"errors"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// PeerErrs collects the errors of each peer of an Apply, by the peer's
// index in the peer set, in first-failure order. Its zero value is empty
// and ready to use.
type PeerErrs struct {
	order []int
	errs  map[int][]error
}

// Add records err for peer i.
func (p *PeerErrs) Add(i int, err error) {
	if p.errs == nil {
		p.errs = map[int][]error{}
	}
	if _, seen := p.errs[i]; !seen {
		p.order = append(p.order, i)
	}
	p.errs[i] = append(p.errs[i], err)
}

// Errors returns one *flannel.PeerError per failed peer (of peers, which
// the indexes refer to), in first-failure order, joining its errors.
func (p *PeerErrs) Errors(peers []lease.Lease) []error {
	out := make([]error, 0, len(p.order))
	for _, i := range p.order {
		out = append(out, &flannel.PeerError{Lease: peers[i], Err: errors.Join(p.errs[i]...)})
	}
	return out
}
