// Command kubebench measures the Kubernetes store at scale: it starts the
// real kube-apiserver (internal/kubetest), creates N Nodes with realistic
// status (addresses, conditions, ~50 images, capacity: about 10 KB each)
// and flannel annotations, times how long the apiserver needs to list them,
// then runs kubestore's Watch in a separate process (./store, a lean binary) until its peer set
// is complete, and prints the time and the child's peak RSS against the
// targets (1.5x the list time, 60 MB).
//
//	go run ./hack/kubebench [-nodes 5000]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/kubestore"
)

func main() {
	nodes := flag.Int("nodes", 5000, "number of Nodes")
	flag.Parse()
	if err := run(*nodes); err != nil {
		fmt.Fprintln(os.Stderr, "kubebench:", err)
		os.Exit(1)
	}
}

func run(n int) error {
	srv, err := kubetest.New(kubetest.Options{})
	if err != nil {
		return err
	}
	defer srv.Close()
	cfg := srv.AdminConfig()
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	ctx := context.Background()

	start := time.Now()
	if err := kubetest.CreateRealisticNodes(ctx, cs, n, kubestore.DefaultAnnotationPrefix); err != nil {
		return err
	}
	fmt.Printf("created %d nodes in %s\n", n, time.Since(start).Round(time.Millisecond))

	// The reference: one list of every Node, as an informer's first list
	// would be served (from the watch cache), decoded by the client.
	var listTime time.Duration
	var size int
	for range 3 { // best of three
		t0 := time.Now()
		l, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{ResourceVersion: "0"})
		if err != nil {
			return fmt.Errorf("list nodes: %w", err)
		}
		d := time.Since(t0)
		if listTime == 0 || d < listTime {
			listTime = d
		}
		if len(l.Items) != n {
			return fmt.Errorf("listed %d nodes, want %d", len(l.Items), n)
		}
		size = l.Items[n/2].Size()
	}
	fmt.Printf("node size %d bytes (protobuf); apiserver list of %d nodes: %s\n", size, n, listTime.Round(time.Millisecond))

	// The store runs in a binary of its own, linking what an embedder's
	// would (client-go, kubestore) and not this one's etcd and harness.
	dir, err := os.MkdirTemp("", "kubebench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	exe := filepath.Join(dir, "store")
	build := exec.Command("go", "build", "-o", exe, "github.com/flannelkit/flannel/hack/kubebench/store")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("build the store process: %w", err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(),
		"KUBEBENCH_URL="+srv.URL, "KUBEBENCH_CA="+srv.CAFile,
		"KUBEBENCH_TOKEN="+cfg.BearerToken, "KUBEBENCH_NODES="+strconv.Itoa(n),
		"KUBEBENCH_LIST_NS="+strconv.FormatInt(int64(listTime), 10))
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("store process: %w", err)
	}
	return nil
}
