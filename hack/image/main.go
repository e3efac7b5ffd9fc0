// Command image builds the flanneld image as a docker-archive tarball on
// this machine (no Docker daemon, no registry) and prints its digest:
//
//	go run ./hack/image -out flanneld.tar -tag ghcr.io/flannelkit/flanneld:dev
//
// Load it with `ctr -n k8s.io images import flanneld.tar` or
// `docker load -i flanneld.tar`. See package internal/image for what goes
// in; deploy/Dockerfile is the release build for people with a registry.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/flannelkit/flannel/internal/image"
	"github.com/flannelkit/flannel/internal/testenv"
)

func main() {
	out := flag.String("out", "flanneld.tar", "tarball to write")
	tag := flag.String("tag", "ghcr.io/flannelkit/flanneld:dev", "image name and tag")
	plugins := flag.String("cni-plugins", ".cache/bin/cni", "directory of the bridge, host-local, loopback and portmap plugins (hack/test.sh builds them)")
	version := flag.String("version", "dev", "version stamped into flanneld")
	flag.Parse()
	repo, err := os.Getwd()
	if err == nil {
		var res image.Result
		res, err = image.Build(context.Background(), image.Options{
			Repo: repo, Go: testenv.GoBinary(), CNIPlugins: *plugins,
			Tag: *tag, Out: *out, Version: *version,
		})
		if err == nil {
			fmt.Printf("%s\n  digest %s\n  id     %s\n  debian %v\n", *out, res.Digest, res.ID, res.Packages)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "image:", err)
		os.Exit(1)
	}
}
