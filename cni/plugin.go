package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	flannel "github.com/flannelkit/flannel"
)

// SupportedVersions returns the CNI spec versions the plugin speaks.
func SupportedVersions() []string { return []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} }

// Plugin is the flannel CNI plugin. The zero value is ready to use and
// behaves as upstream's plugin; the fields are for embedders. A Plugin
// holds no state between calls and may serve concurrent calls.
type Plugin struct {
	// Exec runs the delegate plugins. Optional: nil looks them up in
	// CNI_PATH and runs them as processes, as a runtime does. A multicall
	// binary with the delegates compiled in can supply its own.
	Exec invoke.Exec
	// SubnetFile and DataDir replace the defaults used when the config
	// does not set subnetFile or dataDir. Optional.
	SubnetFile string
	DataDir    string
	// Stdout receives ADD's result. Optional: nil is os.Stdout, where the
	// runtime reads it.
	Stdout io.Writer
	// Context bounds delegate calls. Optional: nil is context.Background.
	Context context.Context
}

// About is what the binary prints when run without CNI_COMMAND.
const About = "flannel CNI plugin (github.com/flannelkit/flannel/cni): gives pods addresses from the node's flannel subnet lease"

// Funcs returns p's commands for skel.
func (p *Plugin) Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: p.Add, Del: p.Del, Check: p.Check, Status: p.Status, GC: p.GC}
}

// Main serves one CNI call the way a runtime makes it: the command and its
// arguments from the CNI_* environment variables, the config on stdin, the
// result on stdout. It is the entry for a plugin binary or a multicall
// binary that dispatches on argv[0]; it returns the error the caller must
// print (Print) before exiting non-zero, and never exits itself.
func Main(p Plugin) *types.Error {
	return skel.PluginMainFuncsWithError(p.Funcs(), version.PluginSupports(SupportedVersions()...), About)
}

func (p *Plugin) ctx() context.Context {
	if p.Context != nil {
		return p.Context
	}
	return context.Background()
}

func (p *Plugin) stdout() io.Writer {
	if p.Stdout != nil {
		return p.Stdout
	}
	return os.Stdout
}

// readEnv reads the node's subnet.env, turning each way it can be wrong
// into a CNI error that names the file.
func readEnv(path string) (flannel.SubnetEnv, *types.Error) {
	env, err := flannel.ReadCompleteSubnetEnv(path)
	switch {
	case err == nil:
		return env, nil
	case errors.Is(err, fs.ErrNotExist):
		return env, types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("flannel: subnet file %s does not exist: flanneld is not ready yet (it writes the file once this node holds a subnet lease)", path), "")
	case errors.Is(err, flannel.ErrSubnetEnvInvalid):
		return env, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("flannel: %v", err), "")
	default:
		return env, types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("flannel: subnet file %s is incomplete or malformed, flanneld may not be ready yet: %v", path, err), "")
	}
}

// Add renders the delegate config, stores it for DEL, and runs the
// delegate's ADD. When the delegate fails, its DEL is run with the same
// config and the stored file removed, so nothing is left behind.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	n, err := p.ParseNetConf(args.StdinData)
	if err != nil {
		return err
	}
	env, terr := readEnv(n.SubnetFile)
	if terr != nil {
		return terr
	}
	conf, err := json.Marshal(DelegateConf(n, env))
	if err != nil {
		return fmt.Errorf("flannel: render delegate config: %w", err)
	}
	dtype := delegateType(n.Delegate)
	path, err := storePath(n.DataDir, args.ContainerID)
	if err != nil {
		return invalid("flannel: %v", err)
	}
	// Stored before the delegate runs: a plugin killed half-way still
	// leaves DEL what it needs to release the address.
	if err := saveConf(n.DataDir, args.ContainerID, conf); err != nil {
		return fmt.Errorf("flannel: %w", err)
	}
	call, err := withPrevResult(conf, n.RawPrevResult)
	if err != nil {
		_ = removeConf(path)
		return err
	}
	res, err := invoke.DelegateAdd(p.ctx(), dtype, call, p.Exec)
	if err != nil {
		derr := invoke.DelegateDel(p.ctx(), dtype, call, p.Exec)
		if derr == nil {
			_ = removeConf(path)
		}
		return delegateError(dtype, "ADD", err)
	}
	out, err := res.GetAsVersion(n.CNIVersion)
	if err != nil {
		return fmt.Errorf("flannel: convert %s result to CNI %s: %w", dtype, n.CNIVersion, err)
	}
	return out.PrintTo(p.stdout())
}

