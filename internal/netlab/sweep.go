package netlab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"syscall"
)

// labNSName matches the namespaces Labs create: "fl" + 6 hex digits, "-", rest.
var labNSName = regexp.MustCompile(`^(fl[0-9a-f]{6})-[A-Za-z0-9._-]+$`)

// Sweep deletes the namespaces of Labs whose process died without Close (a
// test binary killed by its -timeout skips every cleanup). A Lab counts as
// orphaned when no process on the machine holds any of its namespaces,
// neither as an open fd nor as a thread's namespace: a live Lab keeps an fd
// to every namespace it owns until Close. Sweep returns the names it
// removed; it is safe to run while other Labs are in use.
func Sweep() ([]string, error) {
	entries, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("netlab sweep: %w", err)
	}
	groups := map[string][]string{} // lab prefix -> namespace names
	for _, e := range entries {
		if m := labNSName.FindStringSubmatch(e.Name()); m != nil {
			groups[m[1]] = append(groups[m[1]], e.Name())
		}
	}
	if len(groups) == 0 {
		return nil, nil
	}
	inUse, err := referencedNetNS()
	if err != nil {
		return nil, fmt.Errorf("netlab sweep: %w", err)
	}
	var removed []string
	var errs []error
	for _, names := range groups {
		// A name that vanished meanwhile is being removed by someone
		// else (a Close, another process's Sweep); the group is an orphan
		// when none of the rest is in use.
		orphan := true
		for _, name := range names {
			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join(netnsDir, name), &st); err == nil && inUse[st.Ino] {
				orphan = false
				break
			}
		}
		if !orphan {
			continue
		}
		for _, name := range names {
			if err := deleteNamedNS(name); err != nil {
				errs = append(errs, err)
				continue
			}
			removed = append(removed, name)
		}
	}
	sort.Strings(removed)
	if err := errors.Join(errs...); err != nil {
		return removed, fmt.Errorf("netlab sweep: %w", err)
	}
	return removed, nil
}

// referencedNetNS returns the inodes of every network namespace some process
// holds open (fd) or runs in (any thread). Processes that vanish meanwhile
// are skipped.
func referencedNetNS() (map[uint64]bool, error) {
	procs, err := filepath.Glob("/proc/[0-9]*")
	if err != nil {
		return nil, err
	}
	inUse := map[uint64]bool{}
	add := func(link string) {
		var st syscall.Stat_t
		if syscall.Stat(link, &st) == nil {
			inUse[st.Ino] = true
		}
	}
	for _, p := range procs {
		fds, _ := os.ReadDir(filepath.Join(p, "fd"))
		for _, fd := range fds {
			link := filepath.Join(p, "fd", fd.Name())
			if target, err := os.Readlink(link); err == nil && len(target) > 4 && target[:4] == "net:" {
				add(link)
			}
		}
		tasks, _ := os.ReadDir(filepath.Join(p, "task"))
		for _, t := range tasks {
			add(filepath.Join(p, "task", t.Name(), "ns", "net"))
		}
	}
	return inUse, nil
}
