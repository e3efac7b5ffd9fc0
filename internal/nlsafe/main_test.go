package nlsafe_test

import (
	"testing"

	"go.uber.org/goleak"
)

// Every subscription's goroutines have exited once its channel is closed.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
