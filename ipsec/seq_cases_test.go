package ipsec

import (
	"slices"
	"time"
)

// The tables of the sequences, in the IPv4-only form (expand makes the
// others).

// noPeers is what Start programs: the own subnet stays local, the rest of
// the cluster network is blocked.
var noPeers = []string{"allow any->a", "block any->cluster", "allow in a->a", "block in cluster->a", "allow fwd a->a", "block fwd cluster->a"}

// peerLines are the tables for peer p ("b") sending with out and receiving
// with in ("b1>a1 g0123": every generation).
func peerLines(p, out string, in ...string) []string {
	l := []string{"out " + p + " " + out, "policy out a->" + p + " via " + out,
		"policy in " + p + "->a", "policy fwd " + p + "->a", "route " + p,
		"policy out ha->" + p + " via " + out, "policy in h" + p + "->a", "policy fwd h" + p + "->a"}
	for _, k := range in {
		l = append(l, "in "+p+" "+k)
	}
	return l
}

func tables(parts ...[]string) []string { return slices.Concat(parts...) }

// blockedB is the table with peer b, whose outbound state is gone for good
// (no generation left): its policies stay, naming no state.
var blockedB = tables(noPeers, []string{"policy out a->b via no state", "policy in b->a", "policy fwd b->a",
	"policy out ha->b via no state", "policy in hb->a", "policy fwd hb->a", "in b b1>a1 g0123", "route b"})

const sec = time.Second

var sequences = append(seqCases, addFails, dualFlush)

