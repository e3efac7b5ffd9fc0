package etcdstore_test

import (
	"bufio"
	"context"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/storetest"
	"github.com/flannelkit/flannel/lease"
)

func TestNewOptions(t *testing.T) {
	t.Parallel()
	srv := etcdtest.NewT(t, etcdtest.Options{})
	c := etcdtest.ClientT(t, srv)
	tests := []struct {
		name    string
		client  *clientv3.Client
		opts    etcdstore.Options
		wantErr string
	}{
		{name: "defaults", client: c},
		{name: "short ttl gets a margin", client: c, opts: etcdstore.Options{TTL: 10 * time.Second}},
		{name: "nil client", wantErr: "client is required"},
		{name: "relative prefix", client: c, opts: etcdstore.Options{Prefix: "coreos.com"}, wantErr: "prefix"},
		{name: "sub-second ttl", client: c, opts: etcdstore.Options{TTL: time.Millisecond}, wantErr: "TTL"},
		{name: "margin above ttl", client: c, opts: etcdstore.Options{TTL: time.Minute, RenewMargin: time.Hour}, wantErr: "renew margin"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := etcdstore.New(tt.client, tt.opts)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, etcdstore.DefaultPrefix, s.Prefix())
		})
	}
}

func TestConfig(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	s := e.store(t, nil, etcdstore.Options{})
	ctx := t.Context()

	_, err := s.Config(ctx)
	require.ErrorContains(t, err, e.prefix+"/config", "a missing config names the key")
	require.ErrorContains(t, err, "not found")

	err = s.PutConfig(ctx, []byte(`{"Network":"10.244.0.0/33"}`))
	require.ErrorIs(t, err, lease.ErrInvalidConfig)
	require.ErrorContains(t, err, e.prefix+"/config")

	_, err = e.admin.Put(ctx, e.prefix+"/config", `{"Network": 5}`)
	require.NoError(t, err)
	_, err = s.Config(ctx)
	require.ErrorIs(t, err, lease.ErrInvalidConfig)
	require.ErrorContains(t, err, e.prefix+"/config")

	require.NoError(t, s.PutConfig(ctx, []byte(netConf)))
	kv, ok := e.get(t, e.prefix+"/config")
	require.True(t, ok)
	assert.Equal(t, netConf, kv.Value, "PutConfig writes the bytes given")
	cfg, err := s.Config(ctx)
	require.NoError(t, err)
	assert.Equal(t, netip.MustParsePrefix("10.244.0.0/16"), cfg.Network)
	assert.Equal(t, 24, cfg.SubnetLen)
	assert.Equal(t, "vxlan", cfg.BackendType)
}

type sample struct{ key, value string }

func readSamples(t *testing.T) (config string, subnets []sample) {
	t.Helper()
	f, err := os.Open("../lease/testdata/compat/etcd-keys.tsv")
	require.NoError(t, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "\t")
		if !ok {
			continue
		}
		if strings.HasSuffix(k, "/config") {
			config = v
		} else {
			subnets = append(subnets, sample{k, v})
		}
	}
	require.NoError(t, sc.Err())
	require.NotEmpty(t, config)
	require.Len(t, subnets, 3)
	return config, subnets
}

