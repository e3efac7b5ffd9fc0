package vmlab

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// UDPProbe sends numbered datagrams from one pod to an echo server in
// another every interval until Stop, and counts the answers.
type UDPProbe struct {
	Sent, Got atomic.Int64 // datagrams sent (not failed to send), answered
	Start     time.Time    // when the probe started
	stop      func()

	mu     sync.Mutex
	sentAt []time.Duration // by sequence number, since start
	seen   map[uint64]bool
}

// Stop ends the probe, waiting (bounded) for the answers in flight. It may
// be called more than once; t's cleanup calls it too.
func (p *UDPProbe) Stop() { p.stop() }

// Missing describes the datagrams sent but never answered: sequence number
// and when it was sent (since the probe started).
func (p *UDPProbe) Missing() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for seq, at := range p.sentAt {
		if !p.seen[uint64(seq)] {
			out = append(out, fmt.Sprintf("#%d sent at +%v", seq, at.Round(time.Millisecond)))
		}
	}
	return out
}

// WaitAnswers waits until n more datagrams than now were answered.
func (p *UDPProbe) WaitAnswers(t *testing.T, n int64) {
	t.Helper()
	want := p.Got.Load() + n
	require.Eventually(t, func() bool { return p.Got.Load() >= want }, 60*time.Second, 20*time.Millisecond, "%d more probe answers", n)
}

// StartUDPProbe starts a probe from pod a to pod b over IPv4.
func StartUDPProbe(t *testing.T, a, b *netlab.Pod, interval time.Duration) *UDPProbe {
	t.Helper()
	var srv, cli *net.UDPConn
	require.NoError(t, nlsafe.InNamespace(b.NS, func() error {
		var err error
		srv, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(b.IP, 0)))
		return err
	}))
	require.NoError(t, nlsafe.InNamespace(a.NS, func() error {
		var err error
		cli, err = net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a.IP, 0)), srv.LocalAddr().(*net.UDPAddr))
		return err
	}))
	p := &UDPProbe{Start: time.Now(), seen: map[uint64]bool{}}
	var wg sync.WaitGroup
	done := make(chan struct{})
	wg.Go(func() { // echo
		buf := make([]byte, 64)
		for {
			n, from, err := srv.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			srv.WriteToUDPAddrPort(buf[:n], from)
		}
	})
	wg.Go(func() { // receive answers
		buf := make([]byte, 64)
		for {
			n, err := cli.Read(buf)
			if err != nil {
				return
			}
			if n >= 8 {
				p.answered(binary.BigEndian.Uint64(buf))
			}
		}
	})
	sender := make(chan struct{})
	wg.Go(func() { // send
		defer close(sender)
		p.send(cli, interval, done)
	})
	var once sync.Once
	p.stop = func() {
		once.Do(func() {
			close(done)
			<-sender
			// Answers in flight: TCG is slow under load, so wait for them
			// (bounded) rather than for a fixed time.
			for deadline := time.Now().Add(15 * time.Second); p.Got.Load() < p.Sent.Load() && time.Now().Before(deadline); {
				time.Sleep(50 * time.Millisecond)
			}
			srv.Close()
			cli.Close()
			wg.Wait()
		})
	}
	t.Cleanup(p.stop)
	return p
}

func (p *UDPProbe) answered(seq uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.seen[seq] {
		p.seen[seq] = true
		p.Got.Add(1)
	}
}

// send writes datagram 0, 1, ... to cli every interval until done.
func (p *UDPProbe) send(cli *net.UDPConn, interval time.Duration, done <-chan struct{}) {
	tk := time.NewTicker(interval)
	defer tk.Stop()
	for seq := uint64(0); ; seq++ {
		select {
		case <-done:
			return
		case <-tk.C:
		}
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], seq)
		p.mu.Lock()
		p.sentAt = append(p.sentAt, time.Since(p.Start))
		p.mu.Unlock()
		if _, err := cli.Write(b[:]); err != nil {
			// Not sent: never counted as missing.
			p.mu.Lock()
			p.seen[seq] = true
			p.mu.Unlock()
		} else {
			p.Sent.Add(1)
		}
	}
}

// SendMarker sends marker over TCP from pod a to pod b's address dst
// (IPv4 or IPv6, from a's address of that family) and reports whether b
// received it within timeout.
func SendMarker(t *testing.T, a, b *netlab.Pod, dst netip.Addr, marker []byte, timeout time.Duration) error {
	t.Helper()
	network, src := "tcp4", a.IP
	if dst.Is6() {
		network, src = "tcp6", a.IPv6
	}
	var ln net.Listener
	require.NoError(t, nlsafe.InNamespace(b.NS, func() error {
		var err error
		ln, err = net.Listen(network, netip.AddrPortFrom(dst, 0).String())
		return err
	}))
	defer ln.Close()
	got := make(chan []byte, 1)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ln.Close()
	wg.Go(func() {
		conn, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer conn.Close()
		conn.SetReadDeadline(time.Now().Add(timeout))
		buf := make([]byte, len(marker))
		if _, err := conn.Read(buf); err != nil {
			got <- nil
			return
		}
		got <- buf
	})
	var conn net.Conn
	if err := nlsafe.InNamespace(a.NS, func() error {
		d := net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
		var err error
		conn, err = d.Dial(network, ln.Addr().String())
		return err
	}); err != nil {
		return err
	}
	defer conn.Close()
	if _, err := conn.Write(marker); err != nil {
		return err
	}
	select {
	case r := <-got:
		if !bytes.Equal(r, marker) {
			return errors.New("marker not received")
		}
		return nil
	case <-time.After(timeout):
		ln.Close()
		return errors.New("marker not received in time")
	}
}
