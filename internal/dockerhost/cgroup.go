package dockerhost

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const cgroupRoot = "/sys/fs/cgroup"

// hierarchies are the mounted cgroup hierarchies: the root itself on a
// cgroup v2 host, else every directory of it that is one (v1, hybrid).
func hierarchies() []string {
	if _, err := os.Stat(filepath.Join(cgroupRoot, "cgroup.procs")); err == nil {
		return []string{cgroupRoot}
	}
	var out []string
	entries, _ := os.ReadDir(cgroupRoot)
	for _, e := range entries {
		d := filepath.Join(cgroupRoot, e.Name())
		if _, err := os.Stat(filepath.Join(d, "cgroup.procs")); err == nil && e.IsDir() {
			out = append(out, d)
		}
	}
	return out
}

// makeCgroup creates cgroup name in every hierarchy (cpuset's cpus and
// mems copied from the root, which a new v1 cpuset lacks) and returns the
// cgroup.procs files to join it.
func makeCgroup(name string) ([]string, error) {
	var procs []string
	for _, h := range hierarchies() {
		d := filepath.Join(h, name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
		if filepath.Base(h) == "cpuset" {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				v, err := os.ReadFile(filepath.Join(h, f))
				if err == nil {
					err = os.WriteFile(filepath.Join(d, f), v, 0o644)
				}
				if err != nil {
					return nil, err
				}
			}
		}
		procs = append(procs, filepath.Join(d, "cgroup.procs"))
	}
	return procs, nil
}

// killCgroup kills every process in cgroup name and its children, in
// every hierarchy, and removes the cgroups, deepest first.
func killCgroup(name string) error {
	var errs []error
	for _, h := range hierarchies() {
		root := filepath.Join(h, name)
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for range 50 {
			if killIn(dirs) == 0 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		for i := len(dirs) - 1; i >= 0; i-- {
			var err error
			for range 100 {
				if err = os.Remove(dirs[i]); err == nil || errors.Is(err, os.ErrNotExist) {
					err = nil
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			if err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// killIn sends SIGKILL to the processes of dirs and returns their number.
func killIn(dirs []string) int {
	n := 0
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				n++
			}
		}
	}
	return n
}
