package lease

import (
	"bytes"
	"fmt"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestConfigNeverPrintsSecrets(t *testing.T) {
	t.Parallel()
	c, err := ParseConfig([]byte(`{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48",` +
		`"Backend":{"Type":"ipsec","PSK":"hunter2hunter2hunter2hunter2hunter2hunter2hunter2hunter2hunter2hunter2","psk_v6":"s3cr3t-two","UDPEncap":true}}`))
	require.NoError(t, err)
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	log.Info("config", "cfg", c)
	slog.New(slog.NewTextHandler(&buf, nil)).Info("config", "cfg", c)
	type holder struct{ Cfg Config }
	for _, s := range []string{
		buf.String(), c.String(), fmt.Sprintf("%v", c), fmt.Sprintf("%+v", c), fmt.Sprintf("%#v", c),
		fmt.Sprintf("%+v", holder{c}), fmt.Sprintf("%v", &c),
	} {
		assert.NotContains(t, s, "hunter2")
		assert.NotContains(t, s, "s3cr3t")
		assert.Contains(t, s, "10.5.0.0/16")
		assert.Contains(t, s, Redacted)
	}
	assert.Equal(t, `{"PSK":"[redacted]","Type":"ipsec","UDPEncap":true,"psk_v6":"[redacted]"}`, c.RedactedBackend())
	assert.Contains(t, buf.String(), `"backend_type":"ipsec"`)
}

func TestRedactedBackendNotAnObject(t *testing.T) {
	t.Parallel()
	assert.Equal(t, "(not a JSON object)", Config{Backend: []byte(`"PSK=hunter2"`)}.RedactedBackend())
	assert.Equal(t, "", Config{}.RedactedBackend())
}
