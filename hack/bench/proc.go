package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// procStats is what /proc says about a process.
type procStats struct {
	hwmMB, rssMB   float64
	anonMB, fileMB float64       // RssAnon (heap, stacks) and RssFile (the binary's pages)
	cpu            time.Duration // utime + stime
}

// readProc reads VmHWM and VmRSS from /proc/<pid>/status and utime+stime
// from /proc/<pid>/stat.
func readProc(pid int) (procStats, error) {
	var s procStats
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "VmHWM:":
			s.hwmMB = kb / 1024
		case "VmRSS:":
			s.rssMB = kb / 1024
		case "RssAnon:":
			s.anonMB = kb / 1024
		case "RssFile:":
			s.fileMB = kb / 1024
		}
	}
	b, err = os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// The command name (field 2) may hold spaces: count from the ")".
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return s, errors.New("malformed /proc/pid/stat")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return s, errors.New("short /proc/pid/stat")
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64) // field 14
	st, _ := strconv.ParseInt(f[12], 10, 64) // field 15
	const hz = 100                           // USER_HZ
	s.cpu = time.Duration(ut+st) * time.Second / hz
	return s, nil
}

// routeWatch records when each route of ours (backend.RouteProtocol)
// appears in a namespace, from a route subscription.
type routeWatch struct {
	mu   sync.Mutex
	seen map[netip.Prefix]time.Time
	poke chan struct{}
	errs chan error
	done chan struct{}
	wg   sync.WaitGroup
}

func watchRoutes(ns netns.NsHandle) (*routeWatch, error) {
	w := &routeWatch{seen: map[netip.Prefix]time.Time{}, poke: make(chan struct{}, 1), errs: make(chan error, 1), done: make(chan struct{})}
	ch := make(chan netlink.RouteUpdate, 65536)
	onErr := func(err error) {
		select {
		case w.errs <- err:
		default:
		}
	}
	if err := nlsafe.SubscribeRoutes(ch, w.done, ns, onErr); err != nil {
		return nil, err
	}
	w.wg.Go(func() {
		for u := range ch {
			if u.Type != unix.RTM_NEWROUTE || u.Protocol != backend.RouteProtocol {
				continue
			}
			p, ok := ipconv.PrefixFromIPNet(u.Dst)
			if !ok {
				continue
			}
			now := time.Now()
			w.mu.Lock()
			if _, ok := w.seen[p]; !ok {
				w.seen[p] = now
			}
			w.mu.Unlock()
			select {
			case w.poke <- struct{}{}:
			default:
			}
		}
	})
	return w, nil
}

func (w *routeWatch) close() {
	close(w.done)
	w.wg.Wait()
}

func (w *routeWatch) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.seen)
}

func (w *routeWatch) at(p netip.Prefix) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	t, ok := w.seen[p]
	return t, ok
}

// wait blocks until cond holds (checked after every route event and
// every 50 ms), the process exits, the subscription fails or ctx ends.
func (w *routeWatch) wait(ctx context.Context, exited <-chan error, cond func() bool) error {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for !cond() {
		select {
		case <-w.poke:
		case <-t.C:
		case err := <-w.errs:
			return fmt.Errorf("route subscription: %w", err)
		case err := <-exited:
			return fmt.Errorf("flanneld exited: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}
