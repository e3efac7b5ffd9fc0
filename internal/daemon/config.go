package daemon

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/flannelkit/flannel/wireguard"
)

// EnvPrefix is the prefix of the environment variables that set flags:
// --etcd-endpoints is also FLANNELD_ETCD_ENDPOINTS. A flag given on the
// command line wins over its variable.
const EnvPrefix = "FLANNELD_"

// Config is the parsed command line.
type Config struct {
	EtcdEndpoints              []string
	EtcdPrefix                 string
	EtcdKeyFile, EtcdCertFile  string
	EtcdCAFile                 string
	EtcdUsername, EtcdPassword string
	KubeSubnetMgr              bool
	KubeAPIURL, KubeconfigFile string
	KubeAnnotationPrefix       string
	Ifaces, IfaceRegexes       []string
	IfaceCanReach              netip.Addr
	PublicIP, PublicIPv6       netip.Addr
	SubnetFile                 string
	NetConfigPath              string
	SubnetLeaseRenewMargin     time.Duration
	IPMasq                     bool
	IPMasqRandomFullyDisable   bool
	IPMasqIPv6                 bool
	IPTablesResync             time.Duration
	IPTablesForwardRules       bool
	IPBlackholeRoute           bool
	HealthzIP                  netip.Addr
	HealthzPort                int
	SetNodeNetworkUnavailable  bool
	Version                    bool
	Verbosity                  int
	LogFormat                  string
	Cleanup                    bool
	// NodeName is the Kubernetes node (kube mode): NODE_NAME, else the
	// pod's node is looked up from POD_NAME/POD_NAMESPACE by the store.
	NodeName, PodName, PodNamespace string
	// WireguardKeyFile keeps the wireguard backend's private key:
	// WIREGUARD_KEY_FILE as upstream reads it, else upstream's
	// /run/flannel/wgkey.
	WireguardKeyFile string
}

// list is a repeatable flag; an environment value may hold several
// comma-separated entries.
type list struct{ v *[]string }

func (l list) String() string {
	if l.v == nil {
		return ""
	}
	return strings.Join(*l.v, ",")
}

func (l list) Set(s string) error {
	if s == "" {
		return errors.New("empty value")
	}
	*l.v = append(*l.v, s)
	return nil
}

// addrFlag parses an IP address; family "4" or "6" restricts it.
type addrFlag struct {
	v      *netip.Addr
	family string
}

func (a addrFlag) String() string {
	if a.v == nil || !a.v.IsValid() {
		return ""
	}
	return a.v.String()
}

func (a addrFlag) Set(s string) error {
	ip, err := netip.ParseAddr(s)
	if err != nil {
		return fmt.Errorf("not an IP address")
	}
	ip = ip.Unmap()
	switch {
	case a.family == "4" && !ip.Is4():
		return fmt.Errorf("not an IPv4 address")
	case a.family == "6" && !ip.Is6():
		return fmt.Errorf("not an IPv6 address")
	}
	*a.v = ip
	return nil
}

