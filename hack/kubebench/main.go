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
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
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
	if err := createNodes(ctx, cs, n); err != nil {
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

func createNodes(ctx context.Context, cs kubernetes.Interface, n int) error {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	next := make(chan int)
	for range 16 {
		wg.Go(func() {
			for i := range next {
				if err := createNode(ctx, cs, i); err != nil {
					errs <- err
				}
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	close(errs)
	return <-errs
}

func createNode(ctx context.Context, cs kubernetes.Interface, i int) error {
	name := fmt.Sprintf("node-%05d", i)
	subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24).String()
	ip := netip.AddrFrom4([4]byte{192, 168, byte(i >> 8), byte(i)}).String()
	p := kubestore.DefaultAnnotationPrefix + "/"
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: name,
			Labels: map[string]string{
				"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
				"node.kubernetes.io/instance-type": "m5.xlarge", "topology.kubernetes.io/zone": "zone-" + strconv.Itoa(i%3),
			},
			Annotations: map[string]string{
				p + "kube-subnet-manager":      "true",
				p + "backend-type":             "vxlan",
				p + "backend-data":             fmt.Sprintf(`{"VNI":1,"VtepMAC":"7a:1e:6c:%02x:%02x:%02x"}`, byte(i>>16), byte(i>>8), byte(i)),
				p + "public-ip":                ip,
				"node.alpha.kubernetes.io/ttl": "0",
				"volumes.kubernetes.io/controller-managed-attach-detach": "true",
			},
		},
		Spec: corev1.NodeSpec{PodCIDR: subnet, PodCIDRs: []string{subnet}, ProviderID: "aws:///zone/i-" + name},
	}
	created, err := cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create %s: %w", name, err)
	}
	created.Status = status(name, ip)
	if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("status of %s: %w", name, err)
	}
	return nil
}

// status is a kubelet-like node status of about 10 KB.
func status(name, ip string) corev1.NodeStatus {
	now := metav1.Now()
	res := corev1.ResourceList{
		corev1.ResourceCPU: resource.MustParse("4"), corev1.ResourceMemory: resource.MustParse("16Gi"),
		corev1.ResourcePods: resource.MustParse("110"), corev1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
		"hugepages-2Mi": resource.MustParse("0"), "hugepages-1Gi": resource.MustParse("0"),
	}
	s := corev1.NodeStatus{
		Capacity: res, Allocatable: res,
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: ip}, {Type: corev1.NodeHostName, Address: name},
			{Type: corev1.NodeInternalDNS, Address: name + ".ec2.internal"},
		},
		NodeInfo: corev1.NodeSystemInfo{
			MachineID: "ec2" + name, SystemUUID: "ec2" + name, BootID: "boot-" + name,
			KernelVersion: "6.1.0-18-cloud-amd64", OSImage: "Debian GNU/Linux 12 (bookworm)",
			ContainerRuntimeVersion: "containerd://1.7.13", KubeletVersion: "v1.37.2",
			OperatingSystem: "linux", Architecture: "amd64",
		},
		DaemonEndpoints: corev1.NodeDaemonEndpoints{KubeletEndpoint: corev1.DaemonEndpoint{Port: 10250}},
	}
	for _, c := range []corev1.NodeConditionType{"MemoryPressure", "DiskPressure", "PIDPressure", "Ready", "KernelDeadlock"} {
		st := corev1.ConditionFalse
		if c == "Ready" {
			st = corev1.ConditionTrue
		}
		s.Conditions = append(s.Conditions, corev1.NodeCondition{
			Type: c, Status: st, LastHeartbeatTime: now, LastTransitionTime: now,
			Reason: "Kubelet" + string(c), Message: "kubelet reports condition " + string(c) + " on this node",
		})
	}
	for j := range 50 {
		img := fmt.Sprintf("registry.example.com/team-%d/service-%d", j%7, j)
		s.Images = append(s.Images, corev1.ContainerImage{
			Names: []string{
				fmt.Sprintf("%s@sha256:%064x", img, j*7919+1),
				fmt.Sprintf("%s:v1.%d.%d", img, j, j%5),
			},
			SizeBytes: int64(10_000_000 + j*1_000_003),
		})
	}
	return s
}
