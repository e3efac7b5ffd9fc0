// Command flannel-cni is the flannel CNI plugin binary, installed as
// /opt/cni/bin/flannel: the container runtime runs it for every pod with
// CNI_COMMAND and friends in the environment and the network config on
// stdin. Everything it does is package cni; a multicall binary calls
// cni.Main the same way when argv[0] is "flannel".
package main

import (
	"fmt"
	"os"

	"github.com/flannelkit/flannel/cni"
)

func main() {
	if err := cni.Main(cni.Plugin{}); err != nil {
		if perr := err.Print(); perr != nil {
			fmt.Fprintln(os.Stderr, "flannel:", err.Error())
		}
		os.Exit(1)
	}
}
