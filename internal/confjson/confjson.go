// Package confjson reads single values of a backend's net-conf keys, with
// errors that say what was wrong with the value (the caller names the key).
package confjson

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// Int decodes v as a JSON integer in plain notation within lo..hi. A
// fraction, an exponent, a string or anything else that is not a whole
// number is refused, and so is a number out of range.
func Int(v json.RawMessage, lo, hi int) (int, error) {
	d := json.NewDecoder(bytes.NewReader(v))
	d.UseNumber()
	var x any
	err := d.Decode(&x)
	f, ok := x.(json.Number)
	if err != nil || !ok {
		return 0, fmt.Errorf("not a number: %s", bytes.TrimSpace(v))
	}
	n, err := f.Int64()
	if err != nil {
		return 0, fmt.Errorf("not an integer: %s", f)
	}
	if n < int64(lo) || n > int64(hi) {
		return 0, fmt.Errorf("%d out of range %d..%d", n, lo, hi)
	}
	return int(n), nil
}

// Describe shortens encoding/json's type errors to "a JSON string where a
// bool is expected"; other errors are returned as they are.
func Describe(err error) error {
	if te, ok := errors.AsType[*json.UnmarshalTypeError](err); ok {
		return fmt.Errorf("a JSON %s where a %s is expected", te.Value, te.Type)
	}
	return err
}