var seqCases = []sequence{
	{
		name: "peers join leave return and lose their key",
		steps: []seqStep{
			{name: "first peer", peers: []string{"b1"},
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"))},
			{name: "second peer", at: 1 * sec, peers: []string{"b1", "c1"},
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"), peerLines("c", "a1>c1 g0", "c1>a1 g0123"))},
			{name: "same peers again", at: 2 * sec, peers: []string{"b1", "c1"}, noWrites: true,
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"), peerLines("c", "a1>c1 g0", "c1>a1 g0123"))},
			{name: "inbound state vanishes", at: 3 * sec, vanish: []string{"c1>a1 g2"}, repair: true,
				want:  tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"), peerLines("c", "a1>c1 g0", "c1>a1 g0123")),
				noLog: []string{"vanished"}},
			{name: "peer leaves", at: 4 * sec, peers: []string{"b1"},
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"))},
			// Issue #18: never the same key and SPI again (its sequence
			// number would start over): the next generation.
			{name: "peer returns with the same key", at: 5 * sec, peers: []string{"b1", "c1"},
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"), peerLines("c", "a1>c1 g1", "c1>a1 g0123"))},
			{name: "peer key of another psk", at: 6 * sec, peers: []string{"b1", "!c"},
				want:  tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123")),
				errs:  []string{"peer 10.244.2.0/24", "public ip 172.30.0.12", "not authenticated"},
				log:   []string{"peer not programmed"},
				noLog: []string{"10.244.1.0/24"}},
			{name: "still the bad key: warned once", at: 7 * sec, peers: []string{"b1", "!c"}, noWrites: true,
				want:  tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123")),
				errs:  []string{"not authenticated"},
				noLog: []string{"peer not programmed"}},
			{name: "all peers gone", at: 8 * sec, peers: []string{},
				want: noPeers},
		},
	},
	{
		name: "peer rekeys",
		steps: []seqStep{
			{name: "peer", peers: []string{"b1"},
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"))},
			{name: "new peer key: its old key stays accepted, our old outbound lingers", at: 10 * sec, peers: []string{"b2"},
				want: tables(noPeers, peerLines("b", "a1>b2 g0", "b2>a1 g0123", "b1>a1 g0123"), []string{"out b a1>b1 g0"}),
				log:  []string{"peer key changed"}},
			{name: "linger over", at: 11500 * time.Millisecond, repair: true,
				want: tables(noPeers, peerLines("b", "a1>b2 g0", "b2>a1 g0123", "b1>a1 g0123"))},
			{name: "grace not over", at: 39 * sec, repair: true, noWrites: true,
				want: tables(noPeers, peerLines("b", "a1>b2 g0", "b2>a1 g0123", "b1>a1 g0123"))},
			{name: "grace over: old peer key retired", at: 40 * sec, repair: true,
				want: tables(noPeers, peerLines("b", "a1>b2 g0", "b2>a1 g0123"))},
		},
	},
	{
		name: "our rekey: outbound switches when a peer shows it knows the key",
		keys: []string{"a2"},
		steps: []seqStep{
			{name: "peers", peers: []string{"b1", "c1"},
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"), peerLines("c", "a1>c1 g0", "c1>a1 g0123"))},
			{name: "rekey: new inbound, old outbound", at: 1 * sec, rekey: true,
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123", "b1>a2 g0123"), peerLines("c", "a1>c1 g0", "c1>a1 g0123", "c1>a2 g0123"))},
			{name: "b sends with the new key: b switches", at: 2 * sec, send: map[string]uint64{"b1>a2 g0": 3}, repair: true,
				want: tables(noPeers, peerLines("b", "a2>b1 g0", "b1>a1 g0123", "b1>a2 g0123"), []string{"out b a1>b1 g0"},
					peerLines("c", "a1>c1 g0", "c1>a1 g0123", "c1>a2 g0123"))},
			{name: "linger over", at: 3500 * time.Millisecond, repair: true,
				want: tables(noPeers, peerLines("b", "a2>b1 g0", "b1>a1 g0123", "b1>a2 g0123"), peerLines("c", "a1>c1 g0", "c1>a1 g0123", "c1>a2 g0123"))},
			{name: "c silent, half the grace not over", at: 15 * sec, repair: true, noWrites: true,
				want: tables(noPeers, peerLines("b", "a2>b1 g0", "b1>a1 g0123", "b1>a2 g0123"), peerLines("c", "a1>c1 g0", "c1>a1 g0123", "c1>a2 g0123"))},
			{name: "c silent for half the grace: c switches", at: 16500 * time.Millisecond, repair: true,
				want: tables(noPeers, peerLines("b", "a2>b1 g0", "b1>a1 g0123", "b1>a2 g0123"), peerLines("c", "a2>c1 g0", "c1>a1 g0123", "c1>a2 g0123"), []string{"out c a1>c1 g0"})},
			{name: "grace over: old key retired", at: 31 * sec, repair: true,
				want: tables(noPeers, peerLines("b", "a2>b1 g0", "b1>a2 g0123"), peerLines("c", "a2>c1 g0", "c1>a2 g0123"))},
		},
	},
	{
		name: "our rekey: a peer keeps sending with the previous key",
		keys: []string{"a2"},
		steps: []seqStep{
			{name: "peer", peers: []string{"b1"},
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"))},
			{name: "rekey", at: 1 * sec, rekey: true,
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123", "b1>a2 g0123"))},
			{name: "b sends with the old key", at: 10 * sec, send: map[string]uint64{"b1>a1 g0": 5}, repair: true, noWrites: true,
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123", "b1>a2 g0123"))},
			{name: "half the grace over, b still sends with it: no switch", at: 20 * sec, send: map[string]uint64{"b1>a1 g0": 5}, repair: true, noWrites: true,
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123", "b1>a2 g0123"))},
			{name: "grace over, b still sends with it: not retired", at: 31 * sec, send: map[string]uint64{"b1>a1 g0": 5}, repair: true, noWrites: true,
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123", "b1>a2 g0123"))},
			{name: "b silent for half the grace: retired and switched", at: 46 * sec, repair: true,
				want: tables(noPeers, peerLines("b", "a2>b1 g0", "b1>a2 g0123"), []string{"out b a1>b1 g0"})},
			{name: "linger over", at: 47 * sec, repair: true,
				want: tables(noPeers, peerLines("b", "a2>b1 g0", "b1>a2 g0123"))},
		},
	},
	{
		name:          "our rekey: retired after the rekey interval although a peer sends with it",
		rekeyInterval: time.Minute,
		keys:          []string{"a2"},
		steps: slices.Concat([]seqStep{
			{name: "peer", peers: []string{"b1"},
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"))},
			{name: "rekey", at: 1 * sec, rekey: true,
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123", "b1>a2 g0123"))},
		}, keepSending(10*sec, 60*sec, 10*sec), []seqStep{
			{name: "rekey interval over", at: 61 * sec, send: map[string]uint64{"b1>a1 g0": 1}, repair: true,
				want: tables(noPeers, peerLines("b", "a2>b1 g0", "b1>a2 g0123"), []string{"out b a1>b1 g0"}),
				log:  []string{"retiring the previous key although peers still send with it", "10.244.1.0-24"}},
		}),
	},
	{
		// Issue #18: the previous key comes back, but never with an SPI
		// it had (its sequence number would start over).
		name: "our rekey: previous key switched back when a peer returns",
		keys: []string{"a2"},
		steps: []seqStep{
			{name: "peer", peers: []string{"b1"},
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"))},
			{name: "rekey", at: 1 * sec, rekey: true,
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123", "b1>a2 g0123"))},
			{name: "b knows the new key", at: 2 * sec, send: map[string]uint64{"b1>a2 g1": 1}, repair: true,
				want: tables(noPeers, peerLines("b", "a2>b1 g0", "b1>a1 g0123", "b1>a2 g0123"), []string{"out b a1>b1 g0"})},
			{name: "b leaves", at: 4 * sec, peers: []string{},
				want: noPeers},
			{name: "b returns: the previous key again, its next generation", at: 5 * sec, peers: []string{"b1"},
				want: tables(noPeers, peerLines("b", "a1>b1 g1", "b1>a1 g0123", "b1>a2 g0123"))},
		},
	},
	{
		name:    "outbound state deleted behind our back: generations",
		configs: []string{"ipv4", "udp-encap"},
		steps: []seqStep{
			{name: "peer", peers: []string{"b1"},
				want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"))},
			{name: "gen 0 deleted", at: 1 * sec, vanish: []string{"a1>b1 g0"}, repair: true,
				want: tables(noPeers, peerLines("b", "a1>b1 g1", "b1>a1 g0123")),
				log:  []string{"outbound esp state vanished", "generation=1"}},
			{name: "gen 1 deleted", at: 2 * sec, vanish: []string{"a1>b1 g1"}, repair: true,
				want: tables(noPeers, peerLines("b", "a1>b1 g2", "b1>a1 g0123"))},
			{name: "gen 2 deleted", at: 3 * sec, vanish: []string{"a1>b1 g2"}, repair: true,
				want: tables(noPeers, peerLines("b", "a1>b1 g3", "b1>a1 g0123"))},
			{name: "last gen deleted: blocked", at: 4 * sec, vanish: []string{"a1>b1 g3"}, repair: true,
				want: blockedB,
				errs: []string{"peer 10.244.1.0/24", "deleted too often"}},
			// Issue #18: no generation comes back; blocked until a rekey.
			{name: "next repair: still blocked", at: 5 * sec, repair: true,
				want: blockedB,
				errs: []string{"peer 10.244.1.0/24", "deleted too often"}},
		},
	},
}

// addFails: a state the kernel refused was never installed, so its
// absence costs no generation.
var addFails = sequence{
	name: "kernel refuses an outbound state",
	steps: []seqStep{
		{name: "add fails", peers: []string{"b1"}, failAdd: []string{"a1>b1 g0"},
			want: blockedB,
			errs: []string{"peer 10.244.1.0/24", "injected add failure"}},
		{name: "repair adds it, same generation", at: 1 * sec, repair: true,
			want:  tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123")),
			noLog: []string{"vanished"}},
		{name: "an inbound add fails", at: 2 * sec, peers: []string{"b1", "c1"}, failAdd: []string{"c1>a1 g1"},
			want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"), peerLines("c", "a1>c1 g0", "c1>a1 g023")),
			errs: []string{"peer 10.244.2.0/24", "injected add failure"}},
		{name: "repaired", at: 3 * sec, repair: true,
			want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"), peerLines("c", "a1>c1 g0", "c1>a1 g0123"))},
	},
}

// dualFlush: a flush takes the outbound states of both families, which
// share their key pair's generation; each one vanished moves it on, so a
// flush costs two generations.
var dualFlush = sequence{
	name:    "outbound states of both families deleted: two generations a flush",
	configs: []string{"dual-stack"},
	steps: []seqStep{
		{name: "peer", peers: []string{"b1"},
			want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123"))},
		{name: "flush", at: 1 * sec, vanish: []string{"a1>b1 g0"}, repair: true,
			want: tables(noPeers, peerLines("b", "a1>b1 g2", "b1>a1 g0123")),
			log:  []string{"outbound esp state vanished", "generation=2"}},
		{name: "second flush: blocked", at: 2 * sec, vanish: []string{"a1>b1 g2"}, repair: true,
			want: blockedB,
			errs: []string{"deleted too often"}},
		// Issue #18: no generation comes back; blocked until a rekey.
		{name: "next repair: still blocked", at: 3 * sec, repair: true,
			want: blockedB,
			errs: []string{"deleted too often"}},
	},
}

// keepSending are steps from from to to in steps of every in which peer b
// sends with our previous key a1 while outbound stays with it.
func keepSending(from, to, every time.Duration) []seqStep {
	var out []seqStep
	for at := from; at <= to; at += every {
		out = append(out, seqStep{name: "b sends with the old key", at: at, send: map[string]uint64{"b1>a1 g0": 1}, repair: true, noWrites: true,
			want: tables(noPeers, peerLines("b", "a1>b1 g0", "b1>a1 g0123", "b1>a2 g0123"))})
	}
	return out
}
