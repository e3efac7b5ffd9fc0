package kubetest

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"sync"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// RealisticNode describes node i of CreateRealisticNodes: its name
// (node-%05d), podCIDR 10.<i/256>.<i%256>.0/24, public IP
// 192.168.<i/256>.<i%256> and VTEP MAC 7a:1e:6c:<i>.
func RealisticNode(i int) (name string, podCIDR netip.Prefix, publicIP netip.Addr) {
	return fmt.Sprintf("node-%05d", i),
		netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24),
		netip.AddrFrom4([4]byte{192, 168, byte(i >> 8), byte(i)})
}

// CreateRealisticNodes creates Nodes 0..n-1 (RealisticNode) as a kubelet
// and a flannel vxlan node would leave them: labels, a kubelet-like status
// (addresses, conditions, 50 images, capacity: about 10 KB each) and the
// flannel annotations under prefix (e.g. "flannel.alpha.coreos.com"). It
// uses 16 requests in parallel and returns the first error.
func CreateRealisticNodes(ctx context.Context, cs kubernetes.Interface, n int, prefix string) error {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	next := make(chan int)
	for range 16 {
		wg.Go(func() {
			for i := range next {
				if err := createRealisticNode(ctx, cs, i, prefix); err != nil {
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

func createRealisticNode(ctx context.Context, cs kubernetes.Interface, i int, prefix string) error {
	name, subnet, pub := RealisticNode(i)
	ip := pub.String()
	p := prefix + "/"
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
		Spec: corev1.NodeSpec{PodCIDR: subnet.String(), PodCIDRs: []string{subnet.String()}, ProviderID: "aws:///zone/i-" + name},
	}
	created, err := cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create %s: %w", name, err)
	}
	created.Status = realisticStatus(name, ip)
	if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("status of %s: %w", name, err)
	}
	return nil
}

// realisticStatus is a kubelet-like node status of about 10 KB.
func realisticStatus(name, ip string) corev1.NodeStatus {
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
