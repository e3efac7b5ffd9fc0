// Package extension is upstream flannel's extension dataplane: instead of
// programming the kernel itself, it runs commands the operator configures
// in net-conf.json when the node starts and when the set of peer nodes
// changes. It is how a dataplane is prototyped without writing Go, and how
// K3s hands routing to another program.
//
// Commands. Each of PreStartupCommand, PostStartupCommand, SubnetAddCommand
// and SubnetRemoveCommand is split on white space and run directly, without
// a shell, as upstream v0.28.9 does (it stopped using `sh -c` so that lease
// data written by another node cannot inject shell code): "$VAR" and
// "${VAR}" in any word are replaced by the command's environment first.
// Anything that needs a shell goes in a script the command names. Every
// command runs in the node's network namespace (flannel.Env.NS), on a
// thread switched into it just for the fork, with a timeout after which
// its whole process group is killed; its output goes to the log.
//
// Data and environment, as upstream:
//   - PreStartupCommand runs in Prepare; its standard output, trimmed, is
//     published as the lease's backend data (a JSON string).
//   - PostStartupCommand runs in Start with NETWORK, SUBNET, IPV6SUBNET,
//     PUBLIC_IP and PUBLIC_IPV6 of this node (IPV6NETWORK too: ours).
//   - SubnetAddCommand and SubnetRemoveCommand run per peer with SUBNET,
//     IPV6SUBNET, PUBLIC_IP and PUBLIC_IPV6 of the peer and the peer's
//     backend data on standard input, followed by a newline.
//
// Unlike upstream, which runs add and remove on watch events, a Network is
// level-triggered: Apply compares the peer set with the set of peers it has
// added, runs remove for each added peer that is gone or changed and add
// for each new or changed one. The added set is kept in a state file
// (Options.StateDir) so that a peer removed while the agent was down gets
// its remove command on the next start. A failing or timed-out command is
// retried with capped exponential backoff and reported as a
// *flannel.PeerError; commands of different peers run concurrently, so one
// slow peer never holds up the others.
//
// The package does not know what the commands do: it cannot repair a route
// deleted by hand (nothing tells it the command's work is gone), and it
// does not read the process environment (Options.Environ is the base
// environment of every command).
package extension