// Del replays the config ADD stored. It is idempotent: with no stored
// config (never added, or already deleted) it succeeds without reading
// subnet.env. When the delegate fails the stored config stays, so the
// runtime's retry can release what is left.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	n, err := p.ParseNetConf(args.StdinData)
	if err != nil {
		return err
	}
	conf, path, err := loadConf(n.DataDir, args.ContainerID)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("flannel: %w", err)
	}
	dtype, err := storedType(conf, path)
	if err != nil {
		// A torn or foreign file releases nothing; keeping it would make
		// every DEL fail.
		_ = removeConf(path)
		return nil
	}
	call, err := withPrevResult(conf, n.RawPrevResult)
	if err != nil {
		return err
	}
	if err := invoke.DelegateDel(p.ctx(), dtype, call, p.Exec); err != nil {
		return delegateError(dtype, "DEL", err)
	}
	return removeConf(path)
}

// Check runs the delegate's CHECK with the stored config and the
// runtime's prevResult, after checking that the node's subnet is still the
// one the container got its address from.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	n, err := p.ParseNetConf(args.StdinData)
	if err != nil {
		return err
	}
	conf, path, err := loadConf(n.DataDir, args.ContainerID)
	if errors.Is(err, fs.ErrNotExist) {
		return types.NewError(types.ErrUnknownContainer, fmt.Sprintf("flannel: no stored config for container %s in %s: it was never added, or already deleted", args.ContainerID, n.DataDir), "")
	}
	if err != nil {
		return fmt.Errorf("flannel: %w", err)
	}
	dtype, err := storedType(conf, path)
	if err != nil {
		return err
	}
	env, terr := readEnv(n.SubnetFile)
	if terr != nil {
		return terr
	}
	if err := sameRanges(conf, DelegateConf(n, env)); err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("flannel: container %s: %v (from %s)", args.ContainerID, err, n.SubnetFile), "")
	}
	call, err := withPrevResult(conf, n.RawPrevResult)
	if err != nil {
		return err
	}
	if err := invoke.DelegateCheck(p.ctx(), dtype, call, p.Exec); err != nil {
		return delegateError(dtype, "CHECK", err)
	}
	return nil
}

// Status reports whether ADD can work now: subnet.env is complete and the
// delegate says it is ready.
func (p *Plugin) Status(args *skel.CmdArgs) error {
	n, err := p.ParseNetConf(args.StdinData)
	if err != nil {
		return err
	}
	env, terr := readEnv(n.SubnetFile)
	if terr != nil {
		return types.NewError(types.ErrPluginNotAvailable, terr.Msg, terr.Details)
	}
	conf, err := json.Marshal(DelegateConf(n, env))
	if err != nil {
		return fmt.Errorf("flannel: render delegate config: %w", err)
	}
	dtype := delegateType(n.Delegate)
	if err := invoke.DelegateStatus(p.ctx(), dtype, conf, p.Exec); err != nil {
		return delegateError(dtype, "STATUS", err)
	}
	return nil
}

