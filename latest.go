package flannel

import "sync"

// latest hands the newest value from a producer that must never block (a
// store's watch callback, a backend's Env.Publish) to one consumer. put
// replaces a value not yet taken (latest wins) and signal holds at most one
// pending wake-up.
type latest[T any] struct {
	mu     sync.Mutex
	v      T
	have   bool
	signal chan struct{}
}

func newLatest[T any]() *latest[T] { return &latest[T]{signal: make(chan struct{}, 1)} }

func (l *latest[T]) put(v T) {
	l.mu.Lock()
	l.v, l.have = v, true
	l.mu.Unlock()
	select {
	case l.signal <- struct{}{}:
	default:
	}
}

// get returns the newest value, leaving it in place.
func (l *latest[T]) get() (T, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.v, l.have
}

// take returns the newest value and empties the box.
func (l *latest[T]) take() (T, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	v, ok := l.v, l.have
	var zero T
	l.v, l.have = zero, false
	return v, ok
}
