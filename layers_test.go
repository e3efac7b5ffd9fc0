package flannel

import (
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const modulePath = "github.com/flannelkit/flannel"

// layerOf names the layer of a package (its path inside the module) as
// doc.go lists them, or "" for a package doc.go does not place yet.
func layerOf(pkg string) string {
	switch pkg {
	case "lease":
		return "lease"
	case ".":
		return "flannel"
	case "backend":
		return "backend"
	case "hostgw", "vxlan", "ipsec", "wireguard", "ipip", "extension", "alloc":
		return "dataplane"
	case "kubestore", "etcdstore", "memstore":
		return "store"
	case "rules", "cni":
		return pkg
	case "internal/daemon":
		return "daemon"
	case "internal/netlab", "internal/etcdtest", "internal/kubetest", "internal/vmtest",
		"internal/cnilab", "internal/testenv", "internal/kubecluster", "internal/image",
		"internal/storetest", "internal/backendtest", "internal/e2e", "internal/dockerhost", "internal/vmlab":
		return "harness"
	case "deploy":
		return "main"
	}
	switch {
	case strings.HasPrefix(pkg, "examples/"), strings.HasPrefix(pkg, "hack/"),
		strings.HasPrefix(pkg, "internal/kubecluster/"):
		return "main"
	case strings.HasPrefix(pkg, "internal/"):
		return "leaf"
	}
	return ""
}

// mayImport lists, per layer, the layers its non-test code may import.
var mayImport = map[string][]string{
	"lease":     {},
	"leaf":      {"lease"},
	"flannel":   {"lease", "leaf"},
	"backend":   {"flannel", "lease", "leaf"},
	"dataplane": {"backend", "flannel", "lease", "leaf"},
	"store":     {"flannel", "lease", "leaf"},
	"rules":     {"backend", "flannel", "lease", "leaf"},
	"cni":       {"flannel", "lease", "leaf"},
	"daemon":    {"dataplane", "store", "rules", "cni", "backend", "flannel", "lease", "leaf"},
	"harness":   {"harness", "dataplane", "store", "rules", "cni", "backend", "flannel", "lease", "leaf"},
	"main":      {"main", "daemon", "harness", "dataplane", "store", "rules", "cni", "backend", "flannel", "lease", "leaf"},
}

// upward are the imports that break the layers today (none since memstore
// moved to the top level).
var upward = map[[2]string]bool{}

// TestLayers checks the import rules that doc.go states, over the non-test
// files of every package in the module.
func TestLayers(t *testing.T) {
	t.Parallel()
	imports := moduleImports(t)
	require.Contains(t, imports["vxlan"], "backend", "the walk found no imports")
	for pkg, deps := range imports {
		layer := layerOf(pkg)
		if !assert.NotEmpty(t, layer, "package %s has no layer: place it in doc.go and layerOf", pkg) {
			continue
		}
		for _, dep := range deps {
			if dep == pkg || upward[[2]string{pkg, dep}] {
				continue
			}
			dl := layerOf(dep)
			// Dataplanes and stores never import one another.
			sibling := dl == layer && (layer == "dataplane" || layer == "store")
			assert.True(t, !sibling && slices.Contains(mayImport[layer], dl),
				"%s (%s) imports %s (%s): doc.go's layers forbid it", pkg, layer, dep, dl)
		}
	}
}

// moduleImports returns, for every directory of the module with non-test
// Go files, the module packages those files import (paths inside the
// module; "." is the root).
func moduleImports(t *testing.T) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	fset := token.NewFileSet()
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() {
			if path == "." {
				return nil
			}
			if strings.HasPrefix(name, ".") || name == "testdata" {
				return filepath.SkipDir
			}
			if _, err := os.Stat(filepath.Join(path, "go.mod")); err == nil {
				return filepath.SkipDir // another module (tools)
			}
			return nil
		}
		if !strings.HasSuffix(name, ".go") || strings.HasSuffix(name, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		pkg := filepath.ToSlash(filepath.Dir(path))
		if _, ok := out[pkg]; !ok {
			out[pkg] = nil
		}
		for _, spec := range f.Imports {
			p, err := strconv.Unquote(spec.Path.Value)
			if err != nil {
				return err
			}
			if p == modulePath {
				p = "."
			} else if rest, ok := strings.CutPrefix(p, modulePath+"/"); ok {
				p = rest
			} else {
				continue
			}
			if !slices.Contains(out[pkg], p) {
				out[pkg] = append(out[pkg], p)
			}
		}
		return nil
	})
	require.NoError(t, err)
	return out
}
