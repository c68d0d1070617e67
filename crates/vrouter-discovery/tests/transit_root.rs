//! Root test of transit on a relay host: three simulated hosts on one underlay
//! bridge. h1 and h2 cannot exchange VXLAN directly (h1 drops it both ways); h3
//! runs the relay table `transit::apply` makes from `transit::plan`, with the plan's
//! FDB rows. A macvlan "router" on h1's vxlan1000 pings one on h2's through h3: no
//! answer before the table goes in, every answer after; the relay counters rise;
//! `remove` leaves nothing. Names come from VROUTER_TEST_PREFIX; the topology removes
//! its namespaces on drop, even when the test panics. Needs root and the `vrt-probe`
//! binary (`cargo build -p vrouter-tests --bins`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;
use vrouter_discovery::transit;
use vrouter_state::{PeerHost, PeerOrigin, Prefix, StackName, StackSpec, Vni};
use vrouter_tests::{require_root, Topology};

fn stack(name: &str, third: u8) -> StackSpec {
    StackSpec {
        name: StackName::new(name).unwrap(),
        vni: Vni::new(1000).unwrap(),
        prefixes: vec![Prefix::new(Ipv4Addr::new(10, third, 0, 0), 24).unwrap()],
        router_ip: Ipv4Addr::new(10, third, 0, 254),
    }
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns file");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("namespace thread")
}

fn sh(host: &vrouter_tests::topology::Host, args: &[&str]) {
    host.exec_ok(args)
        .unwrap_or_else(|e| panic!("{args:?} in {}: {e:#}", host.ns));
}

/// `count` pings from `host` to `to` (out of its router), 50 ms apart: (sent, received).
fn pings(host: &vrouter_tests::topology::Host, to: Ipv4Addr, count: u32) -> (u32, u32) {
    vrouter_tests::ping_burst(
        &host.ns,
        &to.to_string(),
        count,
        Duration::from_millis(50),
        Duration::from_millis(50 * u64::from(count) + 1500),
    )
    .expect("vrt-probe ping (cargo build -p vrouter-tests --bins)")
}

