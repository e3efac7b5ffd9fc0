package dockerhost

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

// cgroupPrefix starts every host's cgroup name: <prefix><lab>-<node>.
const cgroupPrefix = "flannelkit-dh-"

// writeOwner records the running process (pid and start time, so that a
// reused pid does not count) as the owner of a cluster's state directory.
func writeOwner(dir string) error {
	st, err := procStart(os.Getpid())
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "owner"), []byte(fmt.Sprintf("%d %s\n", os.Getpid(), st)), 0o644)
}

// procStart is a process's start time in clock ticks since boot
// (/proc/<pid>/stat field 22).
func procStart(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndex(s, ")")+1:])
	if len(f) < 20 {
		return "", fmt.Errorf("/proc/%d/stat: short", pid)
	}
	return f[19], nil
}

// ownerAlive says whether the process recorded in dir/owner still runs.
func ownerAlive(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, "owner"))
	if err != nil {
		return false
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return false
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil || syscall.Kill(pid, 0) != nil {
		return false
	}
	st, err := procStart(pid)
	return err == nil && st == f[1]
}

// Sweep removes what clusters of dead processes left (a test binary
// killed by its -timeout skips every cleanup): the processes in their
// hosts' cgroups (daemons, shims, containers) and the cgroups, their
// state directories, then the lab namespaces (netlab.Sweep, which only
// removes namespaces no process holds). Live clusters are left alone.
func Sweep() error {
	live := map[string]bool{}
	var errs []error
	entries, _ := os.ReadDir(StateDir)
	for _, e := range entries {
		dir := filepath.Join(StateDir, e.Name())
		if ownerAlive(dir) {
			live[e.Name()] = true
			continue
		}
		errs = append(errs, killCgroups(e.Name()))
		errs = append(errs, os.RemoveAll(dir))
	}
	// Cgroups without a state directory (a run killed in between).
	for _, h := range hierarchies() {
		ds, _ := filepath.Glob(filepath.Join(h, cgroupPrefix+"*"))
		for _, d := range ds {
			lab, _, _ := strings.Cut(strings.TrimPrefix(filepath.Base(d), cgroupPrefix), "-")
			if !live[lab] {
				errs = append(errs, killCgroup(filepath.Base(d)))
			}
		}
	}
	_, err := netlab.Sweep()
	errs = append(errs, err)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("dockerhost sweep: %w", err)
	}
	return nil
}

// killCgroups kills the cgroups of every host of lab.
func killCgroups(lab string) error {
	var errs []error
	seen := map[string]bool{}
	for _, h := range hierarchies() {
		ds, _ := filepath.Glob(filepath.Join(h, cgroupPrefix+lab+"-*"))
		for _, d := range ds {
			if name := filepath.Base(d); !seen[name] {
				seen[name] = true
				errs = append(errs, killCgroup(name))
			}
		}
	}
	return errors.Join(errs...)
}
