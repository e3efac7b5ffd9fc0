// Command flanneld is the example flannel daemon: a drop-in for upstream
// flanneld with etcd or --kube-subnet-mgr (same flags, also as FLANNELD_*
// variables; NODE_NAME or POD_NAME/POD_NAMESPACE in kube mode), serving
// /healthz, /readyz and /metrics on --healthz-ip:--healthz-port, with
// --cleanup to remove the node's datapath, and `flanneld docker-opts` to
// write Docker daemon options from subnet.env (upstream's
// mk-docker-opts.sh), and `flanneld install-cni` to install the CNI
// plugins and conflist from the image (the manifests' init containers). It runs in the network namespace it is started in.
//
// All logic lives in internal/daemon; this file only wires.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	sdnotify "github.com/coreos/go-systemd/v22/daemon"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"syscall"

	"github.com/flannelkit/flannel/internal/daemon"
)

// version is set with -ldflags "-X main.version=...".
var version = "dev"

func main() { os.Exit(run()) }

func run() int {
	if len(os.Args) > 1 && os.Args[1] == "docker-opts" {
		if err := daemon.DockerOptsCommand(os.Args[2:], os.Stdout, os.Stderr); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return 0
			}
			fmt.Fprintln(os.Stderr, "flanneld:", err)
			return 1
		}
		return 0
	}
	if len(os.Args) > 1 && os.Args[1] == "install-cni" {
		if err := daemon.InstallCNICommand(os.Args[2:], os.Stdout, os.Stderr); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return 0
			}
			fmt.Fprintln(os.Stderr, "flanneld:", err)
			return 1
		}
		return 0
	}
	cfg, err := daemon.Parse(os.Args[1:], os.Getenv, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "flanneld:", err)
		return 2
	}
	if cfg.Version {
		fmt.Println(version)
		return 0
	}
	log := daemon.NewLogger(cfg, os.Stderr)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log.Info("starting flanneld", "version", version)
	// Type=notify units start their dependants (docker.service) once the
	// node is ready; without NOTIFY_SOCKET this does nothing.
	// The garbage of the first programming (store listing, desired and
	// dumped tables) is left to the runtime's background scavenger, which
	// returns it to the kernel within minutes (at 5,000 peers RSS falls to
	// the live state in about four). Forcing it at once with FreeOSMemory
	// gave the same RSS four minutes sooner, and then every periodic job
	// faulted pages back in: an idle node grew by a few hundred KB.
	ready := func() {
		if sent, err := sdnotify.SdNotify(false, sdnotify.SdNotifyReady); err != nil {
			log.Warn("sd_notify READY=1 failed", "error", err)
		} else if sent {
			log.Info("told systemd the node is ready")
		}
	}
	// FLANNELD_MEMPROFILE names a file that gets a heap profile (live and
	// all allocations since start) on SIGUSR1: for hack/bench.
	if path := os.Getenv("FLANNELD_MEMPROFILE"); path != "" {
		usr1 := make(chan os.Signal, 1)
		signal.Notify(usr1, syscall.SIGUSR1)
		defer signal.Stop(usr1)
		go func() {
			for range usr1 {
				writeHeapProfile(path, log)
			}
		}()
	}
	// FLANNELD_CPUPROFILE: a CPU profile of the whole run, likewise.
	if path := os.Getenv("FLANNELD_CPUPROFILE"); path != "" {
		if f, err := os.Create(path); err == nil && pprof.StartCPUProfile(f) == nil {
			defer f.Close()
			defer pprof.StopCPUProfile()
		}
	}
	if err := daemon.Run(ctx, cfg, log, daemon.Hooks{Ready: ready}); err != nil {
		log.Error("flanneld failed", "error", err)
		return 1
	}
	log.Info("flanneld stopped")
	return 0
}

func writeHeapProfile(path string, log *slog.Logger) {
	f, err := os.Create(path)
	if err != nil {
		log.Warn("heap profile", "error", err)
		return
	}
	defer f.Close()
	runtime.GC()
	if err := pprof.Lookup("heap").WriteTo(f, 0); err != nil {
		log.Warn("heap profile", "error", err)
	}
}
