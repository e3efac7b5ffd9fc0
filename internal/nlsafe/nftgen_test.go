package nlsafe_test

import (
	"os/exec"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/internal/nlsafe"
)

// TestNFTablesGeneration: the generation stays while nothing changes and
// moves with a change made by nft or iptables-nft in the namespace.
func TestNFTablesGeneration(t *testing.T) {
	t.Parallel()
	n, _ := node(t)
	g1, err := nlsafe.NFTablesGeneration(n.NS)
	require.NoError(t, err)
	g2, err := nlsafe.NFTablesGeneration(n.NS)
	require.NoError(t, err)
	assert.Equal(t, g1, g2, "nothing changed")
	out, err := exec.Command("ip", "netns", "exec", n.NSName, "nft", "add", "table", "inet", "gentest").CombinedOutput()
	require.NoError(t, err, "%s", out)
	g3, err := nlsafe.NFTablesGeneration(n.NS)
	require.NoError(t, err)
	assert.NotEqual(t, g2, g3, "a table was added")
	// iptables through nf_tables (hack/test.sh selects it) commits
	// nf_tables transactions too.
	out, err = exec.Command("ip", "netns", "exec", n.NSName, "iptables-nft", "-t", "filter", "-N", "GENTEST").CombinedOutput()
	require.NoError(t, err, "%s", out)
	g4, err := nlsafe.NFTablesGeneration(n.NS)
	require.NoError(t, err)
	assert.NotEqual(t, g3, g4, "an iptables-nft chain was added")

	_, err = nlsafe.NFTablesGeneration(nlsafe.Wrap(nil).NS())
	assert.ErrorContains(t, err, "not open")
}