// flagSet declares upstream flanneld's flags (same names and defaults) and
// this daemon's additions (--cleanup, --log-format) on c.
func flagSet(c *Config, out io.Writer) (*flag.FlagSet, *int, *int, *string) {
	fs := flag.NewFlagSet("flanneld", flag.ContinueOnError)
	fs.SetOutput(out)
	renewMin := new(int)
	resyncSec := new(int)
	eps := new(string)
	fs.StringVar(eps, "etcd-endpoints", "http://127.0.0.1:4001,http://127.0.0.1:2379", "a comma-delimited list of etcd endpoints")
	fs.StringVar(&c.EtcdPrefix, "etcd-prefix", "/coreos.com/network", "etcd prefix")
	fs.StringVar(&c.EtcdKeyFile, "etcd-keyfile", "", "SSL key file used to secure etcd communication")
	fs.StringVar(&c.EtcdCertFile, "etcd-certfile", "", "SSL certification file used to secure etcd communication")
	fs.StringVar(&c.EtcdCAFile, "etcd-cafile", "", "SSL Certificate Authority file used to secure etcd communication")
	fs.StringVar(&c.EtcdUsername, "etcd-username", "", "username for BasicAuth to etcd")
	fs.StringVar(&c.EtcdPassword, "etcd-password", "", "password for BasicAuth to etcd")
	fs.BoolVar(&c.KubeSubnetMgr, "kube-subnet-mgr", false, "contact the Kubernetes API for subnet assignment instead of etcd")
	fs.StringVar(&c.KubeAPIURL, "kube-api-url", "", "Kubernetes API server URL (not needed in cluster)")
	fs.StringVar(&c.KubeconfigFile, "kubeconfig-file", "", "kubeconfig file location (not needed in cluster)")
	fs.StringVar(&c.KubeAnnotationPrefix, "kube-annotation-prefix", "flannel.alpha.coreos.com", "Kubernetes annotation prefix")
	fs.Var(list{&c.Ifaces}, "iface", "interface to use (IP or name) for inter-host communication; may be repeated")
	fs.Var(list{&c.IfaceRegexes}, "iface-regex", "regex of the interface to use (IP or name); may be repeated")
	fs.Var(addrFlag{v: &c.IfaceCanReach}, "iface-can-reach", "use the interface that reaches this address")
	fs.Var(addrFlag{v: &c.PublicIP, family: "4"}, "public-ip", "IPv4 address accessible by other nodes for inter-host communication")
	fs.Var(addrFlag{v: &c.PublicIPv6, family: "6"}, "public-ipv6", "IPv6 address accessible by other nodes for inter-host communication")
	fs.StringVar(&c.SubnetFile, "subnet-file", "/run/flannel/subnet.env", "filename where env variables (subnet, MTU, ...) will be written to")
	fs.StringVar(&c.NetConfigPath, "net-config-path", "/etc/kube-flannel/net-conf.json", "path to the network configuration file (kube mode)")
	fs.IntVar(renewMin, "subnet-lease-renew-margin", 60, "subnet lease renewal margin, in minutes")
	fs.BoolVar(&c.IPMasq, "ip-masq", false, "set up IP masquerade rules for traffic destined outside of the overlay network")
	fs.BoolVar(&c.IPMasqRandomFullyDisable, "ip-masq-fully-random-disable", false, "disable fully-random mode for MASQUERADE (--random-fully)")
	fs.BoolVar(&c.IPMasqIPv6, "ip-masq-ipv6", true, "with -ip-masq, masquerade IPv6 pod traffic too (false: IPv4 only, as K3s without --flannel-ipv6-masq)")
	// The spelling of this project's first releases, kept so their unit
	// files still start.
	fs.BoolVar(&c.IPMasqRandomFullyDisable, "ip-masq-random-fully-disable", false, "deprecated spelling of -ip-masq-fully-random-disable")
	fs.IntVar(resyncSec, "iptables-resync", 5, "resync period for the masquerade/forward rules, in seconds")
	fs.BoolVar(&c.IPTablesForwardRules, "iptables-forward-rules", true, "add accept rules to the FORWARD chain")
	fs.BoolVar(&c.IPBlackholeRoute, "ip-blackhole-route", false, "add a blackhole route for the node's subnet")
	fs.Var(addrFlag{v: &c.HealthzIP}, "healthz-ip", "the IP address for the health, readiness and metrics server to listen on")
	fs.IntVar(&c.HealthzPort, "healthz-port", 0, "the port for the health, readiness and metrics server (0 disables it)")
	fs.BoolVar(&c.SetNodeNetworkUnavailable, "set-node-network-unavailable", true, "set the Node's NetworkUnavailable condition to false when ready (kube mode)")
	fs.BoolVar(&c.Version, "version", false, "print the version and exit")
	fs.IntVar(&c.Verbosity, "v", 0, "log verbosity: 0 info, 1 or more debug")
	// klog flags that upstream copies onto its flag set: accepted (unit
	// files and manifests pass them) and ignored, since logging is slog.
	fs.String("vmodule", "", "accepted for compatibility with upstream's klog flags; ignored")
	fs.String("log_backtrace_at", "", "accepted for compatibility with upstream's klog flags; ignored")
	fs.StringVar(&c.LogFormat, "log-format", "text", "log format: text or json")
	fs.BoolVar(&c.Cleanup, "cleanup", false, "remove this node's devices, routes, rules and (etcd) lease, then exit")
	return fs, renewMin, resyncSec, eps
}

