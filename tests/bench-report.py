#!/usr/bin/python3
"""Generates docs/benchmarks.md and docs/benchmarks.png from the raw results of
`make bench` (target/bench/*.json).

Every number in the generated document comes from those files; the script holds only
prose (what each bench measures) and layout. Each file has the schema written by
tests/src/bench.rs (`write_results`):

    {"bench": str, "command": str,
     "machine": {"cpus", "cpu_model", "mem_gib", "kernel", "commit", "unix_time"},
     "figures": [{"key", "label", "unit", "samples", "median", "min", "max", "spread",
                  "target"?: {"at_most": x} | {"at_least": x}, "met"?: bool}],
     "extra": any}

A median of null (a run that never finished: the writers' infinity) is shown as "n/a"
and misses its target.

Usage (`make bench-report`):

    /usr/bin/python3 tests/bench-report.py --in target/bench --md docs/benchmarks.md \\
        --png docs/benchmarks.png --raw-dir docs/bench

Needs matplotlib (Debian: python3-matplotlib) for the chart.
"""

import argparse
import datetime
import json
import re
import math
import os
import shutil
import sys

REGENERATE = (
    "`make bench` (root: it builds simulated hosts; runs every bench, writes "
    "target/bench/*.json, then this report), or `make bench-report` to regenerate this "
    "page from the JSON already in target/bench/"
)

# The known benches, in the order the document shows them: (file stem, title, prose).
# Prose says what the paths and figures are; every number comes from the JSON.
SECTIONS = [
    (
        "datapath",
        "Datapath (`vrt-bench`)",
        """\
Simulated hosts (network namespaces on a veth underlay), all paths built in the same run
and measured interleaved, so that the noise of a shared machine hits them alike. The
baselines get the same offloads, MTU and sysctls as the overlay, from the same code.
Hosts 1 and 2 run discovery with port steering (the default), hosts 3 and 4 with
`VROUTER_STEERING=rule`; every stack runs the default access policy.

- **overlay**: service to service across hosts through docker-vrouter with port
  steering: the service's frame goes from its host-side port straight into the VXLAN
  device, to the remote router, which hands it to the service's port; neither host
  forwards it;
- **overlay_rule**: the same over the policy-rule path (service, host, router, VXLAN,
  router, bridge, service), what every stack ran before port steering;
- **flannel**: Flannel-style, the same services over a VXLAN device in the host
  namespaces (a /32 on the device, an onlink route, a permanent neighbour and an FDB
  entry per remote host), no router;
- **routed**: host to host, routed, without VXLAN;
- **underlay**: host to host directly over the underlay;
- **same_host**: two stacks on one host, port steering (the sender's port hands the
  frame to the other stack's router, which delivers it);
- **bridged**: two networks on one host, routed by the host from bridge to bridge
  without a firewall (what two Docker networks would do where direct routing is
  allowed);
- **overlay_fw**: the overlay once more with the Docker-like firewall loaded (the other
  paths run without it).

Throughput is iperf3 TCP with 1 stream (`tcp1`) and 4 streams (`tcp4`); latency is the
ping RTT (`ping`) and a small TCP request/response RTT (`tcp_rr`). `ratio` figures divide
one path by another within each round.

Why port steering gains. Per direction the Flannel-style path forwards once in each
host. The policy-rule path forwards in the sending host (the service's gateway is the
host's bridge), in router A and in router B, and hands router B's packets to the
service's bridge as bridged frames, which bridge netfilter passes to the IPv4 hooks once
more. Port steering takes the frame at the service's host-side port (an nftables
`netdev` ingress chain) and sends it into the VXLAN device addressed to router B, which
forwards it once and whose port chain sends it straight to the service's port: one IP
forward per direction, as on the Flannel-style path, and no host firewall on the way,
which is why `overlay_fw` matches `overlay` while the Flannel-style path under the same
firewall carries nothing (`flannel_under_firewall_answers_ping` in the JSON).""",
    ),
    (
        "encryption",
        "Encrypted overlay (`vrt-enc-bench`)",
        """\
The plain overlay and the encrypted overlay (issue 16: `VROUTER_ENCRYPTION=require`,
VXLAN over WireGuard) side by side in one run, real daemons on simulated hosts: three
gossip meshes of two hosts each, one stack per host, port steering, measured interleaved
as the datapath bench is. This kernel has no WireGuard module, so the encrypted paths
run discovery's userspace engine (boringtun on a persistent TUN device).

- **plain**: service to service over the overlay without encryption (overlay MTU 1450);
- **wg**: the same over the encrypted overlay (overlay MTU 1370), UDP GSO/GRO on the
  engine's socket (the default);
- **wg_nooffload**: the encrypted overlay with the engine's benchmark knob
  `VROUTER_WG_UDP_OFFLOAD=off` (one system call per datagram each way).

Each path's TCP uses the MSS its overlay gives (overlay MTU - 40: 1410 plain, 1330
encrypted), so the encrypted figures include the smaller segments. After the rounds, one
single-stream transfer per path with the CPU time of every discovery thread read from
/proc, and one on `wg` under `perf record -g` on both discoveries: where the userspace
path spends its CPU.""",
    ),
    (
        "relay",
        "Relays (`vrt-relay-bench`)",
        """\
Relaying (issue 17) with the real daemons on four simulated hosts in one gossip mesh,
plain overlay: stack a on host 1, stack b on host 2 (VNI 1000, port steering), hosts 3
and 4 with `VROUTER_RELAY=true` and no stack. UDP between two hosts is cut by nftables
rules on the underlay bridge (gossip, path probes and VXLAN stop; ICMP and TCP pass).
A relay forwards in its host namespace: an nftables `netdev` ingress chain on its
`vxlan1000` sends frames for the routers of hosts it reaches directly back out of
`vxlan1000`, so no router, access table or counter of a stack is on the way. Each round:

- **direct** and **relayed**: single-stream TCP (iperf3, MSS 1410) and ping RTT from
  service a to service b, with the direct path open, then with UDP between hosts 1 and
  2 blocked (the two measured in alternating order per round; `ratio` figures divide
  relayed by direct within each round);
- **switch_to_relay**: the outage in 10 ms pings when UDP 1<->2 is blocked, until a
  relay carries the traffic;
- **failover**: the outage when the relay in use is cut off from hosts 1 and 2, until
  the other relay carries the traffic; the issue's bound is failure detection (a path
  is dead after 2.5 s without an answered probe) plus 2 s;
- **return_direct**: from the moment UDP 1<->2 passes again until both hosts report the
  direct path in discovery.json and the relays' forward counters stop rising (a relayed
  peer goes back only after its direct path has answered probes for 2 s), and
  **return_loss**, the longest gap in the pings meanwhile.""",
    ),
    (
        "migration",
        "Stack migration (`vrt-migration-bench`)",
        """\
A stack moving between hosts (issue 18) with the real daemons on three simulated hosts
in one gossip mesh: stack `mv` on host 1 moves to host 2 (the same name, subnet and
addresses), host 3's stack sends the traffic (pings with a 150 ms timeout, 10 ms apart).
Copies of one stack rank by placement generation (ARCHITECTURE.md, "Placement
generations"), so the new copy wins at once. Each round, on a fresh mesh each time:

- **migration_graceful_s**: `docker compose down` on host 1 (the old copy enters its
  3 s grace period), its router started on host 2: from that start to the first
  answer from host 3;
- **migration_crash_s**: host 1 cut off from the others with `mv` still running
  there, `mv` started on host 2: from that start to the first answer from host 3 (the
  issue's bound is failure detection plus 2 s), and **migration_crash_from_cut_s**
  from the cut;
- **migration_flips**: host 1 healed with its stale copy running, 10 s of pings from
  host 3: the samples where the old copy's service received a ping (an nftables
  counter there) or host 3 routed to the old host.""",
    ),
    (
        "control",
        "Control plane (`vrt-ctl-bench`)",
        """\
- **reconcile**: time to reconcile 1,000 and 10,000 remote prefixes (behind as many
  distinct gateways) into a router, from the routes.json rename until the kernel's route
  dump matches;
- **rss**: peak resident memory of each daemon with 10 and 1,000 remote stacks;
- **ready**: time from a daemon's start until it is ready.""",
    ),
    (
        "acl",
        "Access control between stacks (`vrt-acl-bench`)",
        """\
What a stack's access policy (issue 14) costs, with the real daemons on two simulated
hosts: stack a on host 1, stack b on host 2, traffic b -> a, a's router enforcing a's
policy from its policy file.

- **tcp1**: single-stream TCP (iperf3) with a's router holding no access table at all
  (`none`: deleted by hand, as before access control existed), the default policy
  (`allow`: default allow, no rules, what every router runs: a stateless table,
  anti-spoofing only, no connection tracking) and default deny with 100 rules
  (`deny100`), interleaved, the order rotated per round. Under `deny100` established
  flows are accepted by their connection mark and never reach the rules.
- **connrate**: new TCP connections per second b -> a (connect, then reset; two client
  threads) with default deny and 1 rule, and with 1,000 rules (999 of them about other
  sources, as a policy naming many stacks has). A new connection is classified once:
  an interval map from source ranges to a small chain per range, so its cost follows
  the rules covering its source, not the number of rules.
- **apply**: a change to a 1,000-rule policy (one rule's port), from the rename of the
  policy file until the end of the router's nftables transaction (the kernel's NEWGEN
  notification, read in the router's namespace); it includes the router's 5 ms wait
  for the file to settle and the compilation of the whole table.""",
    ),
    (
        "images",
        "Image sizes (`vrt-image-sizes`)",
        """\
`make images` builds three `FROM scratch` images from the static musl binaries (release
profile `opt-level = "s"`, LTO, one codegen unit, stripped, `panic = "abort"`):
discovery carries vrouter-discovery and vrouter-router (for `all-in-one`), router carries
vrouter-router, testsvc carries busybox-static and vrt-probe (tests and examples only).
Sizes as `docker image inspect -f '{{.Size}}'` reports them, in MB (10^6 bytes).""",
    ),
    (
        "gossip-real",
        "Real daemons, N=10 simulated hosts (`vrt-gossip-bench`)",
        """\
Simulated hosts (network namespaces on a veth underlay, the Docker-28.2-like firewall,
daemons under CAP_NET_ADMIN only, a shared secret), one stack per host, all joined
through host 1's address.

- **join**: a new stack's router started on one host, until the first ping answered
  from its service by a service on another host;
- **failure detection**: a host's underlay link taken down, until its stack is
  withdrawn on every other host;
- **false failures**: a long run at 5 % loss on every host's underlay (nftables
  `numgen random` drop, both directions), counting `member_failed` events and
  withdrawals;
- **idle traffic**: gossip bytes sent per node over a quiet window (UDP payload plus
  28 bytes of IP/UDP headers per datagram), one sample per node.

Join convergence is much shorter than failure detection because nothing waits for a
timer: the new router registers, discovery bumps its record and broadcasts it at once,
and the other hosts program the FDB row and routes on receipt.""",
    ),
    (
        "gossip-sim",
        "Simulation, N=10 to N=1,000 (`gossip-sim`)",
        """\
The production `vrouter_gossip::Node` on a simulated clock and network, every datagram
really sealed and opened, bytes counted on the wire; see docs/gossip-sim.md for the
model and what is not modelled. Seeds are fixed, so a given tree gives the same figures
on every run. Large-mesh figures (`n1000`, or `n200` without `--n1000`): nodes start 10
per 100 ms through one address; the join figure is the time after the last start until
every node sees every other alive with its record (checked every 500 ms).""",
    ),
    (
        "fuzz",
        "Gossip input fuzzing (`gossip-fuzz`, `make fuzz`)",
        """\
Everything a gossip peer can send, fuzzed on stable Rust (crates/vrouter-gossip/src/fuzz.rs):
the wire messages, the record, the seal layer, and `Node::handle_packet` fed packets
sealed with the right key and fresh sequence numbers, so they pass authentication and
the replay check. Inputs are generated field by field with edge values (ranges either
way round, `u64::MAX`, counts past the caps), taken from real captured traffic and
mutated as bytes, or random. The build is the release one with panics caught and
overflow checks on (cargo profile `fuzz`); a crash is any panic. `make fuzz` is not
part of `make bench`.""",
    ),
]

