// Package image builds the flanneld container image on this machine, with
// no Docker daemon and no registry, from pinned inputs: the Go binaries
// built here from this repository (flanneld, the flannel CNI plugin), the
// reference CNI plugins built from tools/cni, and nft and iptables with
// the shared libraries and xtables extensions they load, taken from the
// Debian packages installed on the host (their names and versions are
// recorded in the image). The result is a docker-archive tarball that
// `ctr images import` and `docker load` read.
//
// The build is reproducible: every file has mtime 0, uid and gid 0 and a
// sorted place in its layer, the config has no creation time, and the Go
// binaries are built with -trimpath and without VCS stamps, so the same
// inputs give the same digest.
//
// Layout of the image:
//
//	/flanneld                 the daemon (entrypoint)
//	/cni/bin/flannel          the flannel CNI plugin
//	/cni/bin/{bridge,host-local,loopback,portmap}
//	/usr/sbin/nft, /usr/sbin/iptables, ip6tables (nft and legacy), *-save, *-restore
//
// The CNI binaries are in /cni/bin, not /opt/cni/bin, because the
// manifests mount the host's /opt/cni/bin there to install them
// (flanneld install-cni).
package image

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Options describe a build.
type Options struct {
	// Repo is the root of this repository (required).
	Repo string
	// Go is the go command (required).
	Go string
	// CNIPlugins is the directory of the reference CNI plugins (required).
	CNIPlugins string
	// Tag names the image in the tarball (required), e.g.
	// "ghcr.io/flannelkit/flanneld:dev".
	Tag string
	// Out is the docker-archive tarball to write (required).
	Out string
	// Version is stamped into flanneld as its version (optional).
	Version string
}

// Result is what a build made.
type Result struct {
	// Digest is the image's manifest digest; ID its config digest (what
	// ctr and the kubelet show as the image ID).
	Digest, ID v1.Hash
	// Packages are the Debian packages the system files came from,
	// "name=version", sorted.
	Packages []string
}

// Build builds the image and writes the tarball.
func Build(ctx context.Context, o Options) (Result, error) {
	if o.Repo == "" || o.Go == "" || o.CNIPlugins == "" || o.Tag == "" || o.Out == "" {
		return Result{}, fmt.Errorf("image: Repo, Go, CNIPlugins, Tag and Out are required")
	}
	tag, err := name.NewTag(o.Tag)
	if err != nil {
		return Result{}, fmt.Errorf("image: tag %q: %w", o.Tag, err)
	}
	stage, err := os.MkdirTemp("", "flannel-image-")
	if err != nil {
		return Result{}, fmt.Errorf("image: %w", err)
	}
	defer os.RemoveAll(stage)

	sys := newTree()
	pkgs, err := addSystem(sys)
	if err != nil {
		return Result{}, err
	}
	cni := newTree()
	for _, p := range []string{"bridge", "host-local", "loopback", "portmap"} {
		if err := cni.addFile("/cni/bin/"+p, filepath.Join(o.CNIPlugins, p)); err != nil {
			return Result{}, err
		}
	}
	app := newTree()
	for _, b := range []struct{ pkg, out string }{{"./examples/flannel-cni", "/cni/bin/flannel"}, {"./examples/flanneld", "/flanneld"}} {
		bin := filepath.Join(stage, filepath.Base(b.out))
		if err := goBuild(ctx, o, b.pkg, bin); err != nil {
			return Result{}, err
		}
		t := app
		if strings.HasPrefix(b.out, "/cni/") {
			t = cni
		}
		if err := t.addFile(b.out, bin); err != nil {
			return Result{}, err
		}
	}
	app.dir("/tmp", 0o1777)
	app.dir("/run", 0o755)

	img, err := assemble([]*tree{sys, cni, app}, func(c *v1.Config) {
		c.Entrypoint = []string{"/flanneld"}
		c.Labels = map[string]string{
			"org.opencontainers.image.source":   "https://github.com/flannelkit/flannel",
			"org.opencontainers.image.version":  o.Version,
			"io.flannelkit.debian-packages":     strings.Join(pkgs, " "),
			"org.opencontainers.image.licenses": "Apache-2.0",
		}
	})
	if err != nil {
		return Result{}, err
	}
	if err := writeImage(img, tag, o.Out); err != nil {
		return Result{}, err
	}
	r, err := digests(img)
	r.Packages = pkgs
	return r, err
}

