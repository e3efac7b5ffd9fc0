package daemon

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"strconv"

	flannel "github.com/flannelkit/flannel"
)

// DockerOptions select the output of DockerOpts, as the flags of upstream's
// mk-docker-opts.sh do.
type DockerOptions struct {
	// Individual writes one DOCKER_OPT_<NAME>="..." line per option (-i).
	Individual bool
	// Combined writes all options on one <CombinedKey>="..." line (-c).
	// When neither is set, both are written (as upstream).
	Combined bool
	// CombinedKey is the combined line's variable. Default DOCKER_OPTS.
	CombinedKey string
	// NoIPMasq leaves --ip-masq out (-m), for old Docker versions.
	NoIPMasq bool
}

// DockerOpts renders Docker daemon options for the node described by env
// (read from subnet.env): the bridge address (--bip), the MTU, --ip-masq
// (false when flannel masquerades, so that Docker does not do it twice)
// and, for an IPv6 subnet, --ipv6 --fixed-cidr-v6. It fails when env has
// no IPv4 subnet or no MTU: Docker's bridge needs both.
func DockerOpts(env flannel.SubnetEnv, o DockerOptions) ([]byte, error) {
	if !env.Subnet.IsValid() {
		return nil, errors.New("docker options: subnet.env has no FLANNEL_SUBNET (IPv4): docker's bridge needs one")
	}
	if env.MTU <= 0 {
		return nil, errors.New("docker options: subnet.env has no FLANNEL_MTU")
	}
	if !o.Individual && !o.Combined {
		o.Individual, o.Combined = true, true
	}
	if o.CombinedKey == "" {
		o.CombinedKey = "DOCKER_OPTS"
	}
	type opt struct{ name, value string }
	opts := []opt{{"BIP", "--bip=" + env.Subnet.String()}}
	if !o.NoIPMasq {
		opts = append(opts, opt{"IPMASQ", "--ip-masq=" + strconv.FormatBool(!env.IPMasq)})
	}
	opts = append(opts, opt{"MTU", "--mtu=" + strconv.Itoa(env.MTU)})
	if env.IPv6Subnet.IsValid() {
		opts = append(opts, opt{"IPV6", "--ipv6 --fixed-cidr-v6=" + env.IPv6Subnet.Masked().String()})
	}
	var b bytes.Buffer
	if o.Individual {
		for _, x := range opts {
			fmt.Fprintf(&b, "DOCKER_OPT_%s=%q\n", x.name, x.value)
		}
	}
	if o.Combined {
		all := ""
		for i, x := range opts {
			if i > 0 {
				all += " "
			}
			all += x.value
		}
		fmt.Fprintf(&b, "%s=%q\n", o.CombinedKey, all)
	}
	return b.Bytes(), nil
}

// DockerOptsCommand is the docker-opts subcommand: it reads subnet.env
// (-f) and writes the Docker options file (-d, "-" for standard output)
// atomically. The flags are mk-docker-opts.sh's. A missing or incomplete
// subnet.env (flanneld not started, or not done yet) is an error that says
// so, and no options file is written: Docker must not come up with a
// bridge of its own choosing.
func DockerOptsCommand(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("flanneld docker-opts", flag.ContinueOnError)
	fs.SetOutput(stderr)
	in := fs.String("f", "/run/flannel/subnet.env", "path to the flannel subnet.env file")
	out := fs.String("d", "/run/docker_opts.env", "path of the Docker options file to write (- for standard output)")
	var o DockerOptions
	fs.BoolVar(&o.Individual, "i", false, "write each Docker option as its own variable, e.g. DOCKER_OPT_MTU")
	fs.BoolVar(&o.Combined, "c", false, "write all Docker options in one variable (-k)")
	fs.StringVar(&o.CombinedKey, "k", "DOCKER_OPTS", "name of the combined variable")
	fs.BoolVar(&o.NoIPMasq, "m", false, "do not write --ip-masq (for older Docker versions)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("docker-opts: unexpected argument %q", fs.Arg(0))
	}
	env, err := readDockerSubnetEnv(*in)
	if err != nil {
		return err
	}
	b, err := DockerOpts(env, o)
	if err != nil {
		return fmt.Errorf("docker-opts: %s: %w", *in, err)
	}
	if *out == "-" {
		_, err := stdout.Write(b)
		return err
	}
	if err := installFile(*out, b, 0o644); err != nil {
		return fmt.Errorf("docker-opts: %w", err)
	}
	return nil
}

// readDockerSubnetEnv reads subnet.env for docker-opts, with every key
// flanneld writes (flannel.ReadCompleteSubnetEnv), and turns the errors of
// running too early into advice: the usual cause is starting Docker (or
// this step) before flanneld has taken its lease.
func readDockerSubnetEnv(path string) (flannel.SubnetEnv, error) {
	env, err := flannel.ReadCompleteSubnetEnv(path)
	switch {
	case err == nil:
		return env, nil
	case errors.Is(err, fs.ErrNotExist):
		return env, fmt.Errorf("docker-opts: %s does not exist: flanneld has not written it yet; "+
			"start flanneld first and run docker-opts, then dockerd, after it: %w", path, err)
	case errors.Is(err, flannel.ErrSubnetEnvIncomplete):
		return env, fmt.Errorf("docker-opts: %w; flanneld has not finished writing it (or another program wrote it): "+
			"run docker-opts after flanneld is up", err)
	default:
		return env, fmt.Errorf("docker-opts: %w", err)
	}
}