# Crash at any point (issue 18): `make chaos`, not part of `make bench`.
SECTIONS.append(
    (
        "chaos",
        "Crash at any point (`vrt-chaos`)",
        """\
Three simulated hosts in one gossip mesh with every kind of state the project keeps:
userspace WireGuard (`require`) on every host, port steering, an access policy on one
router (default deny), six stacks on two VNIs of which three come and go (compose up
and down) all the time. Discovery and routers are killed with SIGKILL at random moments
during registrations, publishes and withdrawals, then each crash point
(docs/operations.md, "Crash points") fires once. After every crash the daemon starts
again and the run checks that every state file parses (no torn discovery.json,
routes.json, events.log line, probes or private file), that temp files do not pile up,
that traffic flows between every live pair, and that the kernel equals an oracle
derived from the test topology alone (tests/src/oracle.rs): VXLAN devices, FDB rows,
policy rules and steering routes, steering chains, the WireGuard peers and input
filter, each router's routes, nexthops, neighbours, rules, overlay link and access
table elements, none missing and none left over. The run stops at the first failure,
so a result file means every crash converged; **converge** is the time from the
restart to that state.""",
    )
)

# How to produce a results file, where it is not `make bench`.
MAKE_TARGET = {
    "chaos": "make chaos",
    "fuzz": "make fuzz",
    "encryption": "make bench-encryption",
    "relay": "make bench-relay",
    "migration": "make bench-migration",
}

GOSSIP_INTRO = """\
Routers probe each other over the overlay every 250 ms (with more than 250 remote
routers, at most 1,000 requests a second, so each peer less often) and report a peer
reachable while it answered within 3 intervals; a remote host's stacks are withdrawn when its
membership is down and no local router reports it reachable (ARCHITECTURE.md,
"Routing decision")."""

# Gossip parameters as gossip-sim prints them under extra.params (Params::default()).
PARAM_TEXT = [
    ("probe_period_ms", "probe period {} ms"),
    ("probe_rtt_ms", "probe RTT {} ms"),
    ("indirect_probes", "{} indirect probes"),
    ("suspect_to_down_ms", "suspect→down {} ms"),
    ("max_transmissions", "max transmissions {}"),
    ("gossip_every_ms", "periodic gossip every {} ms"),
    ("gossip_fanout", "to {} members"),
    ("announce_to_down_every_ms", "announce to down members every {} ms"),
    ("anti_entropy_ms", "anti-entropy every {} ms"),
    ("join_retry_ms", "join retry {} ms"),
]


class BadInput(Exception):
    pass


# ---- scale (vrt-scale-bench, gossip-sim --scale): one block, its own sections ----

SCALE_SECTIONS = [
    (
        "gossip-scale",
        "Simulation at size, records of 100-stack hosts (`gossip-sim --scale`)",
        """\
The same simulator as above (real `Node`s, sealed datagrams), with every node announcing
100 stacks with random 64-character names and 4 prefixes each (the record of a host at
about the per-host limit, below) instead of one short stack. Nodes start 10 per 100 ms
through node 0; then 10 s settle and 20 s of idle traffic; then record updates (one
node replaces one of its stacks: a new record version), then crashes one after another.
The simulator holds every node's copy of every record in one process (N² records), so
the N it can run is bounded by this machine's memory, not by the protocol; the N=10,000
figures are extrapolated from the runs (least squares over log2 N).""",
    ),
    (
        "scale",
        "Real daemons at size (`vrt-scale-bench`)",
        """\
Simulated hosts (network namespaces on a veth underlay, the Docker-28.2-like firewall,
daemons under CAP_NET_ADMIN only, gossip), release binaries, every stack on VNI 1000 so
every stack routes every other one (same-host stacks too).

- **one host**: 100 stacks on host 1 (100 router processes, 100 bridges, 200 container
  namespaces) and 3 on host 2. From the last router's start until every router's
  namespace holds a route to every other stack (netlink dumps of all 103); then a ping
  between every pair of stacks across the hosts; discovery's reconcile time (the
  `vrouter_reconcile_duration_seconds` histogram's mean over a window) and RSS; then
  one more stack on host 1: its router started until all 104 routers route to it;
- **hosts**: 20 hosts with 5 stacks each (20 discoveries, 100 routers): the whole mesh
  from the routers' start until every host's routes.json lists every stack and every
  router's kernel routes every other stack; a new stack's join and failure detection
  as in the N=10 bench above.""",
    ),
]
SECTIONS.insert(
    next(i for i, s in enumerate(SECTIONS) if s[0] == "gossip-sim") + 1, SCALE_SECTIONS[0]
)
SECTIONS.append(SCALE_SECTIONS[1])
MAKE_TARGET["scale"] = "make bench-scale"
MAKE_TARGET["gossip-scale"] = "make bench-scale"


def _get(d, *path):
    for p in path:
        if isinstance(d, dict):
            d = d.get(p)
        elif isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d):
            d = d[p]
        else:
            return None
    return d


def gossip_scale_text(extra):
    """Per-N table of a `gossip-sim --scale` run and its trend to N=10,000."""
    runs = extra.get("runs") if isinstance(extra.get("runs"), list) else []
    if not runs:
        return []
    out = [
        "| Nodes | Stacks per node | Record (bytes) | Join after last start | Record update, median / max | Failure detection, median / max | Idle traffic per node, mean / busiest | Simulator peak RSS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        out.append(
            "| {} | {} | {} | {} ms | {} / {} ms | {} / {} ms | {} / {} kbit/s | {} MiB |".format(
                fmt(_get(r, "nodes")),
                fmt(_get(r, "stacks_per_node")),
                fmt(_get(r, "record_bytes")),
                fmt(_get(r, "join", "converged_ms_after_last_start")),
                fmt(_get(r, "record_update", "ms", "median")),
                fmt(_get(r, "record_update", "ms", "max")),
                fmt(_get(r, "failure_detection", "ms", "median")),
                fmt(_get(r, "failure_detection", "ms", "max")),
                fmt(_get(r, "idle", "kbit_s_mean")),
                fmt(_get(r, "idle", "kbit_s_max")),
                fmt(_get(r, "process_rss_mib", "peak")),
            )
        )
    t = extra.get("trend") if isinstance(extra.get("trend"), dict) else {}
    if t:
        parts = []
        for k, what, unit in [
            ("record_update_median_ms", "record update (median)", "ms"),
            ("record_update_max_ms", "record update (max)", "ms"),
            ("failure_detection_median_ms", "failure detection (median)", "ms"),
            ("idle_kbit_s_mean", "idle traffic per node (mean)", "kbit/s"),
            ("idle_kbit_s_max", "idle traffic, busiest node", "kbit/s"),
        ]:
            v = _get(t, k, "value")
            if isinstance(v, (int, float)):
                parts.append(f"{what} {fmt(v)} {unit}")
        held = _get(t, "records_held_per_host_mib", "value")
        if isinstance(held, (int, float)):
            parts.append(f"records held per host {fmt(held)} MiB")
        out += [
            "",
            "Extrapolated to N={} ({}; least squares over the runs above, log2 N for times and traffic, N² for the simulator's memory): {}.".format(
                fmt(t.get("at_nodes")), _get(t, "record_update_median_ms", "model") or "", "; ".join(parts)
            ),
        ]
    return out + [""]