// assemble stacks one layer per tree on an empty image and sets the
// config: linux/amd64, PATH, no creation time and no history (both would
// change the digest on every build), then what config adds.
func assemble(trees []*tree, config func(*v1.Config)) (v1.Image, error) {
	img := empty.Image
	for _, t := range trees {
		b, err := t.tar()
		if err != nil {
			return nil, err
		}
		layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
		if err != nil {
			return nil, fmt.Errorf("image: layer: %w", err)
		}
		if img, err = mutate.AppendLayers(img, layer); err != nil {
			return nil, fmt.Errorf("image: %w", err)
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	cf.Created = v1.Time{}
	cf.History = nil
	cf.Config.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	config(&cf.Config)
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	return img, nil
}

func digests(img v1.Image) (Result, error) {
	var r Result
	var err error
	if r.Digest, err = img.Digest(); err != nil {
		return Result{}, fmt.Errorf("image: %w", err)
	}
	if r.ID, err = img.ConfigName(); err != nil {
		return Result{}, fmt.Errorf("image: %w", err)
	}
	return r, nil
}

func goBuild(ctx context.Context, o Options, pkg, out string) error {
	ld := "-s -w -buildid="
	if o.Version != "" {
		ld += " -X main.version=" + o.Version
	}
	cmd := exec.CommandContext(ctx, o.Go, "build", "-trimpath", "-buildvcs=false", "-ldflags="+ld, "-o", out, pkg)
	cmd.Dir = o.Repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("image: go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

// tree is the content of one layer, written in sorted order with fixed
// metadata.
type tree struct {
	entries map[string]*tar.Header
	data    map[string][]byte
}

func newTree() *tree { return &tree{entries: map[string]*tar.Header{}, data: map[string][]byte{}} }

func (t *tree) dir(p string, mode int64) {
	p = strings.TrimPrefix(p, "/")
	t.entries[p] = &tar.Header{Typeflag: tar.TypeDir, Name: p + "/", Mode: mode}
}

func (t *tree) parents(p string) {
	for d := filepath.Dir(p); d != "." && d != "/"; d = filepath.Dir(d) {
		if _, ok := t.entries[d]; !ok {
			t.dir(d, 0o755)
		}
	}
}

func (t *tree) addFile(p, from string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	st, err := os.Stat(from)
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	mode := int64(0o644)
	if st.Mode()&0o111 != 0 {
		mode = 0o755
	}
	p = strings.TrimPrefix(p, "/")
	t.parents(p)
	t.entries[p] = &tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: mode, Size: int64(len(b))}
	t.data[p] = b
	return nil
}

func (t *tree) symlink(p, target string) {
	p = strings.TrimPrefix(p, "/")
	t.parents(p)
	t.entries[p] = &tar.Header{Typeflag: tar.TypeSymlink, Name: p, Linkname: target, Mode: 0o777}
}

func (t *tree) tar() ([]byte, error) {
	names := make([]string, 0, len(t.entries))
	for n := range t.entries {
		names = append(names, n)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	w := tar.NewWriter(&buf)
	for _, n := range names {
		h := *t.entries[n]
		h.Format = tar.FormatPAX
		if err := w.WriteHeader(&h); err != nil {
			return nil, fmt.Errorf("image: tar %s: %w", n, err)
		}
		if d, ok := t.data[n]; ok {
			if _, err := w.Write(d); err != nil {
				return nil, fmt.Errorf("image: tar %s: %w", n, err)
			}
		}
	}
	if err := w.Close(); err != nil {
		return nil, fmt.Errorf("image: %w", err)
	}
	return buf.Bytes(), nil
}
