package backend

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// ErrNoInterface is wrapped by FindInterface when no interface matches.
var ErrNoInterface = errors.New("no external interface")

// InterfaceOptions selects the external (underlay) interface. Names,
// Regexes and CanReach are tried in that order, each only when set; the
// first interface that matches and has an address of every needed family
// wins. When none of them is set, the interface of the default route is
// used. An explicit selector that matches nothing is an error: FindInterface
// does not fall back to the default route then (as upstream flannel's
// --iface and --iface-regex).
type InterfaceOptions struct {
	// Names are interface names or IP addresses (the interface holding
	// that address), tried in order. Optional.
	Names []string
	// Regexes are matched against interface names and then their
	// addresses, in order; down and loopback interfaces are skipped.
	// Optional.
	Regexes []string
	// CanReach selects the interface (and source address) the kernel
	// routes this address through. Optional.
	CanReach netip.Addr
	// PublicIP and PublicIPv6 override the published addresses (e.g. a
	// node behind NAT). Optional: the interface's addresses otherwise.
	PublicIP, PublicIPv6 netip.Addr
	// IPv4 and IPv6 are the address families the interface must carry.
	// Both false means IPv4.
	IPv4, IPv6 bool
}

func (o InterfaceOptions) families() (v4, v6 bool) {
	if !o.IPv4 && !o.IPv6 {
		return true, false
	}
	return o.IPv4, o.IPv6
}

// FindInterface finds the node's external interface in h's namespace
// according to opts and fills its name, index, MTU, addresses (the first
// usable global unicast address of each needed family; the route's source
// address when the interface came from a route) and public addresses. When
// nothing matches it returns an error wrapping ErrNoInterface that lists
// every selector tried and why it failed.
func FindInterface(h *netlink.Handle, opts InterfaceOptions) (flannel.ExternalInterface, error) {
	if opts.PublicIP.IsValid() && !opts.PublicIP.Unmap().Is4() {
		return flannel.ExternalInterface{}, fmt.Errorf("public ip %s is not an IPv4 address", opts.PublicIP)
	}
	if opts.PublicIPv6.IsValid() && (!opts.PublicIPv6.Is6() || opts.PublicIPv6.Is4In6()) {
		return flannel.ExternalInterface{}, fmt.Errorf("public ipv6 %s is not an IPv6 address", opts.PublicIPv6)
	}
	f := finder{h: nlsafe.Wrap(h), opts: opts}
	f.v4, f.v6 = opts.families()
	ext, ok, err := f.find()
	if err != nil {
		return flannel.ExternalInterface{}, err
	}
	if !ok {
		return flannel.ExternalInterface{}, fmt.Errorf("%w: %s", ErrNoInterface, strings.Join(f.tried, "; "))
	}
	if f.v4 {
		ext.PublicIP = ext.IP
		if opts.PublicIP.IsValid() {
			ext.PublicIP = opts.PublicIP.Unmap()
		}
	}
	if f.v6 {
		ext.PublicIPv6 = ext.IPv6
		if opts.PublicIPv6.IsValid() {
			ext.PublicIPv6 = opts.PublicIPv6
		}
	}
	return ext, nil
}

type finder struct {
	h      nlsafe.Handle
	opts   InterfaceOptions
	v4, v6 bool
	tried  []string
}

func (f *finder) fail(format string, args ...any) {
	f.tried = append(f.tried, fmt.Sprintf(format, args...))
}

// find returns the chosen interface, or ok=false with f.tried filled. err
// is only for failures to talk to the kernel.
func (f *finder) find() (ext flannel.ExternalInterface, ok bool, err error) {
	explicit := len(f.opts.Names) > 0 || len(f.opts.Regexes) > 0 || f.opts.CanReach.IsValid()
	for _, name := range f.opts.Names {
		if ext, ok, err = f.byName(name); ok || err != nil {
			return ext, ok, err
		}
	}
	for _, expr := range f.opts.Regexes {
		if ext, ok, err = f.byRegex(expr); ok || err != nil {
			return ext, ok, err
		}
	}
	if f.opts.CanReach.IsValid() {
		if ext, ok, err = f.byCanReach(f.opts.CanReach); ok || err != nil {
			return ext, ok, err
		}
	}
	if explicit {
		return ext, false, nil
	}
	return f.byDefaultRoute()
}