def scale_text(extra):
    """Details of a vrt-scale-bench run beyond its figures."""
    out = []
    one = extra.get("one_host") if isinstance(extra.get("one_host"), dict) else {}
    if one.get("error"):
        out += [f"One-host part failed: {one['error']}", ""]
    elif one:
        h1 = one.get("host1") or {}
        d1 = one.get("discovery_host1") or {}
        cpu = one.get("idle_cpu") or {}
        out += [
            "One host with {} stacks (+1 added) and one with {}: every router's routes complete {} ms after the last router's start; {} cross-host pairs pinged, {} failed; {} same-host pairs sampled, {} failed.".format(
                fmt(one.get("stacks_host1")), fmt(one.get("stacks_host2")),
                fmt(one.get("all_routes_installed_ms_after_last_start")),
                fmt(one.get("cross_host_pairs")), fmt(len(one.get("cross_host_failed") or [])),
                fmt(one.get("same_host_pairs_sampled")), fmt(len(one.get("same_host_failed") or [])),
            ),
            "",
            "| On host 1 ({} local stacks, {} in the mesh) | Measured |".format(
                fmt((one.get("stacks_host1") or 0) + 1),
                fmt((one.get("stacks_host1") or 0) + 1 + (one.get("stacks_host2") or 0)),
            ),
            "|---|---|",
            f"| Discovery reconcile, idle (mean) | {fmt(d1.get('reconcile_idle_mean_ms'))} ms |",
            f"| Discovery reconcile while one stack registers (mean) | {fmt(d1.get('reconcile_during_extra_stack_mean_ms'))} ms |",
            f"| Discovery RSS (peak) | {fmt(d1.get('rss_mib'))} MiB ({fmt(d1.get('peak_rss_mib'))}) |",
            f"| Routers' RSS: median, sum of {fmt(_get(one, 'routers', 'count'))} | {fmt(_get(one, 'routers', 'rss_mib_median'))} MiB, {fmt(_get(one, 'routers', 'rss_mib_sum'))} MiB |",
            f"| Host routes of protocol 118 (steering tables) | {fmt(h1.get('host_routes_proto118'))} |",
            f"| Policy rules (iif) | {fmt(h1.get('host_rules_iif'))} |",
            f"| FDB rows with a destination on vxlan1000 | {fmt(h1.get('fdb_rows_with_dst'))} |",
            f"| Routes per router (protocol 118), median | {fmt(_get(one, 'routers', 'routes_proto118_median'))} |",
            f"| Permanent neighbours per router, median | {fmt(_get(one, 'routers', 'permanent_neighbours_median'))} |",
            f"| routes.json: rows, bytes | {fmt(h1.get('routes_json_rows'))}, {fmt(h1.get('routes_json_bytes'))} |",
            f"| discovery.json bytes | {fmt(h1.get('discovery_json_bytes'))} |",
            f"| CPU of all routers, idle (cores) | {fmt(cpu.get('routers_host1_cpu_share'))} |",
            f"| CPU of discovery, idle (cores) | {fmt(cpu.get('discovery_host1_cpu_share'))} |",
            "",
        ]
    hosts = extra.get("hosts") if isinstance(extra.get("hosts"), dict) else {}
    if hosts.get("error"):
        out += [f"Many-hosts part failed: {hosts['error']}", ""]
    elif hosts:
        jf = _get(hosts, "join_ms", "failed") or []
        df = _get(hosts, "failure_detection_ms", "failed") or []
        jv = _get(hosts, "join_ms", "values") or []
        dv = _get(hosts, "failure_detection_ms", "values") or []
        out += [
            "| {} hosts × {} stacks, gossip, real daemons | Measured |".format(
                fmt(hosts.get("hosts")), fmt(hosts.get("stacks_per_host"))
            ),
            "|---|---|",
            f"| Routers started → every host's routes.json lists every stack | {fmt((hosts.get('mesh_converged_ms') or math.nan) / 1000)} s |",
            f"| Routers started → every router's kernel routes every other stack | {fmt((hosts.get('kernel_routes_complete_ms') or math.nan) / 1000)} s |",
            f"| Idle gossip traffic per node, median (max) | {fmt(_get(hosts, 'idle_kbit_s_per_node', 'median'))} ({fmt(_get(hosts, 'idle_kbit_s_per_node', 'max'))}) kbit/s |",
            f"| Overlay probe requests per second, all routers (4 per remote router each) | {fmt(hosts.get('probe_requests_per_s_all_routers'))} |",
            f"| CPU of all routers, idle (cores of 2) | {fmt(hosts.get('routers_idle_cpu_cores'))} |",
            f"| Load average, idle | {fmt(hosts.get('load_average_idle'))} |",
            f"| Joins answered (median, max) | {len(jv)} of {len(jv) + len(jf)} ({fmt(_get(hosts, 'join_ms', 'median'))}, {fmt(_get(hosts, 'join_ms', 'max'))} ms); waited {fmt(_get(hosts, 'join_ms', 'wait_s'))} s each |",
            f"| Host cuts withdrawn everywhere (median, max) | {len(dv)} of {len(dv) + len(df)} ({fmt(_get(hosts, 'failure_detection_ms', 'median'))}, {fmt(_get(hosts, 'failure_detection_ms', 'max'))} ms) |",
            f"| `member_failed` events, all hosts (the cuts alone account for {fmt(len(dv) * ((hosts.get('hosts') or 1) - 1))}) | {fmt(hosts.get('member_failed_events_total'))} |",
            f"| Discovery RSS, median (max) | {fmt(_get(hosts, 'discovery_rss_mib', 'median'))} ({fmt(_get(hosts, 'discovery_rss_mib', 'max'))}) MiB |",
            "",
        ]
        if jf or df:
            out += ["Not answered: " + "; ".join(jf + df) + ".", ""]
    light = extra.get("hosts_one_stack_each") if isinstance(extra.get("hosts_one_stack_each"), dict) else {}
    if light.get("hosts"):
        out += [
            "The same {} hosts with {} stack each ({} routers, {} overlay probe requests a second; load average {}, routers' CPU {} cores): mesh complete {} s after the routers' start, join median {} ms (max {}), failure detection median {} ms (max {}), idle gossip {} kbit/s per node (max {}), {} `member_failed` events.".format(
                fmt(light.get("hosts")), fmt(light.get("stacks_per_host")),
                fmt((light.get("hosts") or 0) * (light.get("stacks_per_host") or 0)),
                fmt(light.get("probe_requests_per_s_all_routers")),
                fmt(light.get("load_average_idle")), fmt(light.get("routers_idle_cpu_cores")),
                fmt((light.get("kernel_routes_complete_ms") or math.nan) / 1000),
                fmt(_get(light, "join_ms", "median")), fmt(_get(light, "join_ms", "max")),
                fmt(_get(light, "failure_detection_ms", "median")), fmt(_get(light, "failure_detection_ms", "max")),
                fmt(_get(light, "idle_kbit_s_per_node", "median")), fmt(_get(light, "idle_kbit_s_per_node", "max")),
                fmt(light.get("member_failed_events_total")),
            ),
            "",
        ]
    return out