// TestUpstreamSamples reads keys written in upstream flannel's format and
// checks that the values this store writes are upstream's bytes.
func TestUpstreamSamples(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	config, subnets := readSamples(t)
	ctx := t.Context()

	// Read: the samples as upstream wrote them, under the default prefix.
	_, err := e.admin.Put(ctx, "/coreos.com/network/config", config)
	require.NoError(t, err)
	for _, s := range subnets {
		_, err := e.admin.Put(ctx, s.key, s.value)
		require.NoError(t, err)
	}
	reader := e.store(t, nil, etcdstore.Options{Prefix: etcdstore.DefaultPrefix})
	cfg, err := reader.Config(ctx)
	require.NoError(t, err)
	assert.Equal(t, netip.MustParsePrefix("10.244.0.0/16"), cfg.Network)
	w := storetest.Watch(t, reader)
	// The dual-stack sample lies outside the sample config's network: it
	// is ignored (lease.RuleOutside) and read below under its own config.
	sn := w.WaitFor(t, "the samples", func(sn lease.Snapshot) bool { return len(sn.Leases) == 2 })
	assert.True(t, sn.Resync)
	byKey := map[string]lease.Lease{}
	for _, l := range sn.Leases {
		byKey[reader.LeaseKey(l)] = l
	}
	dualKey := "10.42.1.0-24&2001:cafe:42:1::-64"
	assert.NotContains(t, byKey, "/coreos.com/network/subnets/"+dualKey)
	dualPrefix := e.prefix + "/dualread"
	dualReader := e.store(t, nil, etcdstore.Options{Prefix: dualPrefix})
	require.NoError(t, dualReader.PutConfig(ctx, []byte(`{"Network":"10.42.0.0/16","EnableIPv6":true,"IPv6Network":"2001:cafe:42::/48"}`)))
	for _, s := range subnets {
		if strings.HasSuffix(s.key, dualKey) {
			_, err := e.admin.Put(ctx, dualPrefix+"/subnets/"+dualKey, s.value)
			require.NoError(t, err)
		}
	}
	dsn := storetest.Watch(t, dualReader).WaitFor(t, "the dual-stack sample", func(sn lease.Snapshot) bool { return len(sn.Leases) == 1 })
	dual := dsn.Leases[0]
	assert.Equal(t, netip.MustParsePrefix("10.42.1.0/24"), dual.Subnet)
	assert.Equal(t, netip.MustParsePrefix("2001:cafe:42:1::/64"), dual.IPv6Subnet)
	assert.Equal(t, netip.MustParseAddr("2001:db8::13"), dual.Attrs.PublicIPv6)
	assert.JSONEq(t, `{"VNI":1,"VtepMAC":"9e:01:22:33:44:66"}`, string(dual.Attrs.BackendV6Data))
	hostgw := byKey["/coreos.com/network/subnets/10.244.7.0-24"]
	assert.Equal(t, "host-gw", hostgw.Attrs.BackendType)
	assert.Equal(t, netip.MustParseAddr("192.168.1.12"), hostgw.Attrs.PublicIP)
	assert.False(t, hostgw.Attrs.PublicIPv6.IsValid())

	// Write: each sample's node acquires its subnets in an empty network of
	// the right shape; the key and the value must be upstream's bytes.
	confs := map[string]string{
		"10.244.3.0-24":                    netConf,
		"10.244.7.0-24":                    `{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`,
		"10.42.1.0-24&2001:cafe:42:1::-64": `{"Network":"10.42.0.0/16","EnableIPv6":true,"IPv6Network":"2001:cafe:42::/48"}`,
	}
	for _, s := range subnets {
		name := strings.TrimPrefix(s.key, "/coreos.com/network/subnets/")
		t.Run(name, func(t *testing.T) {
			prefix := e.prefix + "/" + strings.ReplaceAll(name, "&", "_")
			st := e.store(t, nil, etcdstore.Options{Prefix: prefix})
			require.NoError(t, st.PutConfig(ctx, []byte(confs[name])))
			v4, v6, err := lease.ParseKey(name)
			require.NoError(t, err)
			var a lease.Attrs
			require.NoError(t, a.UnmarshalJSON([]byte(s.value)))
			got, err := st.Acquire(ctx, lease.Request{Attrs: a, Previous: lease.Lease{Subnet: v4, IPv6Subnet: v6}})
			require.NoError(t, err)
			assert.Equal(t, name, got.Key())
			kv, ok := e.get(t, prefix+"/subnets/"+name)
			require.True(t, ok, "key %s written", name)
			want := s.value
			if !strings.Contains(want, `"PublicIPv6"`) {
				// Written by an older upstream; current upstream always
				// writes PublicIPv6, null when absent.
				want = strings.Replace(want, `,"BackendType"`, `,"PublicIPv6":null,"BackendType"`, 1)
			}
			assert.Equal(t, want, kv.Value)
			assert.NotZero(t, kv.Lease, "attached to an etcd lease")
		})
	}
}

