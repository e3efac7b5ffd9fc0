package vmtest

import (
	"bytes"
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/internal/testenv"
)

func TestCpioNewc(t *testing.T) {
	var b bytes.Buffer
	w := newCpio(&b)
	w.dir("bin")
	w.file("init", []byte("#!/bin/sh\n"), 0o755)
	w.symlink("sbin/modprobe", "/bin/busybox")
	require.NoError(t, w.close())
	out := b.String()
	assert.True(t, strings.HasPrefix(out, "070701"))
	assert.Zero(t, b.Len()%4, "entries are 4-byte aligned")
	for _, s := range []string{"bin\x00", "init\x00", "#!/bin/sh\n", "sbin/modprobe\x00", "/bin/busybox", "TRAILER!!!\x00"} {
		assert.Contains(t, out, s)
	}
}

func TestModuleClosure(t *testing.T) {
	tools, err := Find()
	testenv.Require(t, err == nil, fmt.Sprintf("a VM kernel (hack/test.sh installs linux-image-cloud-amd64): %v", err))
	mods, err := moduleClosure(tools.Version, []string{"esp4", "ghash-generic"})
	require.NoError(t, err)
	joined := strings.Join(mods, " ")
	for _, m := range []string{"esp4.ko", "xfrm_algo.ko", "ghash-generic.ko", "gf128mul.ko"} {
		assert.Contains(t, joined, m)
	}
	_, err = moduleClosure(tools.Version, []string{"no_such_module"})
	assert.ErrorContains(t, err, "no module no_such_module")
}