// GC replays DEL for every stored container that is not among the
// runtime's valid attachments, then passes GC on to the delegate (which
// passes it to IPAM) for what flannel does not track.
func (p *Plugin) GC(args *skel.CmdArgs) error {
	n, err := p.ParseNetConf(args.StdinData)
	if err != nil {
		return err
	}
	valid := map[string]bool{}
	for _, a := range n.ValidAttachments {
		valid[a.ContainerID] = true
	}
	entries, err := os.ReadDir(n.DataDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("flannel: gc: %w", err)
	}
	var errs []error
	for _, e := range entries {
		id := e.Name()
		if !e.Type().IsRegular() || strings.HasPrefix(id, ".") || valid[id] {
			continue
		}
		conf, path, err := loadConf(n.DataDir, id)
		if err != nil {
			continue
		}
		dtype, err := storedType(conf, path)
		if err == nil {
			err = invoke.DelegateDel(p.ctx(), dtype, conf, p.Exec)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("container %s: %w", id, err))
			continue
		}
		errs = append(errs, removeConf(path))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("flannel: gc: %w", err)
	}
	env, terr := readEnv(n.SubnetFile)
	if terr != nil {
		return nil // nothing to hand the delegate a config from; stored ones were handled
	}
	d := DelegateConf(n, env)
	d["cni.dev/valid-attachments"] = n.ValidAttachments
	conf, err := json.Marshal(d)
	if err != nil {
		return fmt.Errorf("flannel: gc: %w", err)
	}
	dtype := delegateType(n.Delegate)
	if err := invoke.DelegateGC(p.ctx(), dtype, conf, p.Exec); err != nil {
		return delegateError(dtype, "GC", err)
	}
	return nil
}

func delegateType(d map[string]any) string {
	if t, ok := d["type"].(string); ok && t != "" {
		return t
	}
	return "bridge"
}

func storedType(conf []byte, path string) (string, error) {
	var c struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal(conf, &c); err != nil || c.Type == "" || strings.ContainsAny(c.Type, "/\\") {
		return "", types.NewError(types.ErrDecodingFailure, fmt.Sprintf("flannel: stored config %s is not a delegate config", filepath.Clean(path)), "")
	}
	return c.Type, nil
}

// withPrevResult adds the chain's prevResult to a delegate config, as the
// spec passes it to every plugin after the first.
func withPrevResult(conf []byte, prev map[string]any) ([]byte, error) {
	if prev == nil {
		return conf, nil
	}
	var m map[string]any
	if err := json.Unmarshal(conf, &m); err != nil {
		return nil, fmt.Errorf("flannel: delegate config: %w", err)
	}
	m["prevResult"] = prev
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("flannel: delegate config: %w", err)
	}
	return b, nil
}

// sameRanges reports a difference between the IPAM ranges the container
// was added with and the ones subnet.env gives now.
func sameRanges(stored []byte, now map[string]any) error {
	var s struct {
		IPAM struct {
			Ranges json.RawMessage `json:"ranges"`
		} `json:"ipam"`
	}
	if err := json.Unmarshal(stored, &s); err != nil {
		return fmt.Errorf("stored config: %w", err)
	}
	cur, err := json.Marshal(now["ipam"].(map[string]any)["ranges"])
	if err != nil {
		return err
	}
	var a, b any
	_ = json.Unmarshal(s.IPAM.Ranges, &a)
	_ = json.Unmarshal(cur, &b)
	if !reflect.DeepEqual(a, b) {
		return fmt.Errorf("the node's subnet changed since the container was added: ranges %s then, %s now", s.IPAM.Ranges, cur)
	}
	return nil
}

// delegateError keeps a delegate's CNI error code and says which delegate
// and command it came from.
func delegateError(dtype, cmd string, err error) error {
	var te *types.Error
	if errors.As(err, &te) {
		return types.NewError(te.Code, fmt.Sprintf("flannel: delegate %s %s: %s", dtype, cmd, te.Msg), te.Details)
	}
	return types.NewError(types.ErrInternal, fmt.Sprintf("flannel: delegate %s %s: %v", dtype, cmd, err), "")
}
