package dockerhost

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// buildImage writes the rootfs tarball of Image: busybox-static with its
// applet links, and Options.Files.
func (c *Cluster) buildImage() error {
	const bb = "/bin/busybox"
	out, err := exec.Command(bb, "--list-full").Output()
	if err != nil {
		return fmt.Errorf("dockerhost: busybox --list-full: %w (Debian package busybox-static)", err)
	}
	c.imageTar = filepath.Join(c.root, "image.tar")
	f, err := os.Create(c.imageTar)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	for _, d := range []string{"bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "proc", "sys", "dev"} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755}); err != nil {
			return err
		}
	}
	files := map[string]string{bb: bb}
	for k, v := range c.opts.Files {
		files[k] = v
	}
	for dst, src := range files {
		if err := addFile(tw, strings.TrimPrefix(dst, "/"), src); err != nil {
			return err
		}
	}
	for _, l := range strings.Fields(string(out)) {
		if l == "bin/busybox" {
			continue
		}
		if _, ok := files["/"+l]; ok {
			continue
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: l, Linkname: "/bin/busybox", Mode: 0o777}); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	return f.Close()
}

func addFile(tw *tar.Writer, name, src string) error {
	f, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("dockerhost: image file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o755, Size: st.Size()}); err != nil {
		return err
	}
	_, err = io.Copy(tw, f)
	return err
}

// importImage imports the rootfs as Image into h's dockerd.
func (c *Cluster) importImage(ctx context.Context, h *Host) error {
	f, err := os.Open(c.imageTar)
	if err != nil {
		return err
	}
	defer f.Close()
	cmd := c.cli(ctx, h, "import", "-", Image)
	cmd.Stdin = f
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("host %s: docker import: %w: %s", h.Name, err, out)
	}
	return nil
}

// cli is a docker CLI command for h's dockerd, with a configuration
// directory of its own and none of the caller's DOCKER_* settings.
func (c *Cluster) cli(ctx context.Context, h *Host, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, c.dockerCLI, append([]string{"-H", "unix://" + h.Socket()}, args...)...)
	cmd.Env = []string{servicePath, "DOCKER_CONFIG=" + filepath.Join(c.root, "docker-cli")}
	return cmd
}
