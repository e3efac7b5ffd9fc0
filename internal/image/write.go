package image

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// OCISuffix marks an output path that gets an OCI image layout archive
// instead of a docker-archive. containerd (`ctr images import`) keeps the
// manifest digest of an OCI archive, so an image imported that way can be
// referenced by the digest Build reports; a docker-archive is converted on
// import and gets another. The archive names the image twice, by tag and
// by repository@digest, so a pod spec pinned by digest finds it.
const OCISuffix = ".oci.tar"

func writeImage(img v1.Image, tag name.Tag, out string) error {
	if !strings.HasSuffix(out, OCISuffix) {
		if err := tarball.WriteToFile(out, tag, img); err != nil {
			return fmt.Errorf("image: write %s: %w", out, err)
		}
		return nil
	}
	dir, err := os.MkdirTemp("", "oci-layout-")
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": tag.String(),
		"io.containerd.image.name":          tag.String(),
	})); err != nil {
		return fmt.Errorf("image: %w", err)
	}
	// Also by digest, as a pull by digest records it, so that a pod spec
	// can pin repo@sha256:... and the runtime finds it locally.
	digest, err := img.Digest()
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"io.containerd.image.name": tag.Context().Name() + "@" + digest.String(),
	})); err != nil {
		return fmt.Errorf("image: %w", err)
	}
	var files []string
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			files = append(files, path)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("image: %w", err)
	}
	sort.Strings(files)
	var buf bytes.Buffer
	w := tar.NewWriter(&buf)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("image: %w", err)
		}
		rel, _ := filepath.Rel(dir, f)
		if err := w.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: rel, Mode: 0o644, Size: int64(len(b)), Format: tar.FormatPAX}); err != nil {
			return fmt.Errorf("image: %w", err)
		}
		if _, err := w.Write(b); err != nil {
			return fmt.Errorf("image: %w", err)
		}
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("image: %w", err)
	}
	return os.WriteFile(out, buf.Bytes(), 0o644)
}
