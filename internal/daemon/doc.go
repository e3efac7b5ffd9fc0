// Package daemon is the examples/flanneld program minus its main: upstream
// flanneld's flags (each also settable as a FLANNELD_* environment
// variable), the wiring of store, backend, traffic rules and Agent for the
// namespace the process runs in, the health/readiness/metrics HTTP
// endpoints, --cleanup, and the docker-opts subcommand that replaces
// upstream's mk-docker-opts.sh.
//
// It is internal: embedders compose the library packages themselves (see
// examples/embedded); this package exists so that the daemon's logic is
// tested without a process, and the process tests test the rest.
package daemon