#[test]
fn a_relay_host_forwards_between_two_hosts_that_cannot_reach_each_other() {
    if !require_root() {
        return;
    }
    let topo = Topology::builder("transit")
        .hosts(3)
        .build()
        .expect("topology");
    let (h1, h2, h3) = (topo.host(1), topo.host(2), topo.host(3));
    let (a, b) = (stack("a", 1), stack("b", 2));
    let table = format!("{}steer_relay", vrouter_tests::prefix());
    for h in [h1, h2, h3] {
        sh(
            h,
            &[
                "ip",
                "link",
                "add",
                "vxlan1000",
                "type",
                "vxlan",
                "id",
                "1000",
                "local",
                &h.underlay_ip.to_string(),
                "dstport",
                "4789",
                "nolearning",
            ],
        );
        sh(h, &["ip", "link", "set", "vxlan1000", "mtu", "1450", "up"]);
    }
    // The routers: a macvlan per host with the stack's router MAC and address, the
    // remote router's MAC as a static neighbour (what routes.json gives a router).
    for (h, me, other, name) in [(h1, &a, &b, "r1"), (h2, &b, &a, "r2")] {
        sh(
            h,
            &[
                "ip",
                "link",
                "add",
                name,
                "link",
                "vxlan1000",
                "address",
                &me.router_mac().to_string(),
                "type",
                "macvlan",
                "mode",
                "bridge",
            ],
        );
        sh(
            h,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/24", me.router_ip),
                "dev",
                name,
            ],
        );
        sh(h, &["ip", "link", "set", name, "up"]);
        sh(
            h,
            &[
                "ip",
                "route",
                "add",
                &format!("{}/32", other.router_ip),
                "dev",
                name,
            ],
        );
        sh(
            h,
            &[
                "ip",
                "neigh",
                "replace",
                &other.router_ip.to_string(),
                "lladdr",
                &other.router_mac().to_string(),
                "dev",
                name,
                "nud",
                "permanent",
            ],
        );
        // The sender's side of a relayed path: the remote router's MAC points at h3.
        sh(
            h,
            &[
                "bridge",
                "fdb",
                "append",
                &other.router_mac().to_string(),
                "dev",
                "vxlan1000",
                "dst",
                &h3.underlay_ip.to_string(),
            ],
        );
    }
    // h1 and h2 cannot exchange UDP at all.
    let block = format!("{}block", vrouter_tests::prefix());
    let h2_ip = h2.underlay_ip.to_string();
    sh(h1, &["nft", "add", "table", "ip", &block]);
    for (chain, hook, field) in [("o", "output", "daddr"), ("i", "input", "saddr")] {
        sh(
            h1,
            &[
                "nft",
                "add",
                "chain",
                "ip",
                &block,
                chain,
                &format!("{{ type filter hook {hook} priority 0; }}"),
            ],
        );
        sh(
            h1,
            &[
                "nft", "add", "rule", "ip", &block, chain, "ip", field, &h2_ip, "meta", "l4proto",
                "udp", "drop",
            ],
        );
    }

    // h3's plan: both hosts reached directly, one VNI with stacks on both.
    let peers = vec![
        PeerHost {
            addr: h1.underlay_ip,
            stacks: vec![a.clone()],
            source: PeerOrigin::Gossip,
            node: None,
            claims: BTreeMap::new(),
            generations: BTreeMap::new(),
            encryption: None,
        },
        PeerHost {
            addr: h2.underlay_ip,
            stacks: vec![b.clone()],
            source: PeerOrigin::Gossip,
            node: None,
            claims: BTreeMap::new(),
            generations: BTreeMap::new(),
            encryption: None,
        },
    ];
    let direct: BTreeSet<Ipv4Addr> = [h1.underlay_ip, h2.underlay_ip].into();
    let plan = transit::plan(true, &peers, &direct, &BTreeMap::new());
    assert_eq!(plan.vnis, [Vni::new(1000).unwrap()].into());
    assert_eq!(plan.fdb.len(), 2);
    for row in &plan.fdb {
        sh(
            h3,
            &[
                "bridge",
                "fdb",
                "append",
                &row.mac.to_string(),
                "dev",
                &format!("vxlan{}", row.vni),
                "dst",
                &row.dst.to_string(),
            ],
        );
    }

    // Without the relay table h3 does not forward: nothing comes back.
    let (sent, got) = pings(h1, b.router_ip, 3);
    assert_eq!((sent, got), (3, 0), "no path before the relay table");

    let t = table.clone();
    let p = plan.clone();
    in_ns(&h3.ns, move || transit::apply(&t, &p)).expect("apply the relay table");
    let listed = h3
        .exec_ok(&["nft", "list", "table", "netdev", &table])
        .expect("nft list")
        .stdout;
    for want in [
        "set relay_1000",
        "type ether_addr",
        "hook ingress device \"vxlan1000\" priority filter",
        "ether daddr @relay_1000 counter",
        "fwd to \"vxlan1000\"",
        &a.router_mac().to_string(),
        &b.router_mac().to_string(),
    ] {
        assert!(listed.contains(want), "{want} missing from\n{listed}");
    }

    let started = std::time::Instant::now();
    let (sent, got) = pings(h1, b.router_ip, 10);
    assert_eq!((sent, got), (10, 10), "r1 pings r2 through h3");
    eprintln!("10 pings through the relay in {:?}", started.elapsed());
    let (sent, got) = pings(h2, a.router_ip, 5);
    assert_eq!((sent, got), (5, 5), "r2 pings r1 through h3");

    let t = table.clone();
    let counts = in_ns(&h3.ns, move || transit::counters(&t)).expect("counters");
    let (packets, bytes) = counts[&Vni::new(1000).unwrap()];
    // Each ping crosses h3 twice (request and reply).
    assert!(packets >= 30, "{counts:?}");
    // At netdev ingress a counter counts the frame without its Ethernet header: at
    // least an IPv4 and an ICMP header per ping.
    assert!(bytes >= packets * 28, "{counts:?}");

    // Applying the same plan again changes nothing: the counters go on.
    let (t, p) = (table.clone(), plan.clone());
    let again = in_ns(&h3.ns, move || {
        transit::apply(&t, &p)?;
        transit::counters(&t)
    })
    .expect("apply again");
    assert!(again[&Vni::new(1000).unwrap()].0 >= packets, "{again:?}");
    // A replacement (another plan) carries the counts over.
    let mut grown = plan.clone();
    grown
        .macs
        .get_mut(&Vni::new(1000).unwrap())
        .unwrap()
        .insert(stack("c", 3).router_mac());
    let t = table.clone();
    let carried = in_ns(&h3.ns, move || {
        transit::apply(&t, &grown)?;
        transit::counters(&t)
    })
    .expect("apply a grown plan");
    assert!(
        carried[&Vni::new(1000).unwrap()].0 >= packets,
        "{carried:?}"
    );
    let (sent, got) = pings(h1, b.router_ip, 3);
    assert_eq!((sent, got), (3, 3), "still relayed after the replacement");

    // remove() leaves nothing, and the relay stops.
    let t = table.clone();
    in_ns(&h3.ns, move || transit::remove(&t)).expect("remove");
    let tables = h3.exec_ok(&["nft", "list", "tables"]).expect("nft").stdout;
    assert!(!tables.contains(&table), "{tables}");
    let t = table.clone();
    let none = in_ns(&h3.ns, move || transit::counters(&t)).expect("counters of nothing");
    assert!(none.is_empty(), "{none:?}");
    let (_, got) = pings(h1, b.router_ip, 3);
    assert_eq!(got, 0, "no relay after remove");
    // Removing again is no error; an empty plan removes too.
    let t = table.clone();
    in_ns(&h3.ns, move || {
        transit::remove(&t)?;
        transit::apply(&t, &transit::TransitPlan::default())
    })
    .expect("remove twice");
}
