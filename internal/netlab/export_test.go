package netlab

// Forget closes the Lab's fds and handles but keeps its namespace names, as
// if its process had died.
func Forget(l *Lab) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, o := range l.owned {
		o.h.Close()
		o.ns.Close()
	}
	l.owned = nil
	l.closed = true
}
