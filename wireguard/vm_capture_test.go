package wireguard_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/vmlab"
)

// capture reads every frame on the wire between the nodes (all ports of
// the lab's segment 0, through an AF_PACKET socket in its namespace) and
// sorts the IP packets: WireGuard UDP (to or from a listen port) by outer
// family and port, packets whose outer addresses are pod addresses or
// that hold the marker in clear (plain, which must stay zero), and the
// rest.
type capture struct {
	marker []byte
	pods   []netip.Prefix
	ports  map[uint16]bool

	plain  atomic.Int64
	maxWG4 atomic.Int64 // largest outer IPv4 WireGuard packet

	mu    sync.Mutex
	wg    map[string]int // "udp4:51820" -> frames
	other map[string]int // other IP traffic, by kind
	first string         // first plain frame's headers
	stop  func()
}

func startCapture(t *testing.T, lab *netlab.Lab, marker []byte, pods []netip.Prefix, ports ...uint16) *capture {
	t.Helper()
	c := &capture{marker: marker, pods: pods, ports: map[uint16]bool{}, wg: map[string]int{}, other: map[string]int{}}
	for _, p := range ports {
		c.ports[p] = true
	}
	c.stop = vmlab.Tap(t, lab, func(f []byte) {
		if len(f) >= 14 {
			c.frame(f)
		}
	})
	return c
}

// frame sorts one Ethernet frame.
func (c *capture) frame(f []byte) {
	var (
		src, dst  netip.Addr
		proto     byte
		l4        []byte
		fam       string
		totalLen  int
		isControl bool
	)
	switch {
	case f[12] == 0x08 && f[13] == 0x00 && len(f) >= 34:
		ip := f[14:]
		hl := int(ip[0]&0xf) * 4
		src, dst = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
		proto, fam, totalLen = ip[9], "4", int(binary.BigEndian.Uint16(ip[2:4]))
		if len(ip) >= hl {
			l4 = ip[hl:]
		}
	case f[12] == 0x86 && f[13] == 0xdd && len(f) >= 54:
		ip := f[14:]
		src, dst = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
		proto, fam, l4 = ip[6], "6", ip[40:]
		// Neighbour discovery and MLD are the underlay's own chatter.
		isControl = proto == 58 && len(l4) > 0 && (l4[0] >= 133 && l4[0] <= 137 || l4[0] == 143) || proto == 0
	default:
		if bytes.Contains(f, c.marker) {
			c.plainFrame(f)
		}
		return
	}
	if c.isPod(src) || c.isPod(dst) {
		c.plainFrame(f)
		return
	}
	if proto == unix.IPPROTO_UDP && len(l4) >= 4 {
		sp, dp := binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4])
		port := dp
		if !c.ports[dp] {
			port = sp
		}
		if c.ports[port] {
			c.mu.Lock()
			c.wg[fmt.Sprintf("udp%s:%d", fam, port)]++
			c.mu.Unlock()
			if fam == "4" && int64(totalLen) > c.maxWG4.Load() {
				c.maxWG4.Store(int64(totalLen)) // one reader goroutine
			}
			if bytes.Contains(f, c.marker) {
				c.plainFrame(f)
			}
			return
		}
	}
	if bytes.Contains(f, c.marker) {
		c.plainFrame(f)
		return
	}
	if !isControl {
		c.mu.Lock()
		c.other[fmt.Sprintf("ip%s proto %d %s->%s", fam, proto, src, dst)]++
		c.mu.Unlock()
	}
}

func (c *capture) isPod(a netip.Addr) bool {
	for _, p := range c.pods {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func (c *capture) plainFrame(f []byte) {
	if c.plain.Add(1) == 1 {
		c.mu.Lock()
		c.first = fmt.Sprintf("% x", f[:min(len(f), 74)])
		c.mu.Unlock()
	}
}

// summary is the WireGuard and other counts, for logs.
func (c *capture) summary() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var parts []string
	for k, v := range c.wg {
		parts = append(parts, fmt.Sprintf("%s=%d", k, v))
	}
	for k, v := range c.other {
		parts = append(parts, fmt.Sprintf("other[%s]=%d", k, v))
	}
	sort.Strings(parts)
	return fmt.Sprintf("plain=%d %s", c.plain.Load(), strings.Join(parts, " "))
}

func (c *capture) wgCount(key string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.wg[key]
}