def max_stacks_section(docs):
    """## Maximum number of interconnected stacks: limits from scale.json and
    gossip-scale.json (measured), projections (estimated)."""
    out = ["", "## Maximum number of interconnected stacks", ""]
    sc = (docs.get("scale") or {}).get("extra") or {}
    gs = (docs.get("gossip-scale") or {}).get("extra") or {}
    if not sc and not gs:
        return out + ["*Not in this run: target/bench/scale.json and gossip-scale.json are missing (run `make bench-scale`).*"]
    out += [
        "All stacks on one VNI, so every stack routes every other (the worst case: stacks on",
        "different VNIs do not route each other and cost nothing of the below). **Measured**",
        "rows come from the runs above; **estimated** rows scale them by the formula shown.",
        "",
    ]
    rl = sc.get("record_limits") or {}
    shapes = rl.get("shapes") or []
    if shapes:
        out += [
            "### Per host: the gossip record",
            "",
            "A host announces its stacks in one gossip record of at most {} bytes ({} of fixed overhead); a stack that does not fit is refused on its host (`record_full`). What one stack costs depends on its name and prefixes (record.rs `stack_cost`, computed by the bench):".format(
                fmt(rl.get("max_record_bytes")), fmt(rl.get("record_overhead_bytes"))
            ),
            "",
            "| Stack name | Prefixes | Bytes per stack | Stacks per host at most |",
            "|---|---|---|---|",
        ]
        for s in shapes:
            out.append(
                f"| {fmt(s.get('name_chars'))} characters | {fmt(s.get('prefixes'))} | {fmt(s.get('bytes_per_stack'))} | **{fmt(s.get('max_stacks_per_host'))}** |"
            )
        out.append("")
    pr = sc.get("projections") if isinstance(sc.get("projections"), list) else []
    one = sc.get("one_host") if isinstance(sc.get("one_host"), dict) else {}
    if pr and one.get("host1"):
        h1 = one["host1"]
        l = (one.get("stacks_host1") or 0) + 1
        s_all = l + (one.get("stacks_host2") or 0)
        out += [
            "### Per host and per router: kernel entries, state files, probes",
            "",
            f"Measured at {fmt(l)} local stacks in a mesh of {fmt(s_all)}; estimated for larger meshes from the per-entry figures (basis in the last rows).",
            "",
            "| Grows with | Measured ({} local, {} total) | {} |".format(
                fmt(l), fmt(s_all),
                " | ".join(f"Estimated: {fmt(p.get('stacks_total'))} stacks, {fmt(p.get('stacks_per_host'))} per host" for p in pr),
            ),
            "|---|---|" + "---|" * len(pr),
        ]
        rows = [
            ("Host routes in steering tables (local × (total − 1))", h1.get("host_routes_proto118"), "host_routes"),
            ("routes.json rows (local × (total − 1))", h1.get("routes_json_rows"), "routes_json_rows"),
            ("routes.json size, MiB (rewritten on every change)", (h1.get("routes_json_bytes") or 0) / 1048576, "routes_json_mib"),
            ("discovery.json size, MiB (total stacks)", (h1.get("discovery_json_bytes") or 0) / 1048576, "discovery_json_mib"),
            ("Routes per router (total − 1)", _get(one, "routers", "routes_proto118_median"), "router_routes_each"),
            ("Permanent neighbours per router (total − 1)", _get(one, "routers", "permanent_neighbours_median"), "router_neighbours_each"),
            ("FDB rows on the VXLAN device (remote routers + hosts)", h1.get("fdb_rows_with_dst"), "fdb_rows"),
            ("Probe requests per second sent by a host's routers (local × min(4 × remote, 1,000))", _get(one, "idle_cpu", "probe_requests_per_s_host1_routers"), "probe_requests_per_s_per_host"),
            ("Probe interval per remote router, s (remote / 1,000, at least 0.25)", None, "probe_interval_s_per_peer"),
        ]
        for what, measured, key in rows:
            out.append(
                "| {} | {} | {} |".format(what, fmt(measured), " | ".join(fmt(p.get(key)) for p in pr))
            )
        b = pr[0].get("basis") or {}
        out += [
            "",
            "Basis: {} bytes per routes.json row, {} host routes per (local, remote) pair, {} discovery.json bytes per stack.".format(
                fmt(b.get("routes_json_bytes_per_row")),
                fmt(b.get("host_routes_per_local_remote_pair")),
                fmt(b.get("discovery_json_bytes_per_stack")),
            ),
            "",
        ]
    runs = gs.get("runs") if isinstance(gs.get("runs"), list) else []
    t = gs.get("trend") if isinstance(gs.get("trend"), dict) else {}
    if runs:
        big = max(runs, key=lambda r: r.get("nodes") or 0)
        out += [
            "### Hosts: gossip",
            "",
            "Measured on the simulator up to N={} hosts of {} stacks each: record update median {} ms (max {}), failure detection median {} ms, idle {} kbit/s per node (busiest {}). Extrapolated to N={}: update {} ms, failure detection {} ms, idle {} kbit/s (busiest {}); each host would hold {} MiB of other hosts' records. `Params::max_members` caps a mesh at {} other hosts.".format(
                fmt(big.get("nodes")), fmt(big.get("stacks_per_node")),
                fmt(_get(big, "record_update", "ms", "median")), fmt(_get(big, "record_update", "ms", "max")),
                fmt(_get(big, "failure_detection", "ms", "median")),
                fmt(_get(big, "idle", "kbit_s_mean")), fmt(_get(big, "idle", "kbit_s_max")),
                fmt(t.get("at_nodes")),
                fmt(_get(t, "record_update_median_ms", "value")),
                fmt(_get(t, "failure_detection_median_ms", "value")),
                fmt(_get(t, "idle_kbit_s_mean", "value")), fmt(_get(t, "idle_kbit_s_max", "value")),
                fmt(_get(t, "records_held_per_host_mib", "value")),
                fmt(_get(gs, "params", "max_members")),
            ),
            "",
        ]
    out += ["### Answer", ""] + max_stacks_answer(docs)
    return out


def max_stacks_answer(docs):
    """The answer as numbers, each from the JSON (measured) or a projection of it."""
    sc = (docs.get("scale") or {}).get("extra") or {}
    gs = (docs.get("gossip-scale") or {}).get("extra") or {}
    ctl = {f["key"]: f for f in (docs.get("control") or {}).get("figures") or []}
    out = []
    shapes = {(s.get("name_chars"), s.get("prefixes")): s for s in _get(sc, "record_limits", "shapes") or []}
    one = sc.get("one_host") if isinstance(sc.get("one_host"), dict) else {}
    hosts = sc.get("hosts") if isinstance(sc.get("hosts"), dict) else {}
    if shapes:
        a, b, c = (shapes.get(k) or {} for k in [(64, 4), (64, 1), (16, 1)])
        out.append(
            "**Stacks per host: at most {} with 64-character names and 4 prefixes each, {} with 64-character names and 1 prefix, {} with 16-character names and 1 prefix** (the {}-byte gossip record; static mode has no such limit).".format(
                fmt(a.get("max_stacks_per_host")), fmt(b.get("max_stacks_per_host")),
                fmt(c.get("max_stacks_per_host")), fmt(_get(sc, "record_limits", "max_record_bytes")),
            )
        )
    if one.get("host1"):
        out.append(
            "Measured with real daemons: {} stacks on one host and {} on another, all reachable across the hosts ({} pairs, {} failed); every router's routes complete {} s after the last router's start; discovery reconciles in {} ms idle and {} ms while a stack registers, at {} MiB RSS.".format(
                fmt((one.get("stacks_host1") or 0) + 1), fmt(one.get("stacks_host2")),
                fmt(one.get("cross_host_pairs")), fmt(len(one.get("cross_host_failed") or [])),
                fmt((one.get("all_routes_installed_ms_after_last_start") or math.nan) / 1000),
                fmt(_get(one, "discovery_host1", "reconcile_idle_mean_ms")),
                fmt(_get(one, "discovery_host1", "reconcile_during_extra_stack_mean_ms")),
                fmt(_get(one, "discovery_host1", "rss_mib")),
            )
        )
    if hosts.get("hosts"):
        jf = _get(hosts, "join_ms", "failed") or []
        jv = _get(hosts, "join_ms", "values") or []
        out.append(
            "Measured with real daemons: {} hosts × {} stacks with gossip on this 2-vCPU machine: mesh complete {} s after the routers' start, {} of {} joins answered (median {} ms), failure detection {} ms (median). All {} routers run on the same 2 vCPUs and send {} overlay probe requests a second (load average {}); on real hosts each would carry a twentieth of that.".format(
                fmt(hosts.get("hosts")), fmt(hosts.get("stacks_per_host")),
                fmt((hosts.get("kernel_routes_complete_ms") or math.nan) / 1000),
                len(jv), len(jv) + len(jf),
                fmt(_get(hosts, "join_ms", "median")), fmt(_get(hosts, "failure_detection_ms", "median")),
                fmt((hosts.get("hosts") or 0) * (hosts.get("stacks_per_host") or 0)),
                fmt(hosts.get("probe_requests_per_s_all_routers")),
                fmt(hosts.get("load_average_idle")),
            )
        )
        out.append(
            "**Idle gossip traffic of real daemons: {} kbit/s per node at {} hosts, over the 10 kbit/s goal** that the simulator meets (about 5): the simulator runs SWIM only, while real discoveries also send path probes (issue 17: one a second to each candidate address of every peer that shares a VNI or offers relaying, up to 256 peers, each answered), so idle traffic grows with the peers that share a VNI.".format(
                fmt(_get(hosts, "idle_kbit_s_per_node", "median")), fmt(hosts.get("hosts")),
            )
        )
    t = gs.get("trend") if isinstance(gs.get("trend"), dict) else {}
    if t:
        goals = [
            ("record update ≤ 3 s", _get(t, "record_update_max_ms", "value"), 3000),
            ("failure detection ≤ 3 s (median)", _get(t, "failure_detection_median_ms", "value"), 3000),
            ("idle ≤ 10 kbit/s per node", _get(t, "idle_kbit_s_mean", "value"), 10),
        ]
        missed = [g for g, v, lim in goals if not (isinstance(v, (int, float)) and v <= lim)]
        verdict = (
            "all goals met at that size"
            if not missed
            else "goals missed at that size: " + ", ".join(missed)
        )
        out.append(
            "**Hosts per mesh: {} estimated** ({}): a record update reaches all in {} ms, failure detection {} ms, idle traffic {} kbit/s per node (busiest {}), {} MiB of records held per host, extrapolated from the simulator; the hard cap is {} other hosts (`max_members`).".format(
                fmt(t.get("at_nodes")),
                verdict,
                fmt(_get(t, "record_update_median_ms", "value")),
                fmt(_get(t, "failure_detection_median_ms", "value")),
                fmt(_get(t, "idle_kbit_s_mean", "value")), fmt(_get(t, "idle_kbit_s_max", "value")),
                fmt(_get(t, "records_held_per_host_mib", "value")),
                fmt(_get(gs, "params", "max_members")),
            )
        )
    pr = {(p.get("stacks_total"), p.get("stacks_per_host")): p for p in sc.get("projections") or []}
    row_bytes = _get((sc.get("projections") or [{}])[0], "basis", "routes_json_bytes_per_row")
    # vrouter_state::store::MAX_STATE_FILE_BYTES (older scale.json files do not carry it).
    cap = _get(sc, "record_limits", "max_state_file_bytes") or 64 * 1048576
    if isinstance(row_bytes, (int, float)) and row_bytes > 0:
        rows_max = cap / row_bytes
        out.append(
            "**routes.json caps the stacks on one host times the stacks in the mesh**: readers refuse a state file over {} MiB, and routes.json holds one row of about {} bytes per (local stack, other stack) pair on a VNI, so local × (total − 1) ≤ {} rows: at 100 stacks per host at most {} stacks in the mesh, at 10 per host {}, at 1 per host {} (estimated from the measured row size).".format(
                fmt(cap / 1048576), fmt(row_bytes), fmt(math.floor(rows_max)),
                fmt(math.floor(rows_max / 100) + 1), fmt(math.floor(rows_max / 10) + 1),
                fmt(math.floor(rows_max) + 1),
            )
        )
    p10 = pr.get((10000, 10)) or {}
    p100 = pr.get((10000, 100)) or {}
    r10k = ctl.get("control.reconcile.10k") or {}
    if p10 or p100:
        out.append(
            "**Interconnected stacks on one VNI: about 10,000 (estimated)**: every router then holds {} routes and {} neighbours (a router installs 10,000 routes in {} ms, `control.reconcile.10k`) and probes each remote router every {} s (1,000 requests/s per router). Per host the cost grows with local × total: at 10 stacks per host (1,000 hosts) routes.json has {} rows ({} MiB) and the host {} steering routes; at 100 per host (100 hosts) {} rows ({} MiB{}) and {} steering routes, and its routers would send {} probe requests/s.".format(
                fmt((p10 or p100).get("router_routes_each")), fmt((p10 or p100).get("router_neighbours_each")),
                fmt(r10k.get("median")), fmt((p10 or p100).get("probe_interval_s_per_peer")),
                fmt(p10.get("routes_json_rows")), fmt(p10.get("routes_json_mib")), fmt(p10.get("host_routes")),
                fmt(p100.get("routes_json_rows")), fmt(p100.get("routes_json_mib")),
                (", over the {} MiB cap: not possible".format(fmt(cap / 1048576))
                 if (p100.get("routes_json_mib") or 0) * 1048576 > cap else ", rewritten on every change"),
                fmt(p100.get("host_routes")),
                fmt(p100.get("probe_requests_per_s_per_host")),
            )
        )
    return out