func (f *finder) byName(name string) (flannel.ExternalInterface, bool, error) {
	if ip, err := netip.ParseAddr(name); err == nil {
		ip = ip.Unmap()
		link, err := f.linkWithAddr(ip)
		if err != nil {
			return flannel.ExternalInterface{}, false, err
		}
		if link == nil {
			f.fail("address %s: not on any interface", ip)
			return flannel.ExternalInterface{}, false, nil
		}
		return f.fromLink(fmt.Sprintf("address %s", ip), link, ip)
	}
	link, err := f.h.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			f.fail("name %q: not found", name)
			return flannel.ExternalInterface{}, false, nil
		}
		return flannel.ExternalInterface{}, false, fmt.Errorf("look up interface %q: %w", name, err)
	}
	return f.fromLink(fmt.Sprintf("name %q", name), link, netip.Addr{})
}

func (f *finder) byRegex(expr string) (flannel.ExternalInterface, bool, error) {
	re, err := regexp.Compile(expr)
	if err != nil {
		return flannel.ExternalInterface{}, false, fmt.Errorf("interface regex %q: %w", expr, err)
	}
	links, err := f.h.LinkList()
	if err != nil {
		return flannel.ExternalInterface{}, false, err
	}
	what := fmt.Sprintf("regex %q", expr)
	var reasons []string
	for _, link := range links {
		la := link.Attrs()
		if la.Flags&net.FlagUp == 0 || la.Flags&net.FlagLoopback != 0 {
			continue
		}
		var prefer netip.Addr
		if !re.MatchString(la.Name) {
			addrs, err := f.h.AddrList(link, netlink.FAMILY_ALL)
			if err != nil {
				return flannel.ExternalInterface{}, false, err
			}
			for _, a := range addrs {
				if ip := ipconv.AddrFromIP(a.IP); ip.IsValid() && re.MatchString(ip.String()) {
					prefer = ip
					break
				}
			}
			if !prefer.IsValid() {
				continue
			}
		}
		ext, ok, why, err := f.usable(link, prefer)
		if err != nil || ok {
			return ext, ok, err
		}
		reasons = append(reasons, la.Name+" "+why)
	}
	if len(reasons) == 0 {
		f.fail("%s: no match", what)
	} else {
		f.fail("%s: %s", what, strings.Join(reasons, ", "))
	}
	return flannel.ExternalInterface{}, false, nil
}

func (f *finder) byCanReach(dst netip.Addr) (flannel.ExternalInterface, bool, error) {
	what := fmt.Sprintf("can-reach %s", dst)
	routes, err := f.h.RouteGet(ipconv.IPFromAddr(dst))
	if err != nil || len(routes) == 0 {
		if err == nil {
			err = errors.New("no route")
		}
		f.fail("%s: %v", what, err)
		return flannel.ExternalInterface{}, false, nil
	}
	rt := routes[0]
	link, err := f.h.LinkByIndex(rt.LinkIndex)
	if err != nil {
		return flannel.ExternalInterface{}, false, fmt.Errorf("look up interface %d (route to %s): %w", rt.LinkIndex, dst, err)
	}
	return f.fromLink(what, link, ipconv.AddrFromIP(rt.Src))
}

func (f *finder) byDefaultRoute() (flannel.ExternalInterface, bool, error) {
	// The family that decides: IPv4 when needed (as upstream), else IPv6.
	fams := []int{}
	if f.v4 {
		fams = append(fams, netlink.FAMILY_V4)
	}
	if f.v6 {
		fams = append(fams, netlink.FAMILY_V6)
	}
	var reasons []string
	seen := map[int]bool{}
	anyRoute := false
	for _, fam := range fams {
		rt, ok, err := f.defaultRoute(fam)
		if err != nil {
			return flannel.ExternalInterface{}, false, err
		}
		name := map[int]string{netlink.FAMILY_V4: "ipv4", netlink.FAMILY_V6: "ipv6"}[fam]
		if !ok {
			reasons = append(reasons, name+" none")
			continue
		}
		anyRoute = true
		if seen[rt.LinkIndex] {
			continue
		}
		seen[rt.LinkIndex] = true
		link, err := f.h.LinkByIndex(rt.LinkIndex)
		if err != nil {
			return flannel.ExternalInterface{}, false, fmt.Errorf("look up interface %d (default route): %w", rt.LinkIndex, err)
		}
		ext, ok, why, err := f.usable(link, ipconv.AddrFromIP(rt.Src))
		if err != nil || ok {
			return ext, ok, err
		}
		reasons = append(reasons, name+" via "+link.Attrs().Name+" "+why)
	}
	if !anyRoute {
		f.fail("default route: none")
	} else {
		f.fail("default route: %s", strings.Join(reasons, ", "))
	}
	return flannel.ExternalInterface{}, false, nil
}

