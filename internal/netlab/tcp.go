package netlab

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"
)

// tcpAttemptTimeout bounds one connect-send-receive attempt of TCPCheck.
const tcpAttemptTimeout = 2 * time.Second

// TCPCheck listens in dst's namespace on dstIP (an address of dst), connects
// from p's namespace and address of the same family, sends a random payload
// and expects it echoed back. It retries until success or ctx ends and
// returns an error naming both ends and the last failure. Every goroutine
// and socket it starts is gone when it returns.
func (p *Pod) TCPCheck(ctx context.Context, dst *Pod, dstIP netip.Addr) error {
	if dst == nil {
		return fmt.Errorf("tcp check from %s/%s: no destination pod", p.Node.Name, p.Name)
	}
	if err := p.Node.lab.begin(); err != nil {
		return err
	}
	defer p.Node.lab.end()
	dstIP = dstIP.WithZone("")
	src := pickSrc(dstIP, p.IP, p.IPv6)
	fail := func(err error) error {
		return fmt.Errorf("tcp check from %s/%s (%s) to %s/%s (%s): %w", p.Node.Name, p.Name, src, dst.Node.Name, dst.Name, dstIP, err)
	}
	if !dstIP.IsValid() {
		return fail(errors.New("invalid destination address"))
	}
	if !src.IsValid() {
		return fail(errors.New("source pod has no address of that family"))
	}
	network := "tcp4"
	if dstIP.Is6() {
		network = "tcp6"
	}

	var ln *net.TCPListener
	if err := inNS(dst.NS, func() error {
		var err error
		ln, err = net.ListenTCP(network, net.TCPAddrFromAddrPort(netip.AddrPortFrom(dstIP, 0)))
		return err
	}); err != nil {
		return fail(fmt.Errorf("listen in %s: %w", dst.NSName, err))
	}
	srv := newEchoServer(ln)
	defer srv.stop()
	to := ln.Addr().(*net.TCPAddr).AddrPort()

	var lastErr error
	for attempt := 1; ; attempt++ {
		lastErr = tcpAttempt(ctx, p, network, src, to)
		if lastErr == nil {
			return nil
		}
		t := time.NewTimer(retryInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return fail(fmt.Errorf("%d attempts failed: %w (%w)", attempt, lastErr, context.Cause(ctx)))
		case <-t.C:
		}
	}
}

// tcpAttempt connects from p to to, sends a payload and reads it back.
func tcpAttempt(ctx context.Context, p *Pod, network string, src netip.Addr, to netip.AddrPort) error {
	actx, cancel := context.WithTimeout(ctx, tcpAttemptTimeout)
	defer cancel()
	var conn net.Conn
	// The socket is created on the locked thread inside p's namespace and
	// stays there; the connect completes on the same goroutine.
	if err := inNS(p.NS, func() error {
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))}
		var err error
		conn, err = d.DialContext(actx, network, to.String())
		return err
	}); err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close()
	if d, ok := actx.Deadline(); ok {
		if err := conn.SetDeadline(d); err != nil {
			return fmt.Errorf("set deadline: %w", err)
		}
	}
	payload := make([]byte, 64)
	if _, err := rand.Read(payload); err != nil {
		return fmt.Errorf("random payload: %w", err)
	}
	if _, err := conn.Write(payload); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
		return fmt.Errorf("close write: %w", err)
	}
	got, err := io.ReadAll(conn)
	if err != nil {
		return fmt.Errorf("receive: %w", err)
	}
	if !bytes.Equal(got, payload) {
		return fmt.Errorf("echo mismatch: sent %d bytes, got %d different bytes", len(payload), len(got))
	}
	return nil
}

// echoServer accepts connections on ln and echoes each until EOF.
type echoServer struct {
	ln    *net.TCPListener
	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	done  bool
}

func newEchoServer(ln *net.TCPListener) *echoServer {
	s := &echoServer{ln: ln, conns: map[net.Conn]struct{}{}}
	s.wg.Add(1)
	go s.accept()
	return s
}

func (s *echoServer) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return // closed by stop
		}
		s.mu.Lock()
		if s.done {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.echo(c)
	}
}

func (s *echoServer) echo(c net.Conn) {
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		c.Close()
	}()
	_ = c.SetDeadline(time.Now().Add(tcpAttemptTimeout))
	_, _ = io.Copy(c, c)
}

// stop closes the listener and every open connection and waits for the
// goroutines.
func (s *echoServer) stop() {
	s.mu.Lock()
	s.done = true
	s.ln.Close()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}
