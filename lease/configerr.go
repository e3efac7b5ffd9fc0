package lease

import "strings"

// ConfigError reports an invalid network configuration, naming the
// net-conf.json key and the value at fault. It wraps ErrInvalidConfig (and
// the underlying decoding error, if any), so callers may use
// errors.Is(err, ErrInvalidConfig) or errors.As to get the key.
type ConfigError struct {
	// Key is the net-conf.json key ("SubnetLen", "Backend.Type"); empty when
	// the document as a whole is at fault.
	Key string
	// Value is the offending value as written (JSON text for type errors);
	// empty when the key is missing.
	Value string
	// Reason says what is wrong, in lower case.
	Reason string
	// Err is the underlying error, if any (e.g. a JSON syntax error).
	Err error
}

func (e *ConfigError) Error() string {
	var b strings.Builder
	b.WriteString(ErrInvalidConfig.Error())
	b.WriteString(": ")
	if e.Key != "" {
		b.WriteString(e.Key)
		if e.Value != "" {
			b.WriteString(" ")
			b.WriteString(e.Value)
		}
		b.WriteString(": ")
	}
	b.WriteString(e.Reason)
	if e.Err != nil {
		b.WriteString(": ")
		b.WriteString(e.Err.Error())
	}
	return b.String()
}

// Unwrap returns ErrInvalidConfig and the underlying error.
func (e *ConfigError) Unwrap() []error {
	if e.Err != nil {
		return []error{ErrInvalidConfig, e.Err}
	}
	return []error{ErrInvalidConfig}
}

// maxValueLen bounds how much of a bad value an error quotes.
const maxValueLen = 80

func configErr(key, value, reason string) *ConfigError {
	if len(value) > maxValueLen {
		value = value[:maxValueLen] + "..."
	}
	return &ConfigError{Key: key, Value: value, Reason: reason}
}