// defaultRoute returns the main table's default route of family with the
// lowest metric that has an output interface.
func (f *finder) defaultRoute(family int) (netlink.Route, bool, error) {
	routes, err := f.h.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return netlink.Route{}, false, err
	}
	var best netlink.Route
	found := false
	for _, rt := range routes {
		if d := dstOf(rt); !d.IsValid() || d.Bits() != 0 || typeOf(rt) != unix.RTN_UNICAST {
			continue
		}
		if rt.LinkIndex == 0 && len(rt.MultiPath) > 0 {
			rt.LinkIndex = rt.MultiPath[0].LinkIndex
		}
		if rt.LinkIndex == 0 {
			continue
		}
		if !found || rt.Priority < best.Priority {
			best, found = rt, true
		}
	}
	return best, found, nil
}

// fromLink checks link and records why it is not usable under what.
func (f *finder) fromLink(what string, link netlink.Link, prefer netip.Addr) (flannel.ExternalInterface, bool, error) {
	ext, ok, why, err := f.usable(link, prefer)
	if err != nil || ok {
		return ext, ok, err
	}
	f.fail("%s: %s %s", what, link.Attrs().Name, why)
	return flannel.ExternalInterface{}, false, nil
}

// usable fills the interface from link when it has an address of every
// needed family, preferring prefer for its family when the link holds it.
// Otherwise why says what is missing.
func (f *finder) usable(link netlink.Link, prefer netip.Addr) (ext flannel.ExternalInterface, ok bool, why string, err error) {
	la := link.Attrs()
	addrs, err := f.h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return ext, false, "", err
	}
	ext = flannel.ExternalInterface{Name: la.Name, Index: la.Index, MTU: la.MTU}
	var missing []string
	if f.v4 {
		if ext.IP = pickAddr(addrs, true, prefer); !ext.IP.IsValid() {
			missing = append(missing, "ipv4")
		}
	}
	if f.v6 {
		if ext.IPv6 = pickAddr(addrs, false, prefer); !ext.IPv6.IsValid() {
			missing = append(missing, "ipv6")
		}
	}
	if len(missing) > 0 {
		return flannel.ExternalInterface{}, false, "has no global " + strings.Join(missing, "/") + " address", nil
	}
	return ext, true, "", nil
}

// pickAddr picks the global unicast address of one family: prefer when the
// link holds it, else the first one that is not tentative or deprecated,
// else the first one whose duplicate address detection did not fail.
func pickAddr(addrs []netlink.Addr, v4 bool, prefer netip.Addr) netip.Addr {
	var first, good netip.Addr
	for _, a := range addrs {
		ip := ipconv.AddrFromIP(a.IP)
		if !ip.IsValid() || ip.Is4() != v4 || !ip.IsGlobalUnicast() {
			continue
		}
		if a.Flags&unix.IFA_F_DADFAILED != 0 {
			continue
		}
		if ip == prefer {
			return ip
		}
		if !first.IsValid() {
			first = ip
		}
		if !good.IsValid() && a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DEPRECATED) == 0 {
			good = ip
		}
	}
	if good.IsValid() {
		return good
	}
	return first
}

// linkWithAddr returns the link holding ip, or nil.
func (f *finder) linkWithAddr(ip netip.Addr) (netlink.Link, error) {
	addrs, err := f.h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, err
	}
	for _, a := range addrs {
		if ipconv.AddrFromIP(a.IP) == ip {
			link, err := f.h.LinkByIndex(a.LinkIndex)
			if err != nil {
				return nil, fmt.Errorf("look up interface %d (holding %s): %w", a.LinkIndex, ip, err)
			}
			return link, nil
		}
	}
	return nil, nil
}
