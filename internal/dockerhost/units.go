package dockerhost

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Units are the commands of examples/systemd's flanneld.service and
// docker-flannel.conf drop-in, which the harness runs as systemd would:
// flanneld's ExecStart, waiting for its READY=1 (Type=notify), then its
// ExecStartPost (docker-opts), then dockerd with the EnvironmentFile's
// options.
type Units struct {
	// FlanneldBin is the binary named in ExecStart (and in
	// ExecStartPost), replaced by the harness's build.
	FlanneldBin string
	// FlanneldArgs are ExecStart's arguments.
	FlanneldArgs []string
	// FlanneldEnv are the unit's Environment= settings (KEY=value); the
	// operator's EnvironmentFile (/etc/default/flanneld) overrides them.
	FlanneldEnv []string
	// Notify is Type=notify: systemd runs ExecStartPost once the service
	// has sent READY=1 (sd_notify).
	Notify bool
	// PostArgs is ExecStartPost's command line (docker-opts).
	PostArgs []string
	// DockerEnvFile is the drop-in's EnvironmentFile (the docker-opts
	// output).
	DockerEnvFile string
	// DockerdArgs are the drop-in's ExecStart arguments after the binary,
	// with $VARIABLES not yet expanded.
	DockerdArgs []string
}

// ReadUnits reads the two unit files in dir.
func ReadUnits(dir string) (Units, error) {
	var u Units
	fl, err := unitDirectives(filepath.Join(dir, "flanneld.service"))
	if err != nil {
		return u, err
	}
	starts, posts := fl["ExecStart"], fl["ExecStartPost"]
	if len(starts) != 1 || len(posts) != 1 {
		return u, errors.New("flanneld.service: want one ExecStart and one ExecStartPost")
	}
	f := strings.Fields(starts[0])
	u.FlanneldBin, u.FlanneldArgs, u.FlanneldEnv = f[0], f[1:], fl["Environment"]
	types := fl["Type"]
	u.Notify = len(types) > 0 && types[len(types)-1] == "notify"
	u.PostArgs = strings.Fields(posts[0])
	if len(u.PostArgs) < 2 || u.PostArgs[1] != "docker-opts" {
		return u, fmt.Errorf("flanneld.service: ExecStartPost %q: want flanneld docker-opts and its flags", posts[0])
	}
	dr, err := unitDirectives(filepath.Join(dir, "docker-flannel.conf"))
	if err != nil {
		return u, err
	}
	if len(dr["EnvironmentFile"]) != 1 {
		return u, errors.New("docker-flannel.conf: want one EnvironmentFile")
	}
	u.DockerEnvFile = dr["EnvironmentFile"][0]
	ds := dr["ExecStart"]
	if len(ds) == 0 || ds[len(ds)-1] == "" {
		return u, errors.New("docker-flannel.conf: no dockerd ExecStart")
	}
	u.DockerdArgs = strings.Fields(ds[len(ds)-1])[1:]
	return u, nil
}

// unitDirectives returns a unit file's Key=Value lines by key, in order.
func unitDirectives(path string) (map[string][]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string][]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") || strings.HasPrefix(l, "[") {
			continue
		}
		if k, v, ok := strings.Cut(l, "="); ok {
			out[k] = append(out[k], v)
		}
	}
	return out, sc.Err()
}

// readEnvFile reads an EnvironmentFile of KEY="value" lines.
func readEnvFile(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	env := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		if k, v, ok := strings.Cut(l, "="); ok && !strings.HasPrefix(l, "#") {
			env[k] = strings.Trim(v, `"`)
		}
	}
	return env, nil
}

// dockerdArgs expands the drop-in's dockerd arguments as systemd does (an
// unquoted $VAR splits at white space) and swaps what a host shares for the
// node's own: `-H fd://` (socket activation) becomes the node's unix socket,
// and --containerd (the host's containerd) is dropped, so that dockerd
// starts a containerd of its own under its exec-root. extra follows.
func dockerdArgs(tmpl []string, env map[string]string, sock string, extra ...string) ([]string, error) {
	var out []string
	for i := 0; i < len(tmpl); i++ {
		a := tmpl[i]
		switch {
		case strings.HasPrefix(a, "$"):
			v, ok := env[strings.Trim(a[1:], "{}")]
			if !ok {
				return nil, fmt.Errorf("dockerd argument %s: not set in the environment file", a)
			}
			out = append(out, strings.Fields(v)...)
		case a == "-H" && i+1 < len(tmpl) && tmpl[i+1] == "fd://":
			out = append(out, "-H", "unix://"+sock)
			i++
		case strings.HasPrefix(a, "--containerd="):
		default:
			out = append(out, a)
		}
	}
	return append(out, extra...), nil
}