def fmt(v):
    """A number for the tables: thousands separators, precision by magnitude."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return "n/a"
    if not math.isfinite(v):
        return "n/a"
    if float(v).is_integer():
        return f"{int(v):,}"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def num(v):
    """A JSON number as float, None (null, the writers' infinity/NaN) as NaN."""
    if v is None:
        return math.nan
    return float(v)


def target_text(t, unit):
    if t is None:
        return "—"
    if "at_most" in t:
        return f"≤ {fmt(t['at_most'])} {unit}"
    if "at_least" in t:
        return f"≥ {fmt(t['at_least'])} {unit}"
    raise BadInput(f"target {t!r}: expected at_most or at_least")


def target_met(f):
    """Whether a figure met its target (None without a target). The writer's "met" is
    checked against the median, so a hand-edited file cannot claim a target."""
    t = f.get("target")
    if t is None:
        return None
    m = num(f.get("median"))
    if math.isnan(m):
        computed = False
    elif "at_most" in t:
        computed = m <= float(t["at_most"])
    elif "at_least" in t:
        computed = m >= float(t["at_least"])
    else:
        raise BadInput(f"{f['key']}: target {t!r}: expected at_most or at_least")
    if "met" in f and bool(f["met"]) != computed:
        raise BadInput(
            f"{f['key']}: met={f['met']} but median {f.get('median')} vs target {t} says {computed}"
        )
    return computed


def met_text(f):
    m = target_met(f)
    if m is None:
        return "—"
    return "✅ met" if m else "❌ MISSED"


def load(path):
    """One results file, checked against the schema."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: expected a JSON object")
    for k in ("bench", "command", "machine", "figures"):
        if k not in doc:
            raise BadInput(
                f"{path}: no {k!r}: not a tests/src/bench.rs results file "
                "(written by write_results)"
            )
    if not isinstance(doc["figures"], list):
        raise BadInput(f"{path}: 'figures' must be a list")
    for i, f in enumerate(doc["figures"]):
        for k in ("key", "label", "unit", "samples", "median", "min", "max"):
            if not isinstance(f, dict) or k not in f:
                raise BadInput(f"{path}: figure {i}: no {k!r}")
        if not isinstance(f["samples"], list):
            raise BadInput(f"{path}: figure {f['key']}: 'samples' must be a list")
        try:
            target_met(f)
        except BadInput as e:
            raise BadInput(f"{path}: {e}") from e
        except (TypeError, ValueError) as e:
            raise BadInput(f"{path}: figure {f['key']}: bad number: {e}") from e
    return doc


def read_dir(d):
    """{stem: doc} for every *.json in d."""
    if not os.path.isdir(d):
        raise BadInput(f"{d}: no such directory (run `make bench` first)")
    out = {}
    for name in sorted(os.listdir(d)):
        # *-series.json are time series (vrt-soak --series), not results files.
        if name.endswith(".json") and not name.endswith("-series.json"):
            out[name[: -len(".json")]] = load(os.path.join(d, name))
    return out


def when(unix):
    if not unix:
        return "unknown"
    t = datetime.datetime.fromtimestamp(int(unix), tz=datetime.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M UTC")


def figures_table(doc):
    rows = [
        "| Figure | Key | Median | Unit | Spread (min–max) | Samples | Target | Met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in doc["figures"]:
        spread = "—"
        s = f.get("spread")
        if len(f["samples"]) > 1:
            spread = f"{fmt(f['min'])}–{fmt(f['max'])}"
            if isinstance(s, (int, float)) and math.isfinite(s):
                spread += f" ({s * 100:.0f} %)"
        rows.append(
            "| {} | `{}` | {} | {} | {} | {} | {} | {} |".format(
                f["label"].replace("|", "\\|"),
                f["key"],
                fmt(f["median"]),
                f["unit"],
                spread,
                len(f["samples"]),
                target_text(f.get("target"), f["unit"]),
                met_text(f),
            )
        )
    return rows


def machine_table(docs):
    rows = [
        "| Results | CPUs | CPU model | Memory | Kernel | Commit | Date |",
        "|---|---|---|---|---|---|---|",
    ]
    for stem, doc in docs.items():
        m = doc.get("machine") or {}
        rows.append(
            "| {}.json | {} | {} | {} GiB | {} | `{}` | {} |".format(
                stem,
                m.get("cpus", "?"),
                m.get("cpu_model") or "?",
                fmt(m.get("mem_gib")),
                m.get("kernel") or "?",
                m.get("commit") or "?",
                when(m.get("unix_time")),
            )
        )
    return rows


def params_text(docs):
    sim = docs.get("gossip-sim")
    params = (sim or {}).get("extra") or {}
    params = params.get("params") if isinstance(params, dict) else None
    if not isinstance(params, dict):
        return (
            "One parameter set serves every figure, the daemon and the tests: "
            "`vrouter_gossip::Params::default()` (crates/vrouter-gossip/src/node.rs)."
        )
    parts = [t.format(fmt(params[k])) for k, t in PARAM_TEXT if k in params]
    return (
        "One parameter set serves every figure, the daemon and the tests: "
        "`vrouter_gossip::Params::default()` (as gossip-sim.json records it): "
        + ", ".join(parts)
        + "."
    )


def fuzz_text(extra):
    """Inputs that reached each message type in the node, and the crashes found."""
    rep = extra.get("report") if isinstance(extra.get("report"), dict) else {}
    reached = rep.get("reached") if isinstance(rep.get("reached"), dict) else {}
    kinds = extra.get("kinds") if isinstance(extra.get("kinds"), list) else []
    out = []
    if "seconds" in rep:
        out += [
            f"{fmt(rep.get('executions'))} inputs in {fmt(rep['seconds'])} s, "
            f"{fmt(rep.get('crashes'))} crashes"
            + (", overflow checks on." if extra.get("overflow_checks") else "."),
            "",
        ]
    if kinds:
        out += [
            "| Message type | Reached the node | Refused by validation |",
            "|---|---|---|",
        ]
        for k in kinds:
            out.append(
                f"| `{k}` | {fmt(reached.get(f'node.{k}', 0))} "
                f"| {fmt(reached.get(f'node.{k}.refused', 0))} |"
            )
        out.append(f"| undecodable | {fmt(reached.get('node.undecodable', 0))} | — |")
        out.append("")
    for c in rep.get("crash_inputs") or []:
        msg = str(c.get("message", "")).replace("\n", " ")
        out.append(f"- crash in `{c.get('target')}`: {msg} (input `{str(c.get('input_hex', ''))[:200]}`)")
    if rep.get("crash_inputs"):
        out.append("")
    return out


def pct(v):
    return f"{v * 100:.1f} %" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def relay_text(extra):
    """The relay bench's rounds: which relay each host used, the failover's hosts and
    what the relays forwarded during the relayed measurement, from the JSON's extra."""
    out = []
    if extra.get("build") == "debug":
        out += [
            "*Debug build: the bench and the daemons were built without optimisation (the "
            "forwarding itself is the kernel's); `make bench-relay` runs the release build.*",
            "",
        ]
    notes = extra.get("machine_notes") if isinstance(extra.get("machine_notes"), dict) else {}
    if notes.get("load_before") or notes.get("load_after"):
        out += [
            f"Machine load (1, 5, 15 min) at the start: {notes.get('load_before', '?')}, "
            f"at the end: {notes.get('load_after', '?')}.",
            "",
        ]
    hosts = extra.get("hosts") if isinstance(extra.get("hosts"), dict) else {}
    underlay = hosts.get("underlay") if isinstance(hosts.get("underlay"), list) else []
    if underlay:
        out += [
            "Underlay addresses: "
            + ", ".join(f"host {i + 1} {a}" for i, a in enumerate(underlay))
            + f"; path probes every {fmt(extra.get('path_probe_ms'))} ms, a path dead after "
            f"{fmt(extra.get('path_dead_ms'))} ms.",
            "",
        ]
    rounds = extra.get("round_log") if isinstance(extra.get("round_log"), list) else []
    if rounds:
        out += [
            "| Round | Order | Relay 1→2 | Relay 2→1 | Failover | Relayed packets (relayed run) |",
            "|---|---|---|---|---|---|",
        ]
        for r in rounds:
            if not isinstance(r, dict):
                continue
            order = r.get("order") if isinstance(r.get("order"), list) else []
            out.append(
                f"| {r.get('round')} | {', '.join(map(str, order)) or '—'} | "
                f"{r.get('relay_1_to_2', '?')} | {r.get('relay_2_to_1', '?')} | "
                f"host {r.get('failover_from_host', '?')} → host {r.get('failover_to_host', '?')} | "
                f"{fmt(r.get('relayed_packets_during_measurement'))} |"
            )
        out.append("")
    if extra.get("method"):
        out += [f"Method: {extra['method']}.", ""]
    return out


def chaos_text(extra):
    """The chaos run's kills and crash points, from the JSON's extra."""
    fired = extra.get("points_fired") or []
    missed = extra.get("points_not_reached") or []
    unreachable = extra.get("points_unreachable_here") or []
    out = [
        f"{extra.get('discovery_kills', '?')} discovery kills, "
        f"{extra.get('router_kills', '?')} router kills, "
        f"{len(fired)} crash points fired (seed {extra.get('seed', '?')}, "
        f"{extra.get('duration_s', '?')} s).",
    ]
    if missed:
        out.append("Not reached: " + ", ".join(f"`{p}`" for p in missed) + ".")
    for u in unreachable:
        if isinstance(u, dict):
            out.append(f"`{u.get('point')}` is not crashed at here: {u.get('why')}.")
    return out + [""]


def encryption_text(extra):
    """The encryption bench's notes: kernel WireGuard, the goal, knobs, the CPU per
    path and the perf breakdown, all from the JSON's extra."""
    out = []
    notes = extra.get("machine_notes") if isinstance(extra.get("machine_notes"), dict) else {}
    if notes.get("load_before") or notes.get("load_after"):
        out += [
            f"Machine load (1, 5, 15 min) at the start: {notes.get('load_before', '?')}, "
            f"at the end: {notes.get('load_after', '?')}.",
            "",
        ]
    k = extra.get("kernel_wireguard") if isinstance(extra.get("kernel_wireguard"), dict) else {}
    if k:
        this = k.get("this_kernel") if isinstance(k.get("this_kernel"), dict) else {}
        out.append(
            "**Kernel WireGuard: not measured.** "
            + (f"This kernel: {str(this.get('detail')).rstrip('.')}. " if this.get("detail") else "")
            + str(k.get("expected", ""))
        )
        out.append("")
        for src in k.get("sources") or []:
            if isinstance(src, dict):
                out.append(f"- <{src.get('url')}>: {src.get('says')}.")
        out.append("")
    knobs = extra.get("knobs") if isinstance(extra.get("knobs"), dict) else {}
    if knobs:
        out += ["Knobs of the userspace engine:", ""]
        out += [f"- `{name}`: {text}." for name, text in knobs.items()]
        out.append("")
    cpu = extra.get("cpu") if isinstance(extra.get("cpu"), list) else []
    if cpu:
        out += [
            "CPU over the middle of one single-stream transfer per path (1.0 = one CPU; the "
            "machine's busy share counts all CPUs):",
            "",
            "| Path | Single stream | Discovery threads, CPUs | CPU s per Gbit | Machine busy | Busiest threads |",
            "|---|---|---|---|---|---|",
        ]
        for c in cpu:
            threads = [
                f"{t.get('process')} {t.get('thread')} {fmt(t.get('of_one_cpu'))}"
                for t in (c.get("threads") or [])[:4]
                if isinstance(t, dict)
            ]
            out.append(
                f"| {c.get('path')} | {fmt(c.get('tcp1_mbit'))} Mbit/s | "
                f"{fmt(c.get('discovery_cpu_of_one_cpu'))} | {fmt(c.get('discovery_cpu_s_per_gbit'))} | "
                f"{pct(c.get('machine_busy'))} | {', '.join(threads) or '—'} |"
            )
        out.append("")
    b = extra.get("breakdown") if isinstance(extra.get("breakdown"), dict) else {}
    if b.get("error"):
        out += [f"*No perf profile in this run: {b['error']}*", ""]
    elif b:
        both = b.get("both") if isinstance(b.get("both"), dict) else {}
        out += [
            f"Where the userspace path spends its CPU (`breakdown`): {fmt(both.get('samples'))} "
            f"perf samples on both discoveries during a single-stream transfer on "
            f"`{b.get('path')}` ({fmt(b.get('tcp1_mbit_during_perf'))} Mbit/s under perf). "
            f"Method: {b.get('method', '?')}.",
            "",
            "| Category | Share | Sender | Receiver |",
            "|---|---|---|---|",
        ]
        per = b.get("per_process") if isinstance(b.get("per_process"), dict) else {}

        def share_in(doc, cat):
            for c in (doc or {}).get("by_category") or []:
                if c.get("category") == cat:
                    return c.get("share")
            return 0.0

        for c in both.get("by_category") or []:
            cat = c.get("category")
            out.append(
                f"| {cat} | {pct(c.get('share'))} | {pct(share_in(per.get('sender'), cat))} "
                f"| {pct(share_in(per.get('receiver'), cat))} |"
            )
        out += ["", "| Thread | Share of samples |", "|---|---|"]
        for t in (both.get("by_thread") or [])[:6]:
            out.append(f"| {t.get('thread')} | {pct(t.get('share'))} |")
        out += ["", "| Leaf symbol | Object | Share |", "|---|---|---|"]
        for t in (both.get("top_symbols") or [])[:15]:
            sym = str(t.get("symbol", "")).replace("|", "\\|")
            if len(sym) > 90:
                sym = sym[:87] + "..."
            out.append(f"| `{sym}` | {t.get('object')} | {pct(t.get('share'))} |")
        if extra.get("discovery_binary_has_symbols") is False:
            out += [
                "",
                "*The profiled discovery had no symbol table (a stripped release build): its "
                "userspace samples are unresolved. `make bench-encryption` profiles the "
                "release-sym build.*",
            ]
        out.append("")
    return out


def render(docs, in_dir, md_path, png_path, raw_links, chart_panels, soak_png=None):
    """The markdown page. raw_links: {stem: path relative to the page} or {}."""
    md_dir = os.path.dirname(os.path.abspath(md_path))
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by tests/bench-report.py from target/bench/*.json: do not edit by",
        "     hand. Regenerate with `make bench` or `make bench-report`. -->",
        "",
        f"This page is generated by `tests/bench-report.py` from the raw results in "
        f"`{in_dir}/*.json`; do not edit it by hand. To regenerate: {REGENERATE}.",
        "Every number below comes from those files: the median of the samples, their "
        "range, the number of samples, and the target the issue sets, where it sets one.",
    ]
    if raw_links:
        out.append(
            "The raw JSON of this run is kept beside the page: "
            + ", ".join(f"[{s}.json]({p})" for s, p in raw_links.items())
            + "."
        )
    out += ["", "## Machine", ""]
    if docs:
        out += machine_table(docs)
    else:
        out.append(f"No results: `{in_dir}` holds no *.json.")
    if chart_panels:
        rel = os.path.relpath(os.path.abspath(png_path), md_dir)
        out += ["", f"![{' and '.join(chart_panels)}]({rel})"]
    known = {stem for stem, _, _ in SECTIONS} | {SOAK_STEM}
    sections = [(s, t, p) for s, t, p in SECTIONS]
    sections += [(s, f"`{s}`", None) for s in docs if s not in known]
    gossip_intro_done = False
    for stem, title, prose in sections:
        if stem.startswith("gossip-") and stem in known:
            # The gossip benches share one section: the parameters, then one per bench.
            if not gossip_intro_done:
                out += ["", "## Gossip mesh", "", params_text(docs), GOSSIP_INTRO]
                gossip_intro_done = True
            out += ["", f"### {title}", ""]
        else:
            out += ["", f"## {title}", ""]
        if prose:
            out += [prose, ""]
        doc = docs.get(stem)
        if doc is None:
            how = MAKE_TARGET.get(stem, "make bench")
            out.append(f"*Not in this run: `{in_dir}/{stem}.json` is missing (run `{how}`).*")
            continue
        out += ["```sh", doc["command"], "```", ""]
        extra = doc.get("extra") if isinstance(doc.get("extra"), dict) else {}
        if isinstance(extra.get("docker_engine"), str):
            out += [f"Docker Engine {extra['docker_engine']}.", ""]
        if isinstance(extra.get("flannel_under_firewall_answers_ping"), bool):
            answered = extra["flannel_under_firewall_answers_ping"]
            out += [
                "With the Docker-like firewall loaded, the Flannel-style path "
                + ("answered a ping." if answered else "answered no ping (3 tries).")
                + " The overlay under the same firewall is `overlay_fw`.",
                "",
            ]
        if stem == "fuzz":
            out += fuzz_text(extra)
        if stem == "encryption":
            out += encryption_text(extra)
        if stem == "relay":
            out += relay_text(extra)
        if stem == "gossip-scale":
            out += gossip_scale_text(extra)
        if stem == "scale":
            out += scale_text(extra)
        if stem == "chaos":
            out += chaos_text(extra)
        if doc["figures"]:
            out += figures_table(doc)
        else:
            out.append("*The file holds no figures.*")
        if stem in raw_links:
            out += ["", f"Raw: [{stem}.json]({raw_links[stem]})."]
    if "scale" in docs or "gossip-scale" in docs:
        out += max_stacks_section(docs)
    out += soak_section(docs, md_dir, raw_links, soak_png)
    return "\n".join(out) + "\n"


# ---- soak (`make soak`, vrt-soak) ----

SOAK_STEM = "soak"

SOAK_PROSE = """\
`make soak` (not in `make bench`, not in CI; `SOAK_SECONDS`, default 3600) runs
`vrt-soak` on five simulated hosts joined by gossip, every discovery with userspace
WireGuard (`VROUTER_ENCRYPTION=require`) and port steering, stack `c1` under a
deny-by-default ACL that lets pings in. Each host has a core stack `cN` (always up but
for router restarts) and a churn stack `xN`. Seeded churn (the seed is in the command):
a churn stack goes (`compose down`: its router stopped, 1 in 5 by kill -9) or comes back
every 3-8 s; every few minutes a host is cut off for 15-30 s (underlay link down or a
partition) and healed; every 40-90 s a discovery of hosts 3-5 restarts (SIGTERM or
kill -9, down for up to 3 s); every 20-45 s a router other than `c1` and `c2` restarts (SIGTERM or kill -9; 1 in 4 in a fresh
network namespace, as `docker restart` does). Meanwhile every pair of
live stacks is pinged over and over (3 echo requests within 2 s; ok if one answers).

A failed check is explained when it overlaps a churn window that touches one of its
ends (a stack down or restarting, its host cut off or its discovery restarting), plus a
settle time after the window closes (failure detection + 2 s after a restart or a
stack's return, 15 s after a heal). The verdict wants no unexplained failure. Every 10 s
the run samples each daemon's RSS and open descriptors (per host and role, across
restarts), events per kind, drift repairs, and the counts of probes files, events.log
size, FDB rows, neighbours, nexthops, routes, nftables elements, conntrack entries and
gossip members, each beside what is live. Leak verdict, on every daemon with one
instance alive for at least 40 % of the run (always the discoveries of hosts 1 and 2 and
the routers of `c1` and `c2`, never restarted): RSS growth over the second half of that
instance (linear fit) under 1 MiB/h; descriptors: the last quarter's median at most one
above the second quarter's; kernel objects, probes files and gossip records: their peak
may grow from the first half to the second at most 1.25 times as much as the peak of
what is live (stacks, or stacks x live hosts). Recovery figures: per outage of a pair,
from the end of the churn that explains it to the first passing check (an upper bound:
checks of a pair come every few seconds)."""


def soak_verdict_text(extra):
    v = extra.get("verdict") if isinstance(extra.get("verdict"), dict) else {}
    if not v:
        return []
    minutes = (v.get("seconds") or 0) / 60
    churn = v.get("churn") if isinstance(v.get("churn"), dict) else {}
    churn_text = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(churn.items()))
    return [
        f"Verdict: **{'met' if v.get('ok') else 'NOT met'}** over {fmt(minutes)} minutes "
        f"(seed {extra.get('seed')}): {v.get('checks')} checks, {v.get('failed_checks')} failed, "
        f"{v.get('failed_checks_unexplained')} unexplained; longest outage of a pair "
        f"{fmt(v.get('longest_window_s'))} s. Churn: {churn_text or 'none'}.",
        "",
    ]


def soak_section(docs, md_dir, raw_links, soak_png):
    """The soak section, only when soak.json exists."""
    doc = docs.get(SOAK_STEM)
    if doc is None:
        return []
    out = ["", "## An hour of churn (`make soak`)", "", SOAK_PROSE, ""]
    out += ["```sh", doc["command"], "```", ""]
    extra = doc.get("extra") if isinstance(doc.get("extra"), dict) else {}
    out += soak_verdict_text(extra)
    if soak_png and os.path.exists(soak_png):
        rel = os.path.relpath(os.path.abspath(soak_png), md_dir)
        out += [f"![soak series: RSS, descriptors, events, failed checks, kernel objects]({rel})", ""]
    if doc["figures"]:
        out += figures_table(doc)
    if SOAK_STEM in raw_links:
        out += ["", f"Raw: [{SOAK_STEM}.json]({raw_links[SOAK_STEM]})."]
    return out


def draw_soak_chart(series_path, png_path):
    """Draws the soak time series (vrt-soak --series) into png_path; False if absent."""
    if not os.path.exists(series_path):
        return False
    with open(series_path, encoding="utf-8") as fh:
        ser = json.load(fh)
    samples = ser.get("samples") or []
    if not samples:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mins = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 2, figsize=(14, 12), squeeze=False)
    (ax_rss, ax_fd), (ax_ev, ax_fail), (ax_k, ax_kr) = axes

    def shade(ax):
        for w in ser.get("windows", []):
            if w.get("kind") in ("host_cut", "partition") and w.get("end") is not None:
                ax.axvspan(w["start"] / 60, w["end"] / 60, color="orange", alpha=0.12, lw=0)

    keys = sorted({k for s in samples for k in (s.get("daemons") or {})})
    for k in keys:
        xs = [m for m, s in zip(mins, samples) if k in (s.get("daemons") or {})]
        rss = [s["daemons"][k]["rss_mib"] for s in samples if k in (s.get("daemons") or {})]
        fds = [s["daemons"][k]["fds"] for s in samples if k in (s.get("daemons") or {})]
        style = "-" if k.endswith("/discovery") else ":"
        ax_rss.plot(xs, rss, style, lw=1, label=k)
        ax_fd.plot(xs, fds, style, lw=1, label=k)
    ax_rss.set_title("RSS per daemon (solid: discovery, dotted: routers)")
    ax_rss.set_ylabel("MiB")
    ax_fd.set_title("Open descriptors per daemon")
    ax_fd.set_ylabel("fds")
    ax_rss.legend(fontsize="x-small", ncol=3)

    kinds = sorted({k for s in samples for k in (s.get("events") or {})})
    for k in kinds:
        ax_ev.plot(mins, [(s.get("events") or {}).get(k, 0) for s in samples], lw=1, label=k)
    ax_ev.set_title("Events per kind (cumulative, all hosts)")
    ax_ev.set_yscale("symlog")
    ax_ev.set_ylim(bottom=0)
    ax_ev.legend(fontsize="x-small", ncol=2)

    failed = sorted(ser.get("failed_checks") or [], key=lambda f: f["t0"])
    fx = [f["t0"] / 60 for f in failed]
    ax_fail.step(fx, range(1, len(fx) + 1), where="post", label="failed checks (explained)")
    un = [f["t0"] / 60 for f in failed if f.get("explained_by") == "unexplained"]
    ax_fail.step(un, range(1, len(un) + 1), where="post", color="red", label="unexplained")
    ax_fail.plot(mins, [s.get("drift_repairs", 0) for s in samples], "g--", lw=1, label="drift repairs")
    shade(ax_fail)
    ax_fail.set_title("Failed checks and drift repairs (cumulative; orange: host cut off)")
    ax_fail.legend(fontsize="small")

    ckeys = sorted({k for s in samples for k in (s.get("counts") or {}) if k != "events_log_bytes"})
    for k in ckeys:
        ax_k.plot(mins, [(s.get("counts") or {}).get(k, 0) for s in samples], lw=1, label=k)
    ax_k2 = ax_k.twinx()
    ax_k2.plot(mins, [s["live"]["stacks"] for s in samples], "k--", lw=1, label="live stacks")
    ax_k2.set_ylabel("live stacks")
    ax_k.set_title("Kernel objects, probes files, gossip members (all hosts)")
    ax_k.set_yscale("symlog")
    ax_k.set_ylim(bottom=0)
    ax_k.legend(fontsize="x-small", ncol=2, loc="upper left")
    ax_k2.legend(fontsize="x-small", loc="lower right")
    shade(ax_k)

    for k in ckeys:
        ys = []
        for s in samples:
            live = s["live"]["stacks"] if k == "probes_files" else s["live"]["stacks_x_hosts"]
            ys.append((s.get("counts") or {}).get(k, 0) / max(live, 1))
        ax_kr.plot(mins, ys, lw=1, label=k)
    ax_kr.plot(mins, [(s.get("counts") or {}).get("events_log_bytes", 0) / 1024 for s in samples],
               "k:", lw=1, label="events.log KiB (all hosts)")
    ax_kr.set_title("The same per live thing (stacks x live hosts); events.log size")
    ax_kr.set_yscale("symlog")
    ax_kr.set_ylim(bottom=0)
    ax_kr.legend(fontsize="x-small", ncol=2)
    shade(ax_kr)

    for ax in (ax_rss, ax_fd, ax_ev, ax_fail, ax_k, ax_kr):
        ax.set_xlabel("minutes")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True


# ---- chart ----


def by_prefix(docs, prefix):
    return [f for d in docs.values() for f in d["figures"] if f["key"].startswith(prefix)]


THROUGHPUT = ("tcp1", "tcp4")
RTT = ("ping", "tcp_rr")


def ratio_figures(docs, metrics=THROUGHPUT):
    """datapath.ratio.<name>.<metric>: throughput ratios (tcp1, tcp4), or RTT ratios
    with metrics=RTT (ping, tcp_rr)."""
    return [
        f
        for f in by_prefix(docs, "datapath.ratio.")
        if f["key"].rsplit(".", 1)[-1] in metrics
    ]


def ratio_name(f):
    """The chart's name of a ratio figure, "a/b": from its label ("..., a / b (per
    round)") since path names hold underscores themselves (overlay_rule_flannel);
    else from the key."""
    m = re.search(r", (\S+) / (\S+) \(", f.get("label", ""))
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    name = f["key"][len("datapath.ratio.") :].rsplit(".", 1)[0]
    return "/".join(name.rsplit("_", 1))


def reconcile_figures(docs):
    return by_prefix(docs, "control.reconcile.")


def encryption_ratio_figures(docs):
    """encryption.ratio.<of>_<to>.<tcp1|tcp4>: the encrypted paths' throughput ratios."""
    return [
        f
        for f in by_prefix(docs, "encryption.ratio.")
        if f["key"].rsplit(".", 1)[-1] in THROUGHPUT
    ]


def chart_panels(docs):
    p = []
    if ratio_figures(docs):
        p.append("throughput ratios")
    if ratio_figures(docs, RTT):
        p.append("RTT ratios")
    if encryption_ratio_figures(docs):
        p.append("encryption ratios")
    if reconcile_figures(docs):
        p.append("reconcile times")
    return p


def targets_of(figs, kind):
    return sorted({float(f["target"][kind]) for f in figs if kind in (f.get("target") or {})})


def bars(ax, figs, names, series, label_of):
    """Grouped bars: names on x, one bar per series; error bars from min to max."""
    width = 0.8 / max(1, len(series))
    for j, s in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for i, n in enumerate(names):
            f = figs.get((n, s))
            if f is None or math.isnan(num(f["median"])):
                continue
            m = num(f["median"])
            xs.append(i + (j - (len(series) - 1) / 2) * width)
            ys.append(m)
            lo.append(max(0.0, m - num(f["min"])) if not math.isnan(num(f["min"])) else 0.0)
            hi.append(max(0.0, num(f["max"]) - m) if not math.isnan(num(f["max"])) else 0.0)
        if xs:
            b = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=label_of(s))
            ax.bar_label(b, labels=[fmt(y) for y in ys], fontsize="x-small", padding=2)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right")


def draw_chart(docs, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    ratios = ratio_figures(docs)
    if ratios:
        panels.append("ratios")
    rtt = ratio_figures(docs, RTT)
    if rtt:
        panels.append("rtt")
    enc = encryption_ratio_figures(docs)
    if enc:
        panels.append("encryption")
    recon = reconcile_figures(docs)
    if recon:
        panels.append("reconcile")
    if not panels:
        return False
    # The ratio panel widens with the number of ratios.
    def width(p):
        figs = {"ratios": ratios, "rtt": rtt, "encryption": enc}.get(p)
        return max(6.5, 0.9 * len({ratio_name(f) for f in figs})) if figs else 6.5

    widths = [width(p) for p in panels]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(sum(widths), 4.5), squeeze=False, gridspec_kw={"width_ratios": widths}
    )
    for ax, p in zip(axes[0], panels):
        if p == "ratios":
            figs = {}
            names = []
            for f in ratios:
                streams = f["key"].rsplit(".", 1)[1]
                name = ratio_name(f)
                figs[(name, streams)] = f
                if name not in names:
                    names.append(name)
            series = [s for s in ("tcp1", "tcp4") if any(k[1] == s for k in figs)]
            bars(ax, figs, names, series, lambda s: {"tcp1": "1 stream", "tcp4": "4 streams"}[s])
            for t in targets_of(ratios, "at_least"):
                ax.axhline(t, color="red", linestyle="--", linewidth=1, label=f"target ≥ {fmt(t)}")
            ax.axhline(1.0, color="grey", linewidth=0.5)
            ax.set_ylabel("throughput ratio (median of rounds)")
            ax.set_title("Datapath: TCP throughput ratios")
        elif p == "encryption":
            figs = {}
            names = []
            for f in enc:
                streams = f["key"].rsplit(".", 1)[1]
                name = ratio_name(f)
                figs[(name, streams)] = f
                if name not in names:
                    names.append(name)
            series = [s for s in THROUGHPUT if any(k[1] == s for k in figs)]
            bars(ax, figs, names, series, lambda s: {"tcp1": "1 stream", "tcp4": "4 streams"}[s])
            for t in targets_of(enc, "at_least"):
                ax.axhline(t, color="red", linestyle="--", linewidth=1, label=f"target ≥ {fmt(t)}")
            ax.axhline(1.0, color="grey", linewidth=0.5)
            ax.set_ylabel("throughput ratio (median of rounds)")
            ax.set_title("Encrypted overlay: TCP throughput ratios")
        elif p == "rtt":
            figs = {}
            names = []
            for f in rtt:
                metric = f["key"].rsplit(".", 1)[1]
                name = ratio_name(f)
                figs[(name, metric)] = f
                if name not in names:
                    names.append(name)
            series = [s for s in RTT if any(k[1] == s for k in figs)]
            bars(ax, figs, names, series, lambda s: {"ping": "ping", "tcp_rr": "TCP request/response"}[s])
            for t in targets_of(rtt, "at_most"):
                ax.axhline(t, color="red", linestyle="--", linewidth=1, label=f"target ≤ {fmt(t)}")
            ax.axhline(1.0, color="grey", linewidth=0.5)
            ax.set_ylabel("RTT ratio (median of rounds)")
            ax.set_title("Datapath: round-trip time ratios")
        else:
            units = sorted({f["unit"] for f in recon})
            figs = {}
            names = []
            for f in recon:
                name = f["key"][len("control.reconcile.") :]
                figs[(name, "")] = f
                names.append(name)
            bars(ax, figs, names, [""], lambda s: "median (min–max)")
            for t in targets_of(recon, "at_most"):
                ax.axhline(t, color="red", linestyle="--", linewidth=1, label=f"target ≤ {fmt(t)} {'/'.join(units)}")
            ax.set_ylabel(f"reconcile time ({', '.join(units)})")
            ax.set_xlabel("remote prefixes")
            ax.set_title("Control plane: route reconcile")
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True


def write_atomic(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--in", dest="in_dir", default="target/bench", help="results directory")
    ap.add_argument("--md", default="docs/benchmarks.md", help="markdown page to write")
    ap.add_argument("--png", default="docs/benchmarks.png", help="chart to write")
    ap.add_argument(
        "--raw-dir", help="copy the raw JSON here (linked from the page), e.g. docs/bench"
    )
    ap.add_argument(
        "--soak-png",
        help="draw the soak series (<in>/soak-series.json, vrt-soak --series) here, e.g. docs/soak.png",
    )
    a = ap.parse_args(argv)
    try:
        docs = read_dir(a.in_dir)
    except BadInput as e:
        print(f"bench-report: {e}", file=sys.stderr)
        return 2
    md_dir = os.path.dirname(os.path.abspath(a.md))
    raw_links = {}
    if a.raw_dir:
        os.makedirs(a.raw_dir, exist_ok=True)
        for stem in docs:
            dst = os.path.join(a.raw_dir, stem + ".json")
            shutil.copyfile(os.path.join(a.in_dir, stem + ".json"), dst)
            raw_links[stem] = os.path.relpath(os.path.abspath(dst), md_dir)
    try:
        drawn = draw_chart(docs, a.png)
    except ImportError as e:
        print(
            f"bench-report: matplotlib is missing ({e}): apt-get install python3-matplotlib "
            "(or run .ci/setup)",
            file=sys.stderr,
        )
        return 3
    panels = chart_panels(docs) if drawn else []
    soak_png = None
    if a.soak_png and SOAK_STEM in docs:
        if draw_soak_chart(os.path.join(a.in_dir, SOAK_STEM + "-series.json"), a.soak_png):
            soak_png = a.soak_png
    elif a.soak_png is None and SOAK_STEM in docs:
        # Without --soak-png, keep linking the chart of the last soak if it is there.
        soak_png = os.path.join(os.path.dirname(os.path.abspath(a.md)), "soak.png")
    write_atomic(a.md, render(docs, a.in_dir, a.md, a.png, raw_links, panels, soak_png))
    print(
        f"bench-report: {len(docs)} results file(s) -> {a.md}"
        + (f", {a.png} ({', '.join(panels)})" if drawn else " (no chart: no ratio or reconcile figures)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
