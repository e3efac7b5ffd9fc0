package dockerhost

import (
	"io"
	"net"
	"sync"

	"github.com/vishvananda/netns"

	"github.com/flannelkit/flannel/internal/nlsafe"
)

// relay accepts TCP connections on an address inside a namespace and
// relays them to a target dialled from the caller's namespace: how the
// hosts reach the embedded etcd on loopback.
type relay struct {
	ln    net.Listener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]bool
}

func startRelay(nsName, listen, target string) (*relay, error) {
	ns, err := netns.GetFromName(nsName)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	r := &relay{conns: map[net.Conn]bool{}}
	if err := nlsafe.InNamespace(ns, func() error {
		var err error
		r.ln, err = net.Listen("tcp", listen)
		return err
	}); err != nil {
		return nil, err
	}
	r.wg.Add(1)
	go r.accept(target)
	return r, nil
}

func (r *relay) accept(target string) {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			d, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				return
			}
			if !r.track(true, c, d) {
				return
			}
			var pw sync.WaitGroup
			pw.Add(2)
			go func() { defer pw.Done(); _, _ = io.Copy(d, c); _ = d.(*net.TCPConn).CloseWrite() }()
			go func() { defer pw.Done(); _, _ = io.Copy(c, d); _ = c.(*net.TCPConn).CloseWrite() }()
			pw.Wait()
			r.track(false, c, d)
		}()
	}
}

// track adds or removes (and closes) a connection pair; adding fails
// (closing both) once the relay stops.
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