// Parse parses args (without the program name) with the FLANNELD_*
// variables that getenv returns, and checks every value: an error names
// the flag (or variable) and the bad value, before anything touches the
// kernel. getenv also supplies NODE_NAME, POD_NAME, POD_NAMESPACE and
// WIREGUARD_KEY_FILE.
func Parse(args []string, getenv func(string) string, out io.Writer) (Config, error) {
	c := Config{HealthzIP: netip.IPv4Unspecified()}
	fs, renewMin, resyncSec, eps := flagSet(&c, out)
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || envErr != nil {
			return
		}
		name := EnvPrefix + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		v := getenv(name)
		if v == "" {
			return
		}
		vals := []string{v}
		if _, ok := f.Value.(list); ok {
			vals = strings.Split(v, ",")
		}
		for _, x := range vals {
			if err := fs.Set(f.Name, strings.TrimSpace(x)); err != nil {
				envErr = fmt.Errorf("invalid value %q for %s: %w", v, name, err)
				return
			}
		}
	})
	if envErr != nil {
		return Config{}, envErr
	}
	c.NodeName, c.PodName, c.PodNamespace = getenv("NODE_NAME"), getenv("POD_NAME"), getenv("POD_NAMESPACE")
	if c.WireguardKeyFile = getenv("WIREGUARD_KEY_FILE"); c.WireguardKeyFile == "" {
		c.WireguardKeyFile = wireguard.DefaultKeyFile
	}
	for _, e := range strings.Split(*eps, ",") {
		if e = strings.TrimSpace(e); e != "" {
			c.EtcdEndpoints = append(c.EtcdEndpoints, e)
		}
	}
	if *renewMin <= 0 {
		return Config{}, fmt.Errorf("invalid value %d for -subnet-lease-renew-margin: must be a positive number of minutes", *renewMin)
	}
	c.SubnetLeaseRenewMargin = time.Duration(*renewMin) * time.Minute
	if *resyncSec <= 0 {
		return Config{}, fmt.Errorf("invalid value %d for -iptables-resync: must be a positive number of seconds", *resyncSec)
	}
	c.IPTablesResync = time.Duration(*resyncSec) * time.Second
	return c, c.validate()
}

func (c Config) validate() error {
	if c.Version {
		return nil
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		return fmt.Errorf("invalid value %q for -log-format: want text or json", c.LogFormat)
	}
	if c.HealthzPort < 0 || c.HealthzPort > 65535 {
		return fmt.Errorf("invalid value %d for -healthz-port: want 0..65535", c.HealthzPort)
	}
	if !c.HealthzIP.IsValid() {
		return errors.New("invalid value for -healthz-ip: empty")
	}
	for _, r := range c.IfaceRegexes {
		if _, err := regexp.Compile(r); err != nil {
			return fmt.Errorf("invalid value %q for -iface-regex: %w", r, err)
		}
	}
	if c.KubeSubnetMgr {
		if c.NodeName == "" && (c.PodName == "" || c.PodNamespace == "") {
			return errors.New("-kube-subnet-mgr needs the node name: set NODE_NAME (or POD_NAME and POD_NAMESPACE)")
		}
		if c.KubeAPIURL != "" {
			if u, err := url.Parse(c.KubeAPIURL); err != nil || u.Host == "" {
				return fmt.Errorf("invalid value %q for -kube-api-url: want a URL like https://10.0.0.1:6443", c.KubeAPIURL)
			}
		}
		return nil
	}
	if len(c.EtcdEndpoints) == 0 {
		return errors.New("invalid value for -etcd-endpoints: no endpoint")
	}
	for _, e := range c.EtcdEndpoints {
		u, err := url.Parse(e)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fmt.Errorf("invalid value %q for -etcd-endpoints: want URLs like https://10.0.0.1:2379", e)
		}
		if _, _, err := splitHostPort(u.Host); err != nil {
			return fmt.Errorf("invalid value %q for -etcd-endpoints: %w", e, err)
		}
	}
	if !strings.HasPrefix(c.EtcdPrefix, "/") {
		return fmt.Errorf("invalid value %q for -etcd-prefix: must start with /", c.EtcdPrefix)
	}
	if (c.EtcdCertFile == "") != (c.EtcdKeyFile == "") {
		return errors.New("-etcd-certfile and -etcd-keyfile go together")
	}
	return nil
}

func splitHostPort(h string) (string, int, error) {
	i := strings.LastIndex(h, ":")
	if i < 0 || strings.HasSuffix(h, "]") {
		return h, 0, nil
	}
	p, err := strconv.Atoi(h[i+1:])
	if err != nil || p < 1 || p > 65535 {
		return "", 0, fmt.Errorf("bad port %q", h[i+1:])
	}
	return h[:i], p, nil
}
