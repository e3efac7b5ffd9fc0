package image

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// System binaries packed with their libraries, and the names linked to
// them, as Debian's alternatives resolve them.
func systemBinaries() []string {
	return []string{"/usr/sbin/nft", "/usr/sbin/xtables-nft-multi", "/usr/sbin/xtables-legacy-multi"}
}

func systemLinks() map[string]string {
	links := map[string]string{}
	for _, t := range []string{"iptables", "ip6tables"} {
		for _, suffix := range []string{"", "-save", "-restore"} {
			links["/usr/sbin/"+t+suffix] = "xtables-nft-multi"
			links["/usr/sbin/"+t+"-nft"+suffix] = "xtables-nft-multi"
			links["/usr/sbin/"+t+"-legacy"+suffix] = "xtables-legacy-multi"
		}
	}
	// Debian's merged /usr.
	for _, d := range []string{"bin", "sbin", "lib", "lib64"} {
		links["/"+d] = "usr/" + d
	}
	return links
}

// addSystem adds nft and iptables, every shared library they and the
// xtables extensions need (ldd), the extensions themselves (loaded with
// dlopen, so ldd of the binaries does not list them) and the few files
// in /etc they read; it returns the Debian packages the files came from.
func addSystem(t *tree) ([]string, error) {
	files := map[string]bool{}
	for _, b := range systemBinaries() {
		files[b] = true
	}
	ext, _ := filepath.Glob("/usr/lib/x86_64-linux-gnu/xtables/*.so")
	if len(ext) == 0 {
		return nil, fmt.Errorf("image: no xtables extensions in /usr/lib/x86_64-linux-gnu/xtables (Debian package iptables)")
	}
	for _, e := range ext {
		files[e] = true
	}
	for f := range clone(files) {
		libs, err := ldd(f)
		if err != nil {
			return nil, err
		}
		for _, l := range libs {
			files[l] = true
		}
	}
	for _, f := range []string{"/etc/protocols", "/etc/services", "/etc/ethertypes"} {
		if _, err := os.Stat(f); err == nil {
			files[f] = true
		}
	}
	var paths []string
	for f := range files {
		paths = append(paths, f)
	}
	sort.Strings(paths)
	for _, f := range paths {
		real, err := filepath.EvalSymlinks(f)
		if err != nil {
			return nil, fmt.Errorf("image: %w", err)
		}
		dst := usrPath(f)
		if err := t.addFile(dst, real); err != nil {
			return nil, err
		}
		// The loader and libraries are found by their soname, which is
		// often a link to the versioned file: keep the name asked for.
		if r := usrPath(real); r != dst && !strings.HasPrefix(f, "/etc/") {
			if err := t.addFile(r, real); err != nil {
				return nil, err
			}
		}
	}
	for l, target := range systemLinks() {
		t.symlink(l, target)
	}
	return debianPackages(paths)
}

func clone(m map[string]bool) map[string]bool {
	c := make(map[string]bool, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// usrPath maps a path through Debian's merged /usr (/lib/x -> /usr/lib/x).
func usrPath(p string) string {
	for _, d := range []string{"/bin/", "/sbin/", "/lib/", "/lib64/"} {
		if strings.HasPrefix(p, d) {
			return "/usr" + p
		}
	}
	return p
}

// ldd lists the shared libraries a binary or library loads, the loader
// included.
func ldd(path string) ([]string, error) {
	out, err := exec.Command("ldd", path).CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "not a dynamic executable") {
			return nil, nil
		}
		return nil, fmt.Errorf("image: ldd %s: %w\n%s", path, err, out)
	}
	var libs []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0])
		case strings.Contains(line, "not found"):
			return nil, fmt.Errorf("image: %s: %s", path, strings.TrimSpace(line))
		}
	}
	return libs, nil
}

// debianPackages returns "package:arch=version" for the packages owning
// paths; a path no package owns is an error. dpkg records the
// pre-merged-/usr path of some files, so both spellings are asked.
func debianPackages(paths []string) ([]string, error) {
	owner := func(ps []string) map[string]string {
		out, _ := exec.Command("dpkg", append([]string{"-S"}, ps...)...).Output() // exit 1 when any is unknown
		m := map[string]string{}
		for _, line := range strings.Split(string(out), "\n") {
			pkgs, path, ok := strings.Cut(line, ": ")
			if ok {
				m[strings.TrimSpace(path)] = pkgs
			}
		}
		return m
	}
	found := owner(paths)
	set := map[string]bool{}
	var retry []string
	alt := map[string]string{}
	for _, p := range paths {
		if pk, ok := found[p]; ok {
			for _, x := range strings.Split(pk, ", ") {
				set[x] = true
			}
			continue
		}
		a := strings.TrimPrefix(p, "/usr")
		if a == p {
			a = usrPath(p)
		}
		alt[a] = p
		retry = append(retry, a)
	}
	var unowned []string
	if len(retry) > 0 {
		found = owner(retry)
		for _, a := range retry {
			pk, ok := found[a]
			if !ok {
				unowned = append(unowned, alt[a])
				continue
			}
			for _, x := range strings.Split(pk, ", ") {
				set[x] = true
			}
		}
	}
	if len(unowned) > 0 {
		return nil, fmt.Errorf("image: no Debian package owns %v: the system files must come from Debian packages", unowned)
	}
	var names []string
	for p := range set {
		names = append(names, p)
	}
	sort.Strings(names)
	q := append([]string{"-W", "-f=${Package}:${Architecture}=${Version}\n"}, names...)
	vout, err := exec.Command("dpkg-query", q...).Output()
	if err != nil {
		return nil, fmt.Errorf("image: dpkg-query: %w", err)
	}
	var res []string
	for _, l := range strings.Split(strings.TrimSpace(string(vout)), "\n") {
		if l != "" {
			res = append(res, l)
		}
	}
	sort.Strings(res)
	return res, nil
}
