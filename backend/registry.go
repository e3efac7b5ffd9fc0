package backend

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// ErrUnknownBackend is wrapped by Registry.New when the configured backend
// type is not registered.
var ErrUnknownBackend = errors.New("unknown backend type")

// Constructor builds a backend from the cluster network configuration; it
// decodes its own keys from cfg.Backend and rejects unknown ones.
type Constructor func(cfg lease.Config) (flannel.Backend, error)

// Registry maps backend types ("host-gw", "vxlan", "ipsec") to constructors.
// There is no global registry: a program registers the backends it links.
// It is safe for concurrent use.
type Registry struct {
	mu   sync.RWMutex
	ctor map[string]Constructor
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{ctor: map[string]Constructor{}}
}

// Register adds a constructor for typ. It fails when typ is empty, c is nil
// or typ is already registered.
func (r *Registry) Register(typ string, c Constructor) error {
	if typ == "" {
		return errors.New("register backend: empty type")
	}
	if c == nil {
		return fmt.Errorf("register backend %q: nil constructor", typ)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ctor == nil {
		r.ctor = map[string]Constructor{}
	}
	if _, dup := r.ctor[typ]; dup {
		return fmt.Errorf("register backend %q: already registered", typ)
	}
	r.ctor[typ] = c
	return nil
}

// Types returns the registered types, sorted.
func (r *Registry) Types() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]string, 0, len(r.ctor))
	for t := range r.ctor {
		out = append(out, t)
	}
	slices.Sort(out)
	return out
}

// New builds the backend cfg.BackendType names ("vxlan" when empty, as in
// upstream). An unregistered type yields an error wrapping
// ErrUnknownBackend that lists the known types; a constructor's error is
// wrapped with the type.
func (r *Registry) New(cfg lease.Config) (flannel.Backend, error) {
	typ := cfg.BackendType
	if typ == "" {
		typ = "vxlan"
	}
	r.mu.RLock()
	c, ok := r.ctor[typ]
	r.mu.RUnlock()
	if !ok {
		known := r.Types()
		list := "none registered"
		if len(known) > 0 {
			list = "known: " + strings.Join(known, ", ")
		}
		return nil, fmt.Errorf("%w %q (%s)", ErrUnknownBackend, typ, list)
	}
	b, err := c(cfg)
	if err != nil {
		return nil, fmt.Errorf("backend %q: %w", typ, err)
	}
	return b, nil
}

// WarnIgnoredKeys warns once per key of the "Backend" object that the typ
// backend accepted without effect: keys upstream reads on another platform
// (Windows), which a net-conf.json shared with such nodes carries.
func WarnIgnoredKeys(log *slog.Logger, typ string, keys []string) {
	for _, k := range keys {
		log.Warn("net-conf.json key ignored: upstream uses it on Windows only", "key", "Backend."+k, "backend", typ)
	}
}
