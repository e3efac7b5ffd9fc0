// Package e2e holds end-to-end tests: real agents (Agent + store + dataplane)
// running against real network namespaces on the real kernel, with real
// ICMP and TCP between pods. It has no non-test code.
package e2e
