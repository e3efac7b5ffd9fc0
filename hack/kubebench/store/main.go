// Command store is kubebench's store process: it runs kubestore's Watch
// against the apiserver named by KUBEBENCH_URL, KUBEBENCH_CA and
// KUBEBENCH_TOKEN until the peer set has KUBEBENCH_NODES leases, then
// prints the time, its peak RSS and the ratio to KUBEBENCH_LIST_NS. It
// links only what an embedder would (client-go and kubestore).
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/flannelkit/flannel/kubestore"
	"github.com/flannelkit/flannel/lease"
)

const netConf = `{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}`

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "kubebench store:", err)
		os.Exit(1)
	}
}

// runChild runs only the store, as an embedder would, until its peer set
// has every node.
func run() error {
	n, err := strconv.Atoi(os.Getenv("KUBEBENCH_NODES"))
	if err != nil {
		return err
	}
	cs, err := kubernetes.NewForConfig(&rest.Config{
		Host:            os.Getenv("KUBEBENCH_URL"),
		BearerToken:     os.Getenv("KUBEBENCH_TOKEN"),
		TLSClientConfig: rest.TLSClientConfig{CAFile: os.Getenv("KUBEBENCH_CA")},
		ContentConfig:   rest.ContentConfig{ContentType: "application/vnd.kubernetes.protobuf"},
		QPS:             50, Burst: 100,
	})
	if err != nil {
		return err
	}
	cfg, err := lease.ParseConfig([]byte(netConf))
	if err != nil {
		return err
	}
	s, err := kubestore.New(cs.CoreV1().Nodes(), kubestore.Options{NodeName: "node-00000", Config: cfg})
	if err != nil {
		return err
	}
	if hwm, err := peakRSS(); err == nil {
		fmt.Printf("store process RSS before Watch (runtime, client-go): %.1f MB\n", float64(hwm)/1e6)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	var elapsed time.Duration
	err = s.Watch(ctx, func(snap lease.Snapshot) {
		if len(snap.Leases) == n && elapsed == 0 {
			elapsed = time.Since(start)
			cancel()
		}
	})
	if err != nil {
		return err
	}
	if elapsed == 0 {
		return fmt.Errorf("peer set never complete")
	}
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	fmt.Printf("store peer set complete (%d leases): %s; Go heap in use %.1f MB\n", n, elapsed.Round(time.Millisecond), float64(ms.HeapInuse)/1e6)
	// VmHWM, not the parent's rusage: a child started with vfork inherits
	// the parent's high-water mark there.
	if hwm, err := peakRSS(); err == nil {
		fmt.Printf("store process peak RSS: %.1f MB (target < 60 MB)\n", float64(hwm)/1e6)
	}
	if ref, err := strconv.ParseInt(os.Getenv("KUBEBENCH_LIST_NS"), 10, 64); err == nil && ref > 0 {
		fmt.Printf("store time / apiserver list time: %.2f (target <= 1.5)\n", float64(elapsed)/float64(ref))
	}
	return nil
}

// peakRSS returns this process's peak resident set size (VmHWM), in bytes.
func peakRSS() (int64, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "VmHWM:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			return kb * 1024, err
		}
	}
	return 0, errors.New("no VmHWM in /proc/self/status")
}
