package etcdstore_test

import (
	"io"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/storetest"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

// cpuTime is the CPU time (user + system) this process used so far.
func cpuTime(t *testing.T) time.Duration {
	t.Helper()
	var ru syscall.Rusage
	require.NoError(t, syscall.Getrusage(syscall.RUSAGE_SELF, &ru))
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// measureIdle returns the CPU time used over d, during which the test does
// nothing but wait.
func measureIdle(t *testing.T, d time.Duration) time.Duration {
	t.Helper()
	before := cpuTime(t)
	time.Sleep(d)
	return cpuTime(t) - before
}

// assertNoSpin checks CPU use over an outage of length d against a bound
// generous enough for a loaded CI machine but far below a spinning loop
// (which burns a whole core).
func assertNoSpin(t *testing.T, cpu, d time.Duration) {
	t.Helper()
	t.Logf("CPU time during a %s etcd outage: %s (%.1f%% of one core)", d, cpu, 100*cpu.Seconds()/d.Seconds())
	assert.Less(t, cpu, d/2, "CPU time during the outage: something spins")
}

// Not parallel: it measures the CPU time of the whole process.
func TestWatchAcrossRestart(t *testing.T) {
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	ctx := t.Context()
	logs := &testenv.LogBuffer{}
	opts := etcdstore.Options{Logger: logs.Logger()}
	s := e.store(t, nil, opts)
	first, err := s.Acquire(ctx, lease.Request{Attrs: attrs(1)})
	require.NoError(t, err)
	w := storetest.Watch(t, s)
	w.WaitFor(t, "first lease", storetest.HasKey(first.Key()))
	startKeep(t, s, first)

	t0 := time.Now()
	e.srv.Stop()
	t.Logf("stop took %s", time.Since(t0))
	const outage = 5 * time.Second
	cpu := measureIdle(t, outage)
	assertNoSpin(t, cpu, outage)
	t0 = time.Now()
	require.NoError(t, e.srv.Start())
	t.Logf("start took %s", time.Since(t0))

	// Created right after the restart, likely before the watcher is back.
	second, err := e.store(t, nil, opts).Acquire(ctx, lease.Request{Attrs: attrs(2)})
	require.NoError(t, err)
	t.Logf("acquire after %s", time.Since(t0))
	sn := w.WaitFor(t, "lease created after the restart", storetest.HasKey(second.Key()))
	t.Logf("watch after %s", time.Since(t0))
	assert.True(t, storetest.HasKey(first.Key())(sn), "kept lease survived the outage")
	assert.NotContains(t, logs.String(), "level=ERROR")
}

// proxy is a loopback TCP proxy to etcd that a test can cut, so that one
// client loses etcd while others keep writing.
type proxy struct {
	ln     net.Listener
	target string
	wg     sync.WaitGroup
	mu     sync.Mutex
	cut    bool
	conns  map[net.Conn]struct{}
}

func newProxy(t *testing.T, endpoint string) *proxy {
	t.Helper()
	u, err := url.Parse(endpoint)
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &proxy{ln: ln, target: u.Host, conns: map[net.Conn]struct{}{}}
	p.wg.Go(p.serve)
	t.Cleanup(p.close)
	return p
}

func (p *proxy) endpoint() string { return "http://" + p.ln.Addr().String() }

func (p *proxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		cut := p.cut
		p.mu.Unlock()
		if cut {
			c.Close()
			continue
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		if !p.track(c, up) {
			continue
		}
		p.wg.Go(func() { io.Copy(up, c); up.Close(); c.Close() })
		p.wg.Go(func() { io.Copy(c, up); up.Close(); c.Close() })
	}
}

func (p *proxy) track(cs ...net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cut {
		for _, c := range cs {
			c.Close()
		}
		return false
	}
	for _, c := range cs {
		p.conns[c] = struct{}{}
	}
	return true
}

// setCut cuts (closing every connection) or restores the proxy.
func (p *proxy) setCut(cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = cut
	if cut {
		for c := range p.conns {
			c.Close()
		}
		clear(p.conns)
	}
}

func (p *proxy) close() {
	p.ln.Close()
	p.setCut(true)
	p.wg.Wait()
}

// Not parallel: it measures the CPU time of the whole process.
func TestWatchCompaction(t *testing.T) {
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	ctx := t.Context()
	p := newProxy(t, e.srv.Endpoints[0])
	cfg, err := e.srv.ClientConfig()
	require.NoError(t, err)
	cfg.Endpoints = []string{p.endpoint()}
	c, err := clientv3.New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	logs := &testenv.LogBuffer{}
	s := e.store(t, c, etcdstore.Options{Logger: logs.Logger()})
	writer := e.store(t, e.admin, etcdstore.Options{})

	var leases []lease.Lease
	for i := range 3 {
		l, err := writer.Acquire(ctx, lease.Request{Attrs: attrs(i)})
		require.NoError(t, err)
		leases = append(leases, l)
	}
	w := storetest.Watch(t, s)
	w.WaitFor(t, "three leases", func(sn lease.Snapshot) bool { return len(sn.Leases) == 3 })

	// Cut the watcher off; meanwhile leases come and go and the history
	// is compacted past the watcher's revision.
	p.setCut(true)
	require.NoError(t, writer.Release(ctx, leases[0]))
	for i := 3; i < 6; i++ {
		l, err := writer.Acquire(ctx, lease.Request{Attrs: attrs(i)})
		require.NoError(t, err)
		leases = append(leases, l)
	}
	require.NoError(t, writer.Release(ctx, leases[3]))
	resp, err := e.admin.Get(ctx, "/")
	require.NoError(t, err)
	require.NoError(t, e.srv.Compact(ctx, resp.Header.Revision))
	nBefore := len(w.All())

	const outage = 5 * time.Second
	cpu := measureIdle(t, outage)
	assertNoSpin(t, cpu, outage)
	p.setCut(false)

	want := []string{leases[1].Key(), leases[2].Key(), leases[4].Key(), leases[5].Key()}
	sn := w.WaitFor(t, "the state after the outage", func(sn lease.Snapshot) bool {
		return assert.ObjectsAreEqual(sortedStrings(want), sortedStrings(storetest.Keys(sn)))
	})
	assert.True(t, sn.Resync, "a fresh snapshot after compaction")
	resyncs := 0
	for _, s := range w.All()[nBefore:] {
		if s.Resync {
			resyncs++
		}
	}
	assert.Positive(t, resyncs)
	assert.Contains(t, logs.String(), "compacted")

	// And the watch goes on.
	more, err := writer.Acquire(ctx, lease.Request{Attrs: attrs(9)})
	require.NoError(t, err)
	w.WaitFor(t, "a lease after the resync", storetest.HasKey(more.Key()))
}

func sortedStrings(s []string) []string {
	out := slices.Clone(s)
	slices.Sort(out)
	return out
}

func TestWatchMalformed(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	ctx := t.Context()
	logs := &testenv.LogBuffer{}
	s := e.store(t, nil, etcdstore.Options{Logger: logs.Logger()})
	// The malformed keys come first, so Acquire cannot pick their subnet.
	badKey := e.prefix + "/subnets/not-a-subnet"
	badValue := e.prefix + "/subnets/10.244.9.0-24"
	for k, v := range map[string]string{badKey: mustJSON(t, attrs(2)), badValue: "garbage"} {
		_, err := e.admin.Put(ctx, k, v)
		require.NoError(t, err)
	}
	good, err := s.Acquire(ctx, lease.Request{Attrs: attrs(1)})
	require.NoError(t, err)

	w := storetest.Watch(t, s)
	sn := w.WaitFor(t, "the good lease", storetest.HasKey(good.Key()))
	assert.Equal(t, []string{good.Key()}, storetest.Keys(sn))
	assert.Contains(t, logs.String(), badKey)
	assert.Contains(t, logs.String(), badValue)

	// A lease garbled later drops out; fixed, it comes back.
	key := s.LeaseKey(good)
	_, err = e.admin.Put(ctx, key, `{"PublicIP":"nope"}`)
	require.NoError(t, err)
	w.WaitFor(t, "garbled lease gone", storetest.Not(storetest.HasKey(good.Key())))
	_, err = e.admin.Put(ctx, key, mustJSON(t, attrs(1)))
	require.NoError(t, err)
	w.WaitFor(t, "lease fixed", storetest.HasKey(good.Key()))

	// The malformed value's subnet is never handed out.
	for i := 10; i < 20; i++ {
		l, err := s.Acquire(ctx, lease.Request{Attrs: attrs(i), Previous: lease.Lease{Subnet: netip.MustParsePrefix("10.244.9.0/24")}})
		require.NoError(t, err)
		require.NotEqual(t, "10.244.9.0/24", l.Subnet.String())
	}
}

// The first Watch after an Acquire starts from Acquire's listing and
// catches up from its revision: what changed in between arrives as events,
// not as a second listing. A later Watch lists afresh.
func TestWatchStartsFromAcquire(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	ctx := t.Context()
	s := e.store(t, nil, etcdstore.Options{})
	gone, err := e.store(t, nil, etcdstore.Options{}).Acquire(ctx, lease.Request{Attrs: attrs(2)})
	require.NoError(t, err)
	own, err := s.Acquire(ctx, lease.Request{Attrs: attrs(1)})
	require.NoError(t, err)

	// After Acquire listed: a peer joins, another leaves.
	joined, err := e.store(t, nil, etcdstore.Options{}).Acquire(ctx, lease.Request{Attrs: attrs(3)})
	require.NoError(t, err)
	_, err = e.admin.Delete(ctx, s.LeaseKey(gone))
	require.NoError(t, err)

	w := storetest.Watch(t, s)
	// The node's own lease comes first (lease.Feed).
	want := []string{own.Key(), joined.Key()}
	now := func(sn lease.Snapshot) bool { return slices.Equal(storetest.Keys(sn), want) }
	w.WaitFor(t, "the peer that joined, not the one that left", now)
	all := w.All()
	require.GreaterOrEqual(t, len(all), 2, "one snapshot: Watch listed again instead of starting from Acquire's listing")
	assert.True(t, all[0].Resync)
	assert.Equal(t, []string{own.Key(), gone.Key()}, storetest.Keys(all[0]), "the first snapshot is Acquire's listing with the key it wrote")
	w.Stop(t)

	again := storetest.Watch(t, s)
	sn := again.WaitFor(t, "a fresh listing", func(lease.Snapshot) bool { return true })
	assert.True(t, sn.Resync)
	assert.Equal(t, want, storetest.Keys(sn), "a second Watch lists afresh")
}
