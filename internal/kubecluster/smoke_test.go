package kubecluster

import (
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestNodesRegister: a 2-node cluster registers both nodes with podCIDRs
// from the controller manager; without a CNI config they are NotReady, as
// on a real cluster before a network is deployed. Close leaves no pinned
// namespace, cgroup or sysctl change behind.
func TestNodesRegister(t *testing.T) {
	c := NewT(t, Options{Nodes: 2})
	ctx := t.Context()
	for _, n := range c.Nodes {
		require.NoError(t, c.waitFor(ctx, 60e9, "podCIDR of "+n.Name, func() (bool, error) {
			node, err := c.Client().CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			return err == nil && node.Spec.PodCIDR != "", nil
		}))
		node, err := c.Client().CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		require.NoError(t, err)
		for _, cond := range node.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				assert.NotEqual(t, corev1.ConditionTrue, cond.Status, "%s Ready without a CNI", n.Name)
			}
		}
	}
	lab, cg := c.Lab.Name, c.Nodes[0].cgroupName
	require.NoError(t, c.Close())
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		assert.NotContains(t, e.Name(), lab, "namespace left behind")
		assert.NotContains(t, e.Name(), "cni-", "a pod namespace pin left on the host")
	}
	_, err := os.Stat("/sys/fs/cgroup/pids/" + cg)
	assert.True(t, os.IsNotExist(err), "cgroup %s left behind", cg)
	_, err = os.Stat(sysctlState())
	assert.True(t, os.IsNotExist(err), "sysctls not restored")
}
