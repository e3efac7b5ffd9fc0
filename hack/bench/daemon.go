package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/flannelkit/flannel/internal/netlab"
)

// storeSetup is a store that already holds the peers, reachable from the
// lab's nodes at the router's address.
type storeSetup struct {
	target string   // host:port on this host's loopback
	port   uint16   // the relay's port at the router's address
	args   []string // flanneld's store flags (the address is the router's)
	env    []string // added to flanneld's environment
	peers  int
	// put adds peer k (synthetic) and returns once the store has it.
	put   func(ctx context.Context, k int) (netip.Prefix, error)
	close func()
}

// daemonResult is one run of the real daemon.
type daemonResult struct {
	programmed       time.Duration
	atProgrammed     procStats
	idleStart, final procStats
	halfway          procStats // the sample halfway through idle
	idle             time.Duration
	steadyRSS        float64
	joins            []time.Duration
}

// buildFlanneld builds examples/flanneld into dir as the release image
// does, unless o.flanneld names a binary to run instead.
func buildFlanneld(o options, dir string) (string, error) {
	if o.flanneld != "" {
		return o.flanneld, nil
	}
	exe := filepath.Join(dir, "flanneld")
	// As deploy/Dockerfile builds the image's binary: static and stripped,
	// so that the figures are those of what ships (a cgo build also maps
	// libc and the loader: about 1.5 MB more RSS).
	cmd := exec.Command("go", "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w",
		"-o", exe, "github.com/flannelkit/flannel/examples/flanneld")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build flanneld: %w", err)
	}
	return exe, nil
}

// runDaemon starts flanneld in a one-node lab against st, waits until the
// node's kernel holds every peer's route, samples the process over the
// idle period and, with joins, adds peers one at a time.
func runDaemon(ctx context.Context, o options, exe, dir string, st *storeSetup) (daemonResult, error) {
	var res daemonResult
	lab, err := netlab.New(netlab.Options{Nodes: 1})
	if err != nil {
		return res, err
	}
	defer lab.Close()
	rt, err := netns.GetFromName(lab.NSName("rt"))
	if err != nil {
		return res, err
	}
	defer rt.Close()
	stopRelay, err := netlab.Relay(rt, netip.AddrPortFrom(netlab.RouterIP(0), st.port).String(), st.target)
	if err != nil {
		return res, fmt.Errorf("relay: %w", err)
	}
	defer stopRelay()
	node := lab.Nodes[0]
	rw, err := watchRoutes(node.NS)
	if err != nil {
		return res, err
	}
	defer rw.close()

	logPath := filepath.Join(dir, "flanneld.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return res, err
	}
	defer logf.Close()
	args := append([]string{"netns", "exec", node.NSName, exe}, st.args...)
	args = append(args, "--iface=eth0", "--subnet-file="+filepath.Join(dir, "subnet.env"))
	args = append(args, strings.Fields(o.daemonArgs)...)
	cmd := exec.Command("ip", args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), st.env...)
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return res, err
	}
	// Closed after the exit status: every wait after the first sees it.
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait(); close(exited) }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		if o.verbose {
			b, _ := os.ReadFile(logPath)
			os.Stderr.Write(b)
		}
	}()
	pid := cmd.Process.Pid // ip netns exec execs the binary: same process
	wctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
	defer cancel()
	if err := rw.wait(wctx, exited, func() bool { return rw.count() >= st.peers }); err != nil {
		b, _ := os.ReadFile(logPath)
		return res, fmt.Errorf("%d of %d routes: %w\n%s", rw.count(), st.peers, err, tail(b))
	}
	res.programmed = time.Since(start)
	if res.atProgrammed, err = readProc(pid); err != nil {
		return res, err
	}
	if err := idle(ctx, o, pid, &res); err != nil {
		return res, err
	}
	memprof := os.Getenv("FLANNELD_MEMPROFILE")
	if memprof != "" { // a heap profile of the settled daemon
		_ = cmd.Process.Signal(syscall.SIGUSR1)
		time.Sleep(time.Second)
		if o.scenario == "join" { // and one after the joins: pprof -base
			_ = os.Rename(memprof, memprof+".settled")
			defer func() {
				_ = cmd.Process.Signal(syscall.SIGUSR1)
				time.Sleep(time.Second)
			}()
		}
	}
	if o.scenario == "join" && o.idle <= 0 {
		time.Sleep(idleSettle) // the joins meet a settled daemon
	}
	for k := range o.joins {
		if o.scenario != "join" {
			break
		}
		p, err := st.put(ctx, st.peers+k)
		if errors.Is(err, errTaken) {
			continue
		}
		if err != nil {
			return res, err
		}
		t0 := time.Now()
		if err := rw.wait(wctx, exited, func() bool { _, ok := rw.at(p); return ok }); err != nil {
			return res, fmt.Errorf("join %s: %w", p, err)
		}
		t1, _ := rw.at(p)
		res.joins = append(res.joins, max(0, t1.Sub(t0)))
	}
	return res, nil
}

// idleSettle is how long after programmed the idle period starts: the
// daemon finishes its start (subnet.env, readiness, the first renewals).
const idleSettle = 5 * time.Second

