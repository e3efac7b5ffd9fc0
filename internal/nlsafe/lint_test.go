package nlsafe

import (
	"bufio"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/internal/testenv"
)

// forbidden reads the forbidigo patterns of the repository's .golangci.yml
// for the package pkg (the text of its pkg: line).
func forbidden(t *testing.T, pkg string) []*regexp.Regexp {
	t.Helper()
	f, err := os.Open("../../.golangci.yml")
	require.NoError(t, err)
	defer f.Close()
	var out []*regexp.Regexp
	var pattern string
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if p, ok := strings.CutPrefix(line, "- pattern: "); ok {
			pattern = p
			continue
		}
		if p, ok := strings.CutPrefix(line, "pkg: "); ok && pattern != "" {
			if p == pkg {
				out = append(out, regexp.MustCompile(pattern))
			}
			pattern = ""
		}
	}
	require.NoError(t, sc.Err())
	require.NotEmpty(t, out, "no forbidigo patterns for %s", pkg)
	return out
}

func matchesAny(res []*regexp.Regexp, s string) bool {
	for _, re := range res {
		if re.MatchString(s) {
			return true
		}
	}
	return false
}

// netlinkAPI parses the netlink module in use and returns its exported
// package-level functions that go through the package handle, and the
// methods of *Handle documented to return ErrDumpInterrupted.
func netlinkAPI(t *testing.T) (pkgFuncs, dumpMethods []string) {
	t.Helper()
	_, err := exec.LookPath("go")
	testenv.Require(t, err == nil, "the go command (to find the netlink module's source)")
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/vishvananda/netlink").Output()
	require.NoError(t, err)
	dir := strings.TrimSpace(string(out))
	files, err := filepath.Glob(filepath.Join(dir, "*_linux.go"))
	require.NoError(t, err)
	require.NotEmpty(t, files)
	fset := token.NewFileSet()
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, name, nil, parser.ParseComments)
		require.NoError(t, err)
		for _, d := range af.Decls {
			fd, ok := d.(*ast.FuncDecl)
			if !ok || !fd.Name.IsExported() || fd.Body == nil {
				continue
			}
			if fd.Recv == nil && usesIdent(fd.Body, "pkgHandle") {
				pkgFuncs = append(pkgFuncs, fd.Name.Name)
			}
			if fd.Recv != nil && isHandleRecv(fd.Recv) && fd.Doc != nil && strings.Contains(fd.Doc.Text(), "ErrDumpInterrupted") {
				dumpMethods = append(dumpMethods, fd.Name.Name)
			}
		}
	}
	return pkgFuncs, dumpMethods
}

func usesIdent(n ast.Node, name string) bool {
	found := false
	ast.Inspect(n, func(n ast.Node) bool {
		if id, ok := n.(*ast.Ident); ok && id.Name == name {
			found = true
		}
		return !found
	})
	return found
}

func isHandleRecv(recv *ast.FieldList) bool {
	se, ok := recv.List[0].Type.(*ast.StarExpr)
	if !ok {
		return false
	}
	id, ok := se.X.(*ast.Ident)
	return ok && id.Name == "Handle"
}

// ownMethods lists the methods this package declares on Handle.
func ownMethods(t *testing.T) map[string]bool {
	t.Helper()
	files, err := filepath.Glob("*.go")
	require.NoError(t, err)
	out := map[string]bool{}
	fset := token.NewFileSet()
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, name, nil, 0)
		require.NoError(t, err)
		for _, d := range af.Decls {
			if fd, ok := d.(*ast.FuncDecl); ok && fd.Recv != nil {
				if id, ok := fd.Recv.List[0].Type.(*ast.Ident); ok && id.Name == "Handle" {
					out[fd.Name.Name] = true
				}
			}
		}
	}
	return out
}

// TestLintBansEveryPackageHandleCall keeps .golangci.yml complete against
// the netlink module in go.mod: every package-level function that acts on
// the calling thread's namespace and every unwrapped dump is banned, and
// none of the retrying methods of Handle is.
func TestLintBansEveryPackageHandleCall(t *testing.T) {
	pkgFuncs, dumpMethods := netlinkAPI(t)
	require.NotEmpty(t, pkgFuncs)
	require.NotEmpty(t, dumpMethods)
	netlinkBans := forbidden(t, `^github\.com/vishvananda/netlink$`)
	for _, fn := range pkgFuncs {
		assert.True(t, matchesAny(netlinkBans, "netlink."+fn), "netlink.%s (package handle) is not banned", fn)
	}
	// Lookups that dump only on kernels without IFLA_IFNAME (see .golangci.yml).
	notDumps := map[string]bool{"LinkByName": true, "LinkByAlias": true}
	own := ownMethods(t)
	nlsafeBans := forbidden(t, `^github\.com/flannelkit/flannel/internal/nlsafe$`)
	for _, m := range dumpMethods {
		if notDumps[m] {
			continue
		}
		assert.True(t, matchesAny(netlinkBans, "netlink.Handle."+m), "dump netlink.Handle.%s is not banned", m)
		if own[m] {
			assert.False(t, matchesAny(nlsafeBans, "nlsafe.Handle."+m), "nlsafe.Handle.%s retries but is banned", m)
		} else {
			assert.True(t, matchesAny(nlsafeBans, "nlsafe.Handle."+m), "nlsafe.Handle.%s is the embedded dump without retry but not banned", m)
		}
	}
	for _, ok := range []string{"NewHandleAt", "NewLinkAttrs", "ParseAddr", "ParseIPNet", "NewIPNet"} {
		assert.False(t, matchesAny(netlinkBans, "netlink."+ok), "netlink.%s names no namespace and is banned", ok)
	}
}
