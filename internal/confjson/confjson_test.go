package confjson

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestInt(t *testing.T) {
	for in, want := range map[string]int{"1": 1, " 65535 ": 65535, "8472": 8472} {
		got, err := Int(json.RawMessage(in), 1, 65535)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for in, msg := range map[string]string{
		`"8472"`: `not a number: "8472"`,
		`true`:   "not a number: true",
		`null`:   "not a number: null",
		`{`:      "not a number: {",
		`1.5`:    "not an integer: 1.5",
		`1e30`:   "not an integer: 1e30",
		`1e3`:    "not an integer: 1e3",
		`0`:      "0 out of range 1..65535",
		`65536`:  "65536 out of range 1..65535",
		`-1`:     "-1 out of range 1..65535",
	} {
		_, err := Int(json.RawMessage(in), 1, 65535)
		assert.EqualError(t, err, msg, in)
	}
}

func TestDescribe(t *testing.T) {
	var b bool
	err := json.Unmarshal([]byte(`"yes"`), &b)
	assert.EqualError(t, Describe(err), "a JSON string where a bool is expected")
	other := json.Unmarshal([]byte(`{`), &b)
	assert.Equal(t, other, Describe(other))
}
