package daemon

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"

	"github.com/containernetworking/cni/libcni"
)

// InstallCNIOptions say what `flanneld install-cni` installs.
type InstallCNIOptions struct {
	// From is the directory of plugin binaries to install (the image's
	// /cni/bin); every regular file in it is installed. Empty: none.
	From string
	// BinDir is where they go (the host's /opt/cni/bin, mounted).
	BinDir string
	// Conf is a conflist to install (the ConfigMap's cni-conf.json);
	// empty: none. It is checked with libcni before it is installed.
	Conf string
	// ConfFile is the conflist's destination, e.g.
	// /etc/cni/net.d/10-flannel.conflist.
	ConfFile string
}

// InstallCNI copies the plugin binaries and the conflist into place, each
// atomically (a temporary file in the destination directory, renamed), so
// a runtime running a plugin or reading the config meanwhile sees the old
// file or the new one, never part of one. It is what the manifests' init
// containers run, and safe to run again.
func InstallCNI(o InstallCNIOptions) ([]string, error) {
	var done []string
	if o.From != "" {
		entries, err := os.ReadDir(o.From)
		if err != nil {
			return done, fmt.Errorf("install-cni: %w", err)
		}
		var names []string
		for _, e := range entries {
			if e.Type().IsRegular() {
				names = append(names, e.Name())
			}
		}
		sort.Strings(names)
		if len(names) == 0 {
			return done, fmt.Errorf("install-cni: no plugin binaries in %s", o.From)
		}
		for _, n := range names {
			b, err := os.ReadFile(filepath.Join(o.From, n))
			if err != nil {
				return done, fmt.Errorf("install-cni: %w", err)
			}
			dst := filepath.Join(o.BinDir, n)
			if err := installFile(dst, b, 0o755); err != nil {
				return done, fmt.Errorf("install-cni: %w", err)
			}
			done = append(done, dst)
		}
	}
	if o.Conf != "" {
		b, err := os.ReadFile(o.Conf)
		if err != nil {
			return done, fmt.Errorf("install-cni: %w", err)
		}
		list, err := libcni.ConfListFromBytes(b)
		if err != nil {
			return done, fmt.Errorf("install-cni: %s is not a CNI config list: %w", o.Conf, err)
		}
		if len(list.Plugins) == 0 {
			return done, fmt.Errorf("install-cni: %s lists no plugins", o.Conf)
		}
		if err := installFile(o.ConfFile, b, 0o644); err != nil {
			return done, fmt.Errorf("install-cni: %w", err)
		}
		done = append(done, o.ConfFile)
	}
	return done, nil
}

// installFile writes b to dst atomically with mode: a temporary file in
// dst's directory (created if needed), synced and renamed over dst; on
// failure nothing is left and dst is unchanged.
func installFile(dst string, b []byte, mode os.FileMode) error {
	dir := filepath.Dir(dst)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(dst)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, werr := f.Write(b)
	if werr == nil {
		werr = f.Chmod(mode)
	}
	if werr == nil {
		werr = f.Sync()
	}
	if err := errors.Join(werr, f.Close()); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", dst, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// InstallCNICommand is `flanneld install-cni [flags]`.
func InstallCNICommand(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("install-cni", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o InstallCNIOptions
	fs.StringVar(&o.From, "plugins", "/cni/bin", "directory of the plugin binaries to install (empty: none)")
	fs.StringVar(&o.BinDir, "cni-bin-dir", "/opt/cni/bin", "where the plugin binaries go")
	fs.StringVar(&o.Conf, "cni-conf", "", "CNI config list to install (empty: none)")
	fs.StringVar(&o.ConfFile, "cni-conf-file", "/etc/cni/net.d/10-flannel.conflist", "where the config list goes")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("install-cni: unexpected arguments %v", fs.Args())
	}
	done, err := InstallCNI(o)
	for _, d := range done {
		b, _ := json.Marshal(d)
		fmt.Fprintf(stdout, "installed %s\n", b)
	}
	return err
}
