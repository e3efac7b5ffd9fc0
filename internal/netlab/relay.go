package netlab

import (
	"io"
	"net"
	"sync"

	"github.com/vishvananda/netns"
)

// Relay accepts TCP connections on listen inside ns and relays each to
// target, dialled from the caller's namespace: how node namespaces reach a
// store (an embedded etcd, a kube-apiserver) on the host's loopback. The
// returned stop closes the listener and every relayed connection and joins
// all goroutines.
func Relay(ns netns.NsHandle, listen, target string) (stop func(), err error) {
	r := &relay{conns: map[net.Conn]bool{}}
	if err := inNS(ns, func() error {
		var err error
		r.ln, err = net.Listen("tcp", listen)
		return err
	}); err != nil {
		return nil, err
	}
	r.wg.Go(func() { r.accept(target) })
	return r.stop, nil
}

type relay struct {
	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]bool // nil once stopped
}

func (r *relay) accept(target string) {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		r.wg.Go(func() {
			d, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				return
			}
			if !r.track(true, c, d) {
				return
			}
			var pw sync.WaitGroup
			pw.Go(func() { _, _ = io.Copy(d, c); _ = d.(*net.TCPConn).CloseWrite() })
			pw.Go(func() { _, _ = io.Copy(c, d); _ = c.(*net.TCPConn).CloseWrite() })
			pw.Wait()
			r.track(false, c, d)
		})
	}
}

// track adds or removes (and closes) a connection pair; adding fails
// (closing both) once the relay has stopped.
func (r *relay) track(on bool, cs ...net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if on && r.conns == nil {
		for _, c := range cs {
			c.Close()
		}
		return false
	}
	for _, c := range cs {
		if on {
			r.conns[c] = true
		} else {
			c.Close()
			delete(r.conns, c)
		}
	}
	return true
}

func (r *relay) stop() {
	r.ln.Close()
	r.mu.Lock()
	for c := range r.conns {
		c.Close()
	}
	r.conns = nil
	r.mu.Unlock()
	r.wg.Wait()
}
