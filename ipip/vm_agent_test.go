package ipip_test

import (
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/ipip"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
)

// TestInVMAgents runs real Agents with the ipip backend from net-conf.json
// (DirectRouting on) on 3 nodes on two segments: each is ready with its
// peers, and every pod reaches every other.
func TestInVMAgents(t *testing.T) {
	inVM(t)
	lab := netlab.NewT(t, netlab.Options{Nodes: 3, Segments: 2})
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"ipip","DirectRouting":true}}`))
	require.NoError(t, err)
	var logs testenv.LogBuffer
	agents, pods := vmlab.StartAgents(t, vmlab.Agents{
		Lab: lab, Store: memstore.New(cfg, memstore.Options{}), Ready: 90 * time.Second,
		Logs: &logs, Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Backend: func(*netlab.Node) (flannel.Backend, error) {
			r := backend.NewRegistry()
			if err := r.Register(ipip.Type, ipip.FromConfig); err != nil {
				return nil, err
			}
			return r.New(cfg)
		},
	})
	for _, a := range agents {
		st := a.State()
		assert.Equal(t, 1480, st.MTU)
		assert.Equal(t, "ipip", st.Lease.Attrs.BackendType)
	}
	vmlab.CheckPairs(t, pods, 30*time.Second)
}