// idle samples the process once a second over o.idle, after idleSettle.
func idle(ctx context.Context, o options, pid int, res *daemonResult) error {
	if o.idle <= 0 {
		var err error
		res.idleStart, err = readProc(pid)
		res.final = res.idleStart
		res.steadyRSS = res.idleStart.rssMB
		return err
	}
	select {
	case <-time.After(idleSettle):
	case <-ctx.Done():
		return ctx.Err()
	}
	var err error
	if res.idleStart, err = readProc(pid); err != nil {
		return err
	}
	t0 := time.Now()
	sum, n := 0.0, 0
	for time.Since(t0) < o.idle {
		time.Sleep(time.Second)
		s, err := readProc(pid)
		if err != nil {
			return err
		}
		sum, n = sum+s.rssMB, n+1
		res.final = s
		if time.Since(t0) < o.idle/2 {
			res.halfway = s
		}
	}
	res.idle = time.Since(t0)
	res.steadyRSS = sum / float64(n)
	return nil
}

func tail(b []byte) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-20):], "\n")
}

// daemon is the daemon and join scenarios on the real flanneld process.
func daemon(o options) error {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "bench-daemon-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	exe, err := buildFlanneld(o, dir)
	if err != nil {
		return err
	}
	var st *storeSetup
	switch o.store {
	case "etcd":
		st, err = etcdSetup(ctx, o)
	case "kube":
		st, err = kubeSetup(ctx, o, dir)
	default:
		return fmt.Errorf("-store %q: want etcd or kube (memory: -scenario join only)", o.store)
	}
	if err != nil {
		return err
	}
	defer st.close()
	res, err := runDaemon(ctx, o, exe, dir, st)
	if err != nil {
		return err
	}
	limit, err := kernelLimit(ctx, o.peers)
	if err != nil {
		return err
	}
	report(o, res, limit)
	return nil
}

// kernelLimit is the bulk scenario's raw netlink writer for n peers on a
// fresh node: the kernel's own time for the same entries, the best of
// three (the machine may be shared).
func kernelLimit(ctx context.Context, n int) (float64, error) {
	nd, err := newNode()
	if err != nil {
		return 0, err
	}
	defer nd.lab.Close()
	best := -1.0
	for range 3 {
		l, err := rawLimit(ctx, nd, synthetic(n))
		if err != nil {
			return 0, err
		}
		best = minPos(best, l)
	}
	return best, nil
}

func report(o options, r daemonResult, limit float64) {
	perMin := 0.0
	if r.idle > 0 {
		perMin = float64(r.final.cpu-r.idleStart.cpu) / float64(time.Millisecond) / r.idle.Minutes()
	}
	growth := r.final.rssMB - r.idleStart.rssMB
	fmt.Printf("scenario=%s store=%s peers=%d programmed_s=%.3f limit_s=%.3f ratio=%.2f peak_rss_mb=%.1f rss_programmed_mb=%.1f (anon %.1f file %.1f) idle_s=%.0f steady_rss_mb=%.1f rss_growth_mb=%+.1f (anon %+.1f file %+.1f) idle_cpu_ms_per_min=%.0f",
		o.scenario, o.store, o.peers, r.programmed.Seconds(), limit, r.programmed.Seconds()/limit,
		r.final.hwmMB, r.atProgrammed.rssMB, r.atProgrammed.anonMB, r.atProgrammed.fileMB, r.idle.Seconds(), r.steadyRSS, growth,
		r.final.anonMB-r.idleStart.anonMB, r.final.fileMB-r.idleStart.fileMB, perMin)
	if r.idle > 0 {
		// The second half alone: a warm-up early in idle (the first
		// resync faulting in pages) shows in rss_growth_mb only; a creep
		// shows in both.
		fmt.Printf(" rss_growth_2nd_half_mb=%+.1f", r.final.rssMB-r.halfway.rssMB)
	}
	if len(r.joins) > 0 {
		fmt.Printf(" joins=%d join_p50_ms=%.2f join_p99_ms=%.2f join_max_ms=%.2f",
			len(r.joins), ms(percentile(r.joins, 0.5)), ms(percentile(r.joins, 0.99)), ms(percentile(r.joins, 1)))
	}
	fmt.Printf(" targets=[%s]\n", strings.Join(targets(o, r, perMin, growth), " "))
}

// targets are issue #16's limits that apply to this run, each with ok or
// MISS.
func targets(o options, r daemonResult, perMin, growth float64) []string {
	var out []string
	check := func(name string, v, limit float64) {
		verdict := "ok"
		if math.Round(v*10) > math.Round(limit*10) { // at the printed precision
			verdict = "MISS"
		}
		out = append(out, fmt.Sprintf("%s<=%g:%s", name, limit, verdict))
	}
	switch {
	case o.store == "etcd" && o.peers == 5000:
		check("peak_rss_mb", r.final.hwmMB, 40)
	case o.store == "etcd" && o.peers == 20000:
		check("peak_rss_mb", r.final.hwmMB, 70)
	case o.store == "kube" && o.peers == 5000:
		check("peak_rss_mb", r.final.hwmMB, 60)
	}
	if o.peers <= 5000 && r.idle > 0 {
		check("idle_cpu_ms_per_min", perMin, 30)
	}
	if r.idle > 0 {
		check("rss_growth_mb", growth, 0)
	}
	if len(r.joins) > 0 {
		switch {
		case o.peers <= 5000:
			check("join_p99_ms", ms(percentile(r.joins, 0.99)), 10)
		case o.peers <= 20000:
			check("join_p99_ms", ms(percentile(r.joins, 0.99)), 30)
		}
	}
	return out
}

// hostOf returns the host:port of a URL.
func hostOf(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", err
	}
	return u.Host, nil
}
