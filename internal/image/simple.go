package image

import (
	"fmt"
	"sort"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Simple describes a one-layer image of static files, such as the pause,
// busybox and CoreDNS images of the test cluster.
type Simple struct {
	// Tag names the image (required).
	Tag string
	// Files maps paths in the image to host files (required).
	Files map[string]string
	// Links maps paths in the image to symlink targets.
	Links map[string]string
	// Entrypoint and Cmd of the image.
	Entrypoint, Cmd []string
	// Dirs are extra directories (mode 0755; /tmp is always there, 1777).
	Dirs []string
}

// BuildSimple writes s as a docker-archive tarball to out, reproducibly
// (see the package doc), and returns its digests.
func BuildSimple(s Simple, out string) (Result, error) {
	tag, err := name.NewTag(s.Tag)
	if err != nil {
		return Result{}, fmt.Errorf("image: tag %q: %w", s.Tag, err)
	}
	t := newTree()
	paths := make([]string, 0, len(s.Files))
	for p := range s.Files {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		if err := t.addFile(p, s.Files[p]); err != nil {
			return Result{}, err
		}
	}
	for l, target := range s.Links {
		t.symlink(l, target)
	}
	for _, d := range s.Dirs {
		t.dir(d, 0o755)
	}
	t.dir("/tmp", 0o1777)
	img, err := assemble([]*tree{t}, func(c *v1.Config) { c.Entrypoint, c.Cmd = s.Entrypoint, s.Cmd })
	if err != nil {
		return Result{}, err
	}
	if err := writeImage(img, tag, out); err != nil {
		return Result{}, err
	}
	return digests(img)
}
