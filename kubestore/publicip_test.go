package kubestore_test

import (
	"log/slog"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/kubestore"
)

// TestStoredPublicIPs: the node-public-ip(v6) annotations an operator set
// are read at start, as upstream; a malformed one is ignored with a warning
// naming it.
func TestStoredPublicIPs(t *testing.T) {
	srv := kubetest.NewT(t, kubetest.Options{})
	cs := kubetest.ClientT(t, srv.AdminConfig())
	p := kubestore.DefaultAnnotationPrefix + "/"
	createNode(t, cs, "good", map[string]string{p + "node-public-ip": "203.0.113.7", p + "node-public-ipv6": "2001:db8::7"}, "10.244.1.0/24")
	createNode(t, cs, "bad", map[string]string{p + "node-public-ip": "2001:db8::7", p + "node-public-ipv6": "not-an-ip"}, "10.244.2.0/24")
	createNode(t, cs, "none", nil, "10.244.3.0/24")

	v4, v6, err := newStore(t, cs, "good", netConfDual, kubestore.Options{}).StoredPublicIPs(t.Context())
	require.NoError(t, err)
	assert.Equal(t, netip.MustParseAddr("203.0.113.7"), v4)
	assert.Equal(t, netip.MustParseAddr("2001:db8::7"), v6)

	var buf testenv.LogBuffer
	v4, v6, err = newStore(t, cs, "bad", netConfDual, kubestore.Options{Logger: slog.New(slog.NewTextHandler(&buf, nil))}).StoredPublicIPs(t.Context())
	require.NoError(t, err)
	assert.False(t, v4.IsValid(), "an IPv6 address in node-public-ip is refused")
	assert.False(t, v6.IsValid())
	assert.Contains(t, buf.String(), "annotation="+p+"node-public-ip ")
	assert.Contains(t, buf.String(), "annotation="+p+"node-public-ipv6 ")

	v4, v6, err = newStore(t, cs, "none", netConf4, kubestore.Options{}).StoredPublicIPs(t.Context())
	require.NoError(t, err)
	assert.False(t, v4.IsValid() || v6.IsValid())

	_, _, err = newStore(t, cs, "missing", netConf4, kubestore.Options{}).StoredPublicIPs(t.Context())
	assert.ErrorContains(t, err, "read node missing")
}