func TestAcquireConcurrent(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	const agents = 50
	clients := make([]*clientv3.Client, 5)
	for i := range clients {
		clients[i] = e.client(t)
	}
	tests := []struct {
		name string
		conf string
		free int
	}{
		{name: "room for all", conf: netConf, free: 255},
		// A /24 of /28s: 16 subnets, the first one excluded by SubnetMin.
		{name: "room for 15", conf: `{"Network":"10.5.0.0/24","SubnetLen":28}`, free: 15},
		// Dual-stack keys name both subnets: two keys that differ can still
		// share the IPv6 one. 255 IPv4 subnets but only 15 IPv6 ones.
		{name: "dual-stack room for 15", conf: `{"Network":"10.6.0.0/16","EnableIPv6":true,` +
			`"IPv6Network":"fd00:6::/60","IPv6SubnetLen":64}`, free: 15},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := e.prefix + "/" + strings.ReplaceAll(tt.name, " ", "_")
			cfgStore := e.store(t, e.admin, etcdstore.Options{Prefix: prefix})
			require.NoError(t, cfgStore.PutConfig(t.Context(), []byte(tt.conf)))
			cfg, err := lease.ParseConfig([]byte(tt.conf))
			require.NoError(t, err)

			leases := make([]lease.Lease, agents)
			errs := make([]error, agents)
			var wg sync.WaitGroup
			start := make(chan struct{})
			for i := range agents {
				st := e.store(t, clients[i%len(clients)], etcdstore.Options{Prefix: prefix})
				wg.Go(func() {
					<-start
					leases[i], errs[i] = st.Acquire(t.Context(), lease.Request{Attrs: attrs(i)})
				})
			}
			close(start)
			wg.Wait()

			want := min(agents, tt.free)
			seen := map[netip.Prefix]int{}
			ok := 0
			for i := range agents {
				if errs[i] != nil {
					require.ErrorIs(t, errs[i], lease.ErrNoFreeSubnet, "agent %d", i)
					continue
				}
				ok++
				require.NoError(t, cfg.CheckLease(leases[i]), "agent %d lease inside SubnetMin..SubnetMax", i)
				for _, p := range []netip.Prefix{leases[i].Subnet, leases[i].IPv6Subnet} {
					if !p.IsValid() {
						continue
					}
					if j, dup := seen[p]; dup {
						t.Fatalf("agents %d and %d both got %s", j, i, p)
					}
					seen[p] = i
				}
			}
			assert.Equal(t, want, ok, "agents with a lease")
			if cfg.EnableIPv6 {
				assert.Len(t, seen, 2*want, "subnets handed out")
			}
			assert.Len(t, e.subnetKeysUnder(t, prefix), want, "keys in etcd")
			for s := range seen {
				for o := range seen {
					if s != o && s.Overlaps(o) {
						t.Errorf("%s overlaps %s", s, o)
					}
				}
			}
		})
	}
}

func (e *env) subnetKeysUnder(t *testing.T, prefix string) []string {
	t.Helper()
	old := e.prefix
	e.prefix = prefix
	defer func() { e.prefix = old }()
	return e.subnetKeys(t)
}

