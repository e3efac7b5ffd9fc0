package vmtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// pack writes the initramfs.
func pack(tools Tools, opts Options, bin string, cmds map[string]string, stage, out string) error {
	files, modDir, err := stageModules(tools, opts, stage)
	if err != nil {
		return err
	}
	files["bin/busybox"] = tools.Busybox
	files["test.bin"] = bin
	for ap, hp := range cmds {
		files[ap] = hp
	}
	for ap, hp := range opts.Files {
		files[strings.TrimPrefix(ap, "/")] = hp
	}
	timeout := opts.Timeout - 30*time.Second
	if timeout < time.Minute {
		timeout = opts.Timeout
	}
	v := ""
	if opts.Verbose {
		v = "-test.v"
	}
	script := fmt.Sprintf(initScript, strings.Join(opts.Modules, " "), v, shellQuote(opts.Run), timeout, exitMarker)
	return writeArchive(out, modDir, files, script)
}

// stageModules copies opts.Modules with their dependencies and the
// kernel's module lists into stage, runs depmod there, and returns the
// archive's files so far (archive path -> host path) and the modules
// directory in the archive.
func stageModules(tools Tools, opts Options, stage string) (map[string]string, string, error) {
	mods, err := moduleClosure(tools.Version, opts.Modules)
	if err != nil {
		return nil, "", err
	}
	modDir := filepath.Join("lib", "modules", tools.Version)
	files := map[string]string{}
	for _, m := range mods {
		files[filepath.Join(modDir, m)] = filepath.Join("/lib/modules", tools.Version, m)
	}
	for _, f := range []string{"modules.builtin", "modules.builtin.modinfo", "modules.order"} {
		files[filepath.Join(modDir, f)] = filepath.Join("/lib/modules", tools.Version, f)
	}
	// depmod -b needs a tree: copy the modules and builtin lists there.
	for ap, hp := range files {
		if err := copyFile(hp, filepath.Join(stage, ap)); err != nil {
			return nil, "", fmt.Errorf("vmtest: %w", err)
		}
	}
	if out, err := exec.Command(tools.Depmod, "-b", stage, tools.Version).CombinedOutput(); err != nil {
		return nil, "", fmt.Errorf("vmtest: depmod -b %s: %w\n%s", stage, err, out)
	}
	gen, err := filepath.Glob(filepath.Join(stage, modDir, "modules.*"))
	if err != nil {
		return nil, "", fmt.Errorf("vmtest: %w", err)
	}
	for _, g := range gen {
		files[filepath.Join(modDir, filepath.Base(g))] = g
	}
	return files, modDir, nil
}

// writeArchive writes the initramfs out: the base directories, every
// parent directory of files, the files (sorted, so that the same inputs
// give the same archive), the init script and modprobe's link to busybox.
func writeArchive(out, modDir string, files map[string]string, script string) error {
	f, err := os.Create(out)
	if err != nil {
		return fmt.Errorf("vmtest: %w", err)
	}
	w := newCpio(f)
	for _, d := range []string{"bin", "sbin", "dev", "proc", "sys", "run", "tmp", "etc", "lib", "lib/modules", modDir} {
		w.dir(d)
	}
	paths := make([]string, 0, len(files))
	for ap := range files {
		paths = append(paths, ap)
	}
	sort.Strings(paths)
	dirs := map[string]bool{}
	for _, ap := range paths {
		for d := filepath.Dir(ap); d != "." && !dirs[d]; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	dl := make([]string, 0, len(dirs))
	for d := range dirs {
		dl = append(dl, d)
	}
	sort.Strings(dl)
	for _, d := range dl {
		w.dir(d)
	}
	for _, ap := range paths {
		if err := w.fileFrom(ap, files[ap], 0o755); err != nil {
			f.Close()
			return fmt.Errorf("vmtest: pack %s: %w", ap, err)
		}
	}
	w.file("init", []byte(script), 0o755)
	w.symlink("sbin/modprobe", "/bin/busybox")
	if err := errors.Join(w.close(), f.Close()); err != nil {
		return fmt.Errorf("vmtest: write initramfs: %w", err)
	}
	return nil
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// initScript: %s modules, %s -test.v, %s run pattern, %v timeout, %s marker.
const initScript = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
echo /sbin/modprobe > /proc/sys/kernel/modprobe
echo VMTEST-BOOTED
for m in %s; do modprobe "$m" || echo "vmtest: modprobe $m failed"; done
ip link set lo up
cat /proc/modules | cut -d" " -f1 | tr "\n" " "; echo
cd /tmp
FLANNEL_VMTEST=1 FLANNEL_STRICT=1 HOME=/tmp /test.bin %s -test.run %s -test.timeout %v -test.count 1
echo "%s $?"
sync
poweroff -f
`

// moduleClosure returns the modules.dep paths of names and their
// dependencies. Built-in modules are skipped.
func moduleClosure(version string, names []string) ([]string, error) {
	base := filepath.Join("/lib/modules", version)
	dep, err := os.ReadFile(filepath.Join(base, "modules.dep"))
	if err != nil {
		return nil, fmt.Errorf("vmtest: %w", err)
	}
	builtin, _ := os.ReadFile(filepath.Join(base, "modules.builtin"))
	norm := func(s string) string {
		s = filepath.Base(s)
		s = strings.SplitN(s, ".ko", 2)[0]
		return strings.ReplaceAll(s, "-", "_")
	}
	isBuiltin := map[string]bool{}
	for _, l := range strings.Split(string(builtin), "\n") {
		if l != "" {
			isBuiltin[norm(l)] = true
		}
	}
	deps := map[string][]string{}
	path := map[string]string{}
	for _, l := range strings.Split(string(dep), "\n") {
		mod, rest, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		path[norm(mod)] = mod
		deps[mod] = strings.Fields(rest)
	}
	seen := map[string]bool{}
	var out []string
	var add func(p string)
	add = func(p string) {
		if seen[p] {
			return
		}
		seen[p] = true
		out = append(out, p)
		for _, d := range deps[p] {
			add(d)
		}
	}
	for _, n := range names {
		p, ok := path[norm(n)]
		if !ok {
			if isBuiltin[norm(n)] {
				continue
			}
			return nil, fmt.Errorf("vmtest: kernel %s has no module %s", version, n)
		}
		add(p)
	}
	sort.Strings(out)
	return out, nil
}

func copyFile(from, to string) error {
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		return err
	}
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, b, 0o644)
}
