package kubetest_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/flannelkit/flannel/internal/kubetest"
)

func TestServer(t *testing.T) {
	srv := kubetest.NewT(t, kubetest.Options{})
	ctx := context.Background()
	admin := kubetest.ClientT(t, srv.AdminConfig())
	_, err := admin.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	require.NoError(t, err, "admin lists nodes")

	// Restricted identities have only what RBAC grants them: nothing here.
	user := kubetest.ClientT(t, srv.ImpersonateConfig("someone"))
	_, err = user.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	assert.True(t, apierrors.IsForbidden(err), "impersonated user: %v", err)
	saConfig, err := srv.ServiceAccountConfig(ctx, "ns1", "sa1")
	require.NoError(t, err)
	sa := kubetest.ClientT(t, saConfig)
	_, err = sa.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	assert.True(t, apierrors.IsForbidden(err), "service account: %v", err)
	assert.Contains(t, err.Error(), "system:serviceaccount:ns1:sa1")

	// Stop and start again: same address, same data.
	srv.Stop()
	_, err = admin.CoreV1().Namespaces().Get(ctx, "ns1", metav1.GetOptions{})
	require.Error(t, err)
	require.NoError(t, srv.Start())
	_, err = admin.CoreV1().Namespaces().Get(ctx, "ns1", metav1.GetOptions{})
	require.NoError(t, err)
}