func TestAcquireReclaim(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	ctx := t.Context()
	s := e.store(t, nil, etcdstore.Options{})

	first, err := s.Acquire(ctx, lease.Request{Attrs: attrs(1)})
	require.NoError(t, err)
	before, ok := e.get(t, s.LeaseKey(first))
	require.True(t, ok)

	// Restarted with a new VTEP MAC and another backend: same subnet, new
	// attributes, a fresh etcd lease.
	a := attrs(1)
	a.BackendType = "host-gw"
	a.BackendData = nil
	again, err := e.store(t, nil, etcdstore.Options{}).Acquire(ctx, lease.Request{Attrs: a})
	require.NoError(t, err)
	assert.Equal(t, first.Subnet, again.Subnet)
	after, ok := e.get(t, s.LeaseKey(again))
	require.True(t, ok)
	assert.Equal(t, `{"PublicIP":"192.168.0.2","PublicIPv6":null,"BackendType":"host-gw"}`, after.Value)
	assert.NotEqual(t, before.Lease, after.Lease, "new etcd lease")
	assert.NotZero(t, after.Lease)
	assert.False(t, again.Expiration.IsZero())
	assert.Len(t, e.subnetKeys(t), 1)

	// An own lease that no longer fits the network is deleted and replaced.
	stale := e.prefix + "/subnets/10.99.0.0-24"
	g, err := e.admin.Grant(ctx, 60)
	require.NoError(t, err)
	_, err = e.admin.Put(ctx, stale, `{"PublicIP":"192.168.0.3","PublicIPv6":null,"BackendType":"vxlan"}`, clientv3.WithLease(g.ID))
	require.NoError(t, err)
	// A reservation that does not fit is left alone (an operator wrote it).
	oddReservation := e.prefix + "/subnets/10.98.0.0-24"
	_, err = e.admin.Put(ctx, oddReservation, `{"PublicIP":"192.168.0.3"}`)
	require.NoError(t, err)
	got, err := s.Acquire(ctx, lease.Request{Attrs: attrs(2)})
	require.NoError(t, err)
	assert.True(t, netip.MustParsePrefix("10.244.0.0/16").Overlaps(got.Subnet))
	_, ok = e.get(t, stale)
	assert.False(t, ok, "stale own lease deleted")
	_, ok = e.get(t, oddReservation)
	assert.True(t, ok, "reservation kept")
	assert.Len(t, e.subnetKeys(t), 3)

	// A dual-stack lease in an IPv4-only network is replaced, and its IPv4
	// subnet, asked for as previous, is reused (a subnet attrs(2) was not
	// given).
	// (One that neither attrs(1) nor attrs(2) holds: both picked theirs
	// at random.)
	v4 := netip.MustParsePrefix("10.244.200.0/24")
	for k := byte(201); v4 == first.Subnet || v4 == got.Subnet; k++ {
		v4 = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, k, 0}), 24)
	}
	dual := e.prefix + "/subnets/" + strings.Replace(v4.String(), "/", "-", 1) + "&fd00:1::-64"
	_, err = e.admin.Put(ctx, dual, `{"PublicIP":"192.168.0.4","PublicIPv6":"fd00::4"}`, clientv3.WithLease(g.ID))
	require.NoError(t, err)
	got, err = s.Acquire(ctx, lease.Request{Attrs: attrs(3), Previous: lease.Lease{
		Subnet: v4, IPv6Subnet: netip.MustParsePrefix("fd00:1::/64")}})
	require.NoError(t, err)
	assert.Equal(t, v4, got.Subnet)
	_, ok = e.get(t, dual)
	assert.False(t, ok, "dual-stack key deleted")
}

func TestAcquirePrevious(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	ctx := t.Context()
	prev := lease.Lease{Subnet: netip.MustParsePrefix("10.244.42.0/24")}

	t.Run("free previous is honoured", func(t *testing.T) {
		got, err := e.store(t, nil, etcdstore.Options{}).Acquire(ctx, lease.Request{Attrs: attrs(1), Previous: prev})
		require.NoError(t, err)
		assert.Equal(t, prev.Subnet, got.Subnet)
	})
	t.Run("previous held by another node is not", func(t *testing.T) {
		got, err := e.store(t, nil, etcdstore.Options{}).Acquire(ctx, lease.Request{Attrs: attrs(2), Previous: prev})
		require.NoError(t, err)
		assert.NotEqual(t, prev.Subnet, got.Subnet)
		kv, ok := e.get(t, e.prefix+"/subnets/10.244.42.0-24")
		require.True(t, ok)
		assert.Contains(t, kv.Value, attrs(1).PublicIP.String(), "holder unchanged")
	})
	t.Run("previous not in the network is not", func(t *testing.T) {
		got, err := e.store(t, nil, etcdstore.Options{}).Acquire(ctx, lease.Request{Attrs: attrs(3),
			Previous: lease.Lease{Subnet: netip.MustParsePrefix("10.99.1.0/24")}})
		require.NoError(t, err)
		assert.True(t, netip.MustParsePrefix("10.244.0.0/16").Overlaps(got.Subnet))
	})
	t.Run("offline past TTL and taken meanwhile", func(t *testing.T) {
		short := e.store(t, nil, etcdstore.Options{TTL: 2 * time.Second})
		mine, err := short.Acquire(ctx, lease.Request{Attrs: attrs(4)})
		require.NoError(t, err)
		key := short.LeaseKey(mine)
		// The node goes offline: nobody renews, the key expires.
		storetest.Eventually(t, "lease expiry", func() bool { _, ok := e.get(t, key); return !ok })
		// Another node asks for exactly that subnet and gets it.
		thief, err := e.store(t, nil, etcdstore.Options{}).Acquire(ctx, lease.Request{Attrs: attrs(5), Previous: mine})
		require.NoError(t, err)
		require.Equal(t, mine.Subnet, thief.Subnet)
		// The node is back and asks for its previous subnet: it gets another.
		back, err := short.Acquire(ctx, lease.Request{Attrs: attrs(4), Previous: mine})
		require.NoError(t, err)
		assert.NotEqual(t, mine.Subnet, back.Subnet)
		kv, ok := e.get(t, key)
		require.True(t, ok)
		assert.Contains(t, kv.Value, `"`+attrs(5).PublicIP.String()+`"`, "the new holder keeps it")
	})
}

