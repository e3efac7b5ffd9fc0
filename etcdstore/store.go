// Package etcdstore is a flannel.LeaseStore backed by etcd v3, wire-compatible
// with upstream flannel: the network config at <prefix>/config, one key per
// node lease at <prefix>/subnets/<ip>-<len>[&<ip6>-<len>] holding the JSON
// lease attributes and attached to an etcd lease (TTL), reservations as keys
// without an etcd lease.
//
// The caller owns the *clientv3.Client (endpoints, TLS, authentication);
// NewClient builds one from the usual flags. The store never logs secrets.
// It does not watch or change the network config after reading it.
package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// Defaults for Options.
const (
	DefaultPrefix         = "/coreos.com/network"
	DefaultTTL            = 24 * time.Hour
	DefaultRenewMargin    = time.Hour
	DefaultRetryMin       = 200 * time.Millisecond
	DefaultRetryMax       = 30 * time.Second
	DefaultRequestTimeout = 10 * time.Second
)

// defaultListPage is how many keys a listing reads per request: about
// 250 KB of flannel leases, well under etcd's 1.5 MiB request limit.
const defaultListPage = 1000

// Options configure a Store. Every field is optional.
type Options struct {
	// Prefix is the etcd key prefix of the network. Default DefaultPrefix.
	// A trailing "/" is dropped.
	Prefix string
	// TTL is the lifetime of the etcd lease attached to a node's key
	// (rounded up to whole seconds, as etcd counts). Default DefaultTTL.
	TTL time.Duration
	// RenewMargin: Keep renews when less than this is left of the TTL. It
	// must be less than TTL. Default: DefaultRenewMargin, or TTL/2 when
	// TTL is not above it.
	RenewMargin time.Duration
	// RetryMin and RetryMax bound the capped, jittered exponential backoff
	// of Keep and Watch after a failure. Defaults DefaultRetryMin and
	// DefaultRetryMax.
	RetryMin, RetryMax time.Duration
	// RequestTimeout bounds each etcd request. Default DefaultRequestTimeout.
	RequestTimeout time.Duration
	// MaxAttempts bounds the compare-and-swap attempts of one Acquire (a
	// lost race retries with another subnet). Default 32.
	MaxAttempts int
	// Logger receives the store's logs. nil discards.
	Logger *slog.Logger
	// Rand is the random source for picking subnets and jitter. nil uses
	// math/rand/v2's default source. The store serialises its use.
	Rand *rand.Rand
	// Now returns the current time, for lease expirations. Default time.Now.
	Now func() time.Time
	// OnRenew, when set, is called by Keep after each successful renewal
	// of a node's etcd lease, with the node's key; for metrics. It must
	// not block.
	OnRenew func(key string)
}

// Store is an etcd-backed lease store. It is safe for concurrent use.
type Store struct {
	client      *clientv3.Client
	prefix      string
	configKey   string
	subnetsKey  string // with trailing "/"
	ttl         time.Duration
	ttlSeconds  int64
	margin      time.Duration
	retryMin    time.Duration
	retryMax    time.Duration
	reqTimeout  time.Duration
	maxAttempts int
	log         *slog.Logger
	now         func() time.Time
	onRenew     func(key string)

	rngMu sync.Mutex
	rng   *rand.Rand

	// own is the lease the last Acquire returned: Watch never hands out
	// another node's lease claiming its subnet.
	ownMu sync.Mutex
	own   lease.Lease
	warn  lease.Warnings

	// listPage is how many keys list reads per request (defaultListPage);
	// afterPage, when set (tests), runs between its requests.
	listPage  int
	afterPage func()

	// primed is the listing of the last successful Acquire, until a Watch
	// starts from it (prime); found is FindOwn's, until the next Acquire
	// starts from it (takeFound).
	primed handoff[listing]
	found  handoff[rawListing]

	// grantedTTL is the TTL etcd actually granted last time (it raises
	// TTLs below its minimum); Keep compares an etcd lease's TTL to it.
	grantedTTL atomic.Int64
}

var (
	_ flannel.LeaseStore    = (*Store)(nil)
	_ flannel.LeaseReleaser = (*Store)(nil)
	_ flannel.LeaseFinder   = (*Store)(nil)
)

