package kubecluster

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// The host-wide sysctls the kubelet sets.
func kubeletSysctls() []string {
	return []string{"vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"}
}

// sysctlState keeps the host's values from before the first cluster; a
// killed run leaves it behind, and the next New keeps its values (they are
// still the originals) and its Close restores them.
func sysctlState() string { return filepath.Join(os.TempDir(), "flannelkit-kubecluster-sysctls") }

func (c *Cluster) saveSysctls() error {
	c.sysctls = sysctlState()
	if _, err := os.Stat(c.sysctls); err == nil {
		return nil
	}
	var b strings.Builder
	for _, s := range kubeletSysctls() {
		v, err := os.ReadFile(filepath.Join("/proc/sys", s))
		if err != nil {
			return fmt.Errorf("kubecluster: read sysctl %s: %w", s, err)
		}
		fmt.Fprintf(&b, "%s=%s\n", s, strings.TrimSpace(string(v)))
	}
	return os.WriteFile(c.sysctls, []byte(b.String()), 0o644)
}

func (c *Cluster) restoreSysctls() error {
	if c.sysctls == "" {
		return nil
	}
	b, err := os.ReadFile(c.sysctls)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		k, v, ok := strings.Cut(l, "=")
		if ok {
			errs = append(errs, os.WriteFile(filepath.Join("/proc/sys", k), []byte(v), 0o644))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("kubecluster: restore sysctls: %w", err)
	}
	c.sysctls = ""
	return os.Remove(sysctlState())
}

// sweep removes what killed runs left: the cgroups of nodes whose lab
// namespaces are gone (their processes are killed first).
func sweep() {
	dirs, _ := filepath.Glob("/sys/fs/cgroup/*/kc-*")
	for _, d := range dirs {
		name := filepath.Base(d)
		lab, _, ok := strings.Cut(strings.TrimPrefix(name, "kc-"), "-")
		if !ok {
			continue
		}
		if _, err := os.Stat(filepath.Join("/run/netns", lab+"-rt")); err == nil {
			continue // a live cluster's
		}
		(&Node{cgroupName: name}).removeCgroups()
	}
}