func TestReservation(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	// 15 subnets: 10.5.0.16/28 .. 10.5.0.240/28.
	e.putConfig(t, `{"Network":"10.5.0.0/24","SubnetLen":28}`)
	ctx := t.Context()
	reserved := e.prefix + "/subnets/10.5.0.64-28"
	owner := attrs(99)
	_, err := e.admin.Put(ctx, reserved, `{"PublicIP":"`+owner.PublicIP.String()+`"}`)
	require.NoError(t, err)

	// Fourteen other nodes fill every other subnet; the fifteenth finds
	// the network full rather than taking the reservation.
	for i := range 14 {
		got, err := e.store(t, e.admin, etcdstore.Options{}).Acquire(ctx,
			lease.Request{Attrs: attrs(i), Previous: lease.Lease{Subnet: netip.MustParsePrefix("10.5.0.64/28")}})
		require.NoError(t, err, "node %d", i)
		require.NotEqual(t, "10.5.0.64/28", got.Subnet.String())
	}
	_, err = e.store(t, e.admin, etcdstore.Options{}).Acquire(ctx, lease.Request{Attrs: attrs(14)})
	require.ErrorIs(t, err, lease.ErrNoFreeSubnet)

	// The owner gets its reservation, which stays without an etcd lease.
	s := e.store(t, e.admin, etcdstore.Options{TTL: 2 * time.Second})
	got, err := s.Acquire(ctx, lease.Request{Attrs: owner})
	require.NoError(t, err)
	assert.Equal(t, "10.5.0.64/28", got.Subnet.String())
	assert.True(t, got.Expiration.IsZero(), "reservations do not expire")
	kv, ok := e.get(t, reserved)
	require.True(t, ok)
	assert.Zero(t, kv.Lease, "still a reservation")
	assert.JSONEq(t, mustJSON(t, owner), kv.Value, "attributes published")

	// Keep on a reservation holds it (no renewal needed) until cancelled.
	kctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	require.NoError(t, s.Keep(kctx, got))
	_, ok = e.get(t, reserved)
	assert.True(t, ok)

	// Release leaves reservations alone.
	require.NoError(t, s.Release(ctx, got))
	_, ok = e.get(t, reserved)
	assert.True(t, ok)
}

func mustJSON(t *testing.T, a lease.Attrs) string {
	t.Helper()
	b, err := a.MarshalJSON()
	require.NoError(t, err)
	return string(b)
}

func TestRelease(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	ctx := t.Context()
	s := e.store(t, nil, etcdstore.Options{})
	mine, err := s.Acquire(ctx, lease.Request{Attrs: attrs(1)})
	require.NoError(t, err)

	// Someone else's lease is not released on our behalf.
	other, err := s.Acquire(ctx, lease.Request{Attrs: attrs(2)})
	require.NoError(t, err)
	impostor := other
	impostor.Attrs = attrs(1)
	require.NoError(t, s.Release(ctx, impostor))
	_, ok := e.get(t, s.LeaseKey(other))
	assert.True(t, ok)

	require.NoError(t, s.Release(ctx, mine))
	_, ok = e.get(t, s.LeaseKey(mine))
	assert.False(t, ok)
	require.NoError(t, s.Release(ctx, mine), "releasing twice is fine")
}