// New returns a store using client, which the caller keeps owning (and
// closes after the store is no longer used). The error names the invalid
// option.
func New(client *clientv3.Client, opts Options) (*Store, error) {
	if client == nil {
		return nil, errors.New("etcd store: client is required")
	}
	prefix := strings.TrimRight(opts.Prefix, "/")
	if opts.Prefix == "" {
		prefix = DefaultPrefix
	}
	if prefix == "" || !strings.HasPrefix(prefix, "/") {
		return nil, fmt.Errorf("etcd store: prefix %q must start with / and name a directory", opts.Prefix)
	}
	s := &Store{
		client:      client,
		prefix:      prefix,
		configKey:   prefix + "/config",
		subnetsKey:  prefix + "/subnets/",
		ttl:         opts.TTL,
		margin:      opts.RenewMargin,
		retryMin:    opts.RetryMin,
		retryMax:    opts.RetryMax,
		reqTimeout:  opts.RequestTimeout,
		maxAttempts: opts.MaxAttempts,
		log:         opts.Logger,
		now:         opts.Now,
		onRenew:     opts.OnRenew,
		rng:         opts.Rand,
		listPage:    defaultListPage,
	}
	if s.ttl == 0 {
		s.ttl = DefaultTTL
	}
	if s.ttl < time.Second {
		return nil, fmt.Errorf("etcd store: TTL %s is below etcd's one-second granularity", s.ttl)
	}
	s.ttlSeconds = int64((s.ttl + time.Second - 1) / time.Second)
	if s.margin == 0 {
		s.margin = DefaultRenewMargin
		if s.ttl <= s.margin {
			s.margin = s.ttl / 2
		}
	}
	if s.margin < 0 || s.margin >= s.ttl {
		return nil, fmt.Errorf("etcd store: renew margin %s must be positive and below the TTL %s", s.margin, s.ttl)
	}
	if s.retryMin <= 0 {
		s.retryMin = DefaultRetryMin
	}
	if s.retryMax <= 0 {
		s.retryMax = DefaultRetryMax
	}
	if s.retryMax < s.retryMin {
		return nil, fmt.Errorf("etcd store: RetryMax %s is below RetryMin %s", s.retryMax, s.retryMin)
	}
	if s.reqTimeout <= 0 {
		s.reqTimeout = DefaultRequestTimeout
	}
	if s.maxAttempts <= 0 {
		s.maxAttempts = 32
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	s.grantedTTL.Store(s.ttlSeconds)
	return s, nil
}

// Prefix returns the key prefix of the network, without trailing "/".
func (s *Store) Prefix() string { return s.prefix }

// LeaseKey returns the etcd key of l: <prefix>/subnets/<l.Key()>.
func (s *Store) LeaseKey(l lease.Lease) string { return s.subnetsKey + l.Key() }

// Config reads and parses <prefix>/config. The error names the key; a
// config that does not parse wraps lease.ErrInvalidConfig.
func (s *Store) Config(ctx context.Context) (lease.Config, error) {
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	resp, err := s.client.Get(rctx, s.configKey)
	if err != nil {
		return lease.Config{}, fmt.Errorf("read network config %s: %w", s.configKey, err)
	}
	if len(resp.Kvs) == 0 {
		return lease.Config{}, fmt.Errorf("read network config %s: key not found", s.configKey)
	}
	cfg, err := lease.ParseConfig(resp.Kvs[0].Value)
	if err != nil {
		return lease.Config{}, fmt.Errorf("network config %s: %w", s.configKey, err)
	}
	return cfg, nil
}

// PutConfig validates netConf (net-conf.json, see lease.ParseConfig) and
// writes it unchanged to <prefix>/config, replacing any previous value.
// Nodes read it when they (re)start.
func (s *Store) PutConfig(ctx context.Context, netConf []byte) error {
	if _, err := lease.ParseConfig(netConf); err != nil {
		return fmt.Errorf("write network config %s: %w", s.configKey, err)
	}
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	if _, err := s.client.Put(rctx, s.configKey, string(netConf)); err != nil {
		return fmt.Errorf("write network config %s: %w", s.configKey, err)
	}
	return nil
}

// Release deletes l's key if this node (l's public IP) holds it and it is
// not a reservation, and revokes its etcd lease. A key that is gone or held
// by another node is left alone (nil). Peers see the lease disappear.
func (s *Store) Release(ctx context.Context, l lease.Lease) error {
	key := s.LeaseKey(l)
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	resp, err := s.client.Get(rctx, key)
	if err != nil {
		return fmt.Errorf("release lease %s: %w", key, err)
	}
	if len(resp.Kvs) == 0 {
		return nil
	}
	kv := resp.Kvs[0]
	cur, err := s.parse(kv.Key, kv.Value)
	if err != nil || !l.Identity().IsValid() || cur.Identity() != l.Identity() {
		s.log.Info("not releasing a lease held by another node", "key", key)
		return nil
	}
	if kv.Lease == 0 {
		s.log.Info("not releasing a reservation", "key", key)
		return nil
	}
	txn, err := s.client.Txn(rctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)).
		Then(clientv3.OpDelete(key)).Commit()
	if err != nil {
		return fmt.Errorf("release lease %s: %w", key, err)
	}
	if !txn.Succeeded {
		// Changed since we read it: renewed by ourselves or taken; a
		// caller that releases is going away, so say what happened.
		return fmt.Errorf("release lease %s: key changed concurrently", key)
	}
	s.revoke(ctx, clientv3.LeaseID(kv.Lease))
	s.log.Info("lease released", "key", key)
	return nil
}

// reqCtx bounds one etcd request.
func (s *Store) reqCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.reqTimeout)
}

// revoke revokes an etcd lease, best effort (it also expires by itself).
// It runs even when ctx is cancelled, bounded by the request timeout.
func (s *Store) revoke(ctx context.Context, id clientv3.LeaseID) {
	if id == clientv3.NoLease {
		return
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.reqTimeout)
	defer cancel()
	if _, err := s.client.Revoke(rctx, id); err != nil {
		s.log.Debug("revoke etcd lease failed; it will expire", "lease_id", int64(id), "error", err)
	}
}

// grant creates an etcd lease of the store's TTL.
func (s *Store) grant(ctx context.Context) (clientv3.LeaseID, error) {
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	resp, err := s.client.Grant(rctx, s.ttlSeconds)
	if err != nil {
		return clientv3.NoLease, fmt.Errorf("grant etcd lease of %ds: %w", s.ttlSeconds, err)
	}
	s.grantedTTL.Store(resp.TTL)
	return resp.ID, nil
}

// randN returns a random number in [0, n) from the store's source.
func (s *Store) randN(n int64) int64 {
	if n <= 0 {
		return 0
	}
	if s.rng == nil {
		return rand.Int64N(n)
	}
	s.rngMu.Lock()
	defer s.rngMu.Unlock()
	return s.rng.Int64N(n)
}
