package netlab

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// retryInterval is how often Ping and TCPCheck try again.
const retryInterval = 200 * time.Millisecond

// Ping sends ICMP (or ICMPv6) echo requests from the pod's address of dst's
// family until one is answered or ctx ends. The error names both ends and
// the last failure seen (a send error, an ICMP error, or no reply).
func (p *Pod) Ping(ctx context.Context, dst netip.Addr) error {
	if err := p.Node.lab.begin(); err != nil {
		return err
	}
	defer p.Node.lab.end()
	return ping(ctx, p.NS, p.Node.Name+"/"+p.Name, pickSrc(dst, p.IP, p.IPv6), dst)
}

// ping opens a raw ICMP socket in ns bound to src (the socket keeps its
// namespace afterwards, so only its creation needs the namespace switch) and
// echoes dst every retryInterval until a reply with our identifier arrives.
func ping(ctx context.Context, ns netns.NsHandle, from string, src, dst netip.Addr) error {
	dst = dst.WithZone("")
	if !dst.IsValid() {
		return fmt.Errorf("ping from %s: invalid destination", from)
	}
	if !src.IsValid() {
		return fmt.Errorf("ping from %s to %s: %s has no address of that family", from, dst, from)
	}
	fail := func(err error) error { return fmt.Errorf("ping from %s (%s) to %s: %w", from, src, dst, err) }
	p, err := openPinger(ns, src, dst)
	if err != nil {
		return fail(err)
	}
	defer p.c.Close()
	var lastErr error
	for seq := 1; ; seq++ {
		if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
			// ctx's timer may not have fired yet; don't spin until it does.
			<-ctx.Done()
		}
		if err := ctx.Err(); err != nil {
			if lastErr == nil {
				lastErr = err
			}
			return fail(fmt.Errorf("%d echo requests unanswered: %w (%w)", seq-1, lastErr, context.Cause(ctx)))
		}
		until := time.Now().Add(retryInterval)
		if d, ok := ctx.Deadline(); ok && d.Before(until) {
			until = d
		}
		answered, err := p.echo(seq, until)
		if answered {
			return nil
		}
		var fatal *fatalErr
		if errors.As(err, &fatal) {
			return fail(fatal.err)
		}
		lastErr = err
		if d := time.Until(until); d > 0 {
			// The send failed at once; wait out the interval.
			t := time.NewTimer(d)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
			t.Stop()
		}
	}
}

// fatalErr marks a pinger error that ends the ping instead of being retried.
type fatalErr struct{ err error }

func (e *fatalErr) Error() string { return e.err.Error() }

// pinger is one raw ICMP or ICMPv6 socket echoing one destination.
type pinger struct {
	c         *icmp.PacketConn
	dst       netip.Addr
	to        *net.IPAddr
	proto     int
	reqType   icmp.Type
	replyType icmp.Type
	id        int
	buf       []byte
}

func openPinger(ns netns.NsHandle, src, dst netip.Addr) (*pinger, error) {
	p := &pinger{
		dst: dst, to: &net.IPAddr{IP: net.IP(dst.AsSlice())},
		proto: 1, reqType: ipv4.ICMPTypeEcho, replyType: ipv4.ICMPTypeEchoReply,
		id: int(rand.Uint32() & 0xffff), buf: make([]byte, 1500),
	}
	network := "ip4:icmp"
	if dst.Is6() {
		network, p.proto = "ip6:ipv6-icmp", 58
		p.reqType, p.replyType = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
	}
	if err := inNS(ns, func() error {
		var err error
		p.c, err = icmp.ListenPacket(network, src.String())
		return err
	}); err != nil {
		return nil, fmt.Errorf("open icmp socket: %w", err)
	}
	if dst.Is6() {
		// Raw ICMPv6 sockets see neighbour discovery and MLD too.
		var f ipv6.ICMPFilter
		f.SetAll(true)
		for _, t := range []ipv6.ICMPType{ipv6.ICMPTypeEchoReply, ipv6.ICMPTypeDestinationUnreachable, ipv6.ICMPTypeTimeExceeded, ipv6.ICMPTypePacketTooBig} {
			f.Accept(t)
		}
		if err := p.c.IPv6PacketConn().SetICMPFilter(&f); err != nil {
			p.c.Close()
			return nil, fmt.Errorf("set icmpv6 filter: %w", err)
		}
	}
	return p, nil
}

// echo sends one request and reads until our reply arrives (true) or until
// passes; the error says what was seen instead (a *fatalErr ends the ping).
func (p *pinger) echo(seq int, until time.Time) (bool, error) {
	msg := icmp.Message{Type: p.reqType, Body: &icmp.Echo{ID: p.id, Seq: seq & 0xffff, Data: []byte("flannelkit netlab ping")}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return false, &fatalErr{fmt.Errorf("marshal echo: %w", err)}
	}
	lastErr := errors.New("no echo reply")
	if _, err := p.c.WriteTo(b, p.to); err != nil {
		lastErr = fmt.Errorf("send echo: %w", err)
	}
	for {
		if err := p.c.SetReadDeadline(until); err != nil {
			return false, &fatalErr{fmt.Errorf("set deadline: %w", err)}
		}
		n, peer, err := p.c.ReadFrom(p.buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return false, lastErr
			}
			return false, fmt.Errorf("receive: %w", err)
		}
		m, err := icmp.ParseMessage(p.proto, p.buf[:n])
		if err != nil {
			continue
		}
		if ok, why := p.judge(m, addrOf(peer)); ok {
			return true, nil
		} else if why != nil {
			lastErr = why
		}
	}
}

// judge says whether m is our echo reply, or which ICMP error about our
// request it is (nil for unrelated messages).
func (p *pinger) judge(m *icmp.Message, from netip.Addr) (bool, error) {
	v6 := p.dst.Is6()
	switch body := m.Body.(type) {
	case *icmp.Echo:
		return m.Type == p.replyType && body.ID == p.id && from == p.dst, nil
	case *icmp.DstUnreach:
		if echoID(body.Data, v6) == p.id {
			return false, fmt.Errorf("destination unreachable (code %d) from %s", m.Code, from)
		}
	case *icmp.TimeExceeded:
		if echoID(body.Data, v6) == p.id {
			return false, fmt.Errorf("time exceeded from %s", from)
		}
	case *icmp.PacketTooBig:
		if echoID(body.Data, v6) == p.id {
			return false, fmt.Errorf("packet too big (mtu %d) from %s", body.MTU, from)
		}
	}
	return false, nil
}

// addrOf returns the address of a raw socket's peer.
func addrOf(a net.Addr) netip.Addr {
	ia, ok := a.(*net.IPAddr)
	if !ok {
		return netip.Addr{}
	}
	ip, _ := netip.AddrFromSlice(ia.IP)
	return ip.Unmap()
}

// echoID returns the identifier of the echo request quoted in an ICMP error
// (original IP header plus at least 8 bytes), or -1.
func echoID(quoted []byte, v6 bool) int {
	var inner []byte
	if v6 {
		if len(quoted) < 40 || quoted[6] != 58 {
			return -1
		}
		inner = quoted[40:]
		if len(inner) < 8 || inner[0] != byte(ipv6.ICMPTypeEchoRequest) {
			return -1
		}
	} else {
		if len(quoted) < 20 || quoted[9] != 1 {
			return -1
		}
		ihl := int(quoted[0]&0x0f) * 4
		if len(quoted) < ihl+8 {
			return -1
		}
		inner = quoted[ihl:]
		if inner[0] != byte(ipv4.ICMPTypeEcho) {
			return -1
		}
	}
	return int(inner[4])<<8 | int(inner[5])
}
