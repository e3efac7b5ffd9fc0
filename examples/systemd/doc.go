// Package systemd holds example systemd units for running the example
// flanneld with etcd beside Docker, and a test that checks the units
// against the daemon's own flag parsing. It has no code.
package systemd
