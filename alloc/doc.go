// Package alloc is the alloc "dataplane": it takes a subnet lease for the
// node and programs nothing. It is for clusters whose routing is done by
// something else (a routing daemon announcing each node's subnet, cloud
// route tables, static routes set up by the operator): flannel's part is
// then only to hand out non-overlapping subnets and write subnet.env.
//
// As upstream flannel's alloc backend, it publishes the node's public
// addresses with the lease and has no settings. It creates no device, route,
// address or sysctl, so Cleanup has nothing to remove. The Agent still
// writes subnet.env and, when asked, the traffic rules.
package alloc
