package kubecluster

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/flannelkit/flannel/internal/netlab"
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

// stateDir records each live cluster's lab and owning process, so that
// Sweep can tell a killed run's leftovers from a running cluster.
func stateDir() string { return "/run/flannelkit-kubecluster" }

func (c *Cluster) recordOwner() error {
	if err := os.MkdirAll(stateDir(), 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(stateDir(), c.Lab.Name), []byte(strconv.Itoa(os.Getpid())), 0o644)
}

func (c *Cluster) forgetOwner() {
	if c.Lab != nil {
		os.Remove(filepath.Join(stateDir(), c.Lab.Name))
	}
}

// Sweep removes what killed runs left behind: for every recorded cluster
// whose process is gone, every process still in its namespaces (containerd
// shims, containers), its cgroups and its namespaces; then, when no
// cluster is left, it restores the sysctls a killed run changed. It is the
// clean-up command's work, and New runs it first.
func Sweep() error {
	entries, _ := os.ReadDir(stateDir())
	for _, e := range entries {
		lab := e.Name()
		b, _ := os.ReadFile(filepath.Join(stateDir(), lab))
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 && syscall.Kill(pid, 0) == nil {
			continue // alive
		}
		killInNamespaces(lab)
		dirs, _ := filepath.Glob("/sys/fs/cgroup/*/kc-" + lab + "-*")
		for _, d := range dirs {
			(&Node{cgroupName: filepath.Base(d)}).removeCgroups()
		}
		os.Remove(filepath.Join(stateDir(), lab))
	}
	_, err := netlab.Sweep()
	if rest, _ := os.ReadDir(stateDir()); len(rest) == 0 {
		err = errors.Join(err, (&Cluster{sysctls: sysctlState()}).restoreSysctls())
	}
	return err
}

// killInNamespaces kills every process in one of the lab's network
// namespaces.
func killInNamespaces(lab string) {
	names, _ := filepath.Glob("/run/netns/" + lab + "-*")
	inodes := map[uint64]bool{}
	for _, n := range names {
		var st syscall.Stat_t
		if syscall.Stat(n, &st) == nil {
			inodes[st.Ino] = true
		}
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st) == nil && inodes[st.Ino] {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}
