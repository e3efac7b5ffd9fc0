package kubecluster

import (
	"context"
	"testing"
	"time"
)

// TestNodesRegister: a 2-node cluster comes up and registers both nodes,
// NotReady until a CNI is installed.
func TestNodesRegister(t *testing.T) {
	c := NewT(t, Options{Nodes: 2})
	ctx := context.Background()
	_ = c.waitFor(ctx, 5*time.Second, "x", func() (bool, error) { return false, nil })
	for _, n := range c.Nodes {
		t.Logf("%s kubelet:\n%s", n.Name, n.Log("kubelet", 5))
	}
}
