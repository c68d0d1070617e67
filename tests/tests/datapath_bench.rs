//! The world `vrt-bench` measures in (root): every path answers under its condition,
//! the conditions are set and put back, the redirected services take the host's
//! redirect, the ordinary ones do not, and the Flannel-style path carries nothing under
//! the Docker-like firewall. One short iperf3 run per VXLAN path shows the probes work.

use std::time::Duration;
use vrouter_tests::datapath::{iperf, redirected_to, Condition, Datapath, PathDef};
use vrouter_tests::*;

fn sysctl(ns: &str, key: &str) -> String {
    cmd::exec_ok(Some(ns), &["sysctl", "-n", key])
        .unwrap()
        .stdout
        .trim()
        .to_string()
}

fn path<'a>(dp: &'a Datapath, name: &str) -> &'a PathDef {
    dp.paths
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no path {name}"))
}

#[test]
fn datapath_paths_conditions_and_redirects() {
    require_root!();
    let mut dp = Datapath::build("dpbench").expect("the bench topology builds");
    let names: Vec<&str> = dp.paths.iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        [
            "overlay",
            "flannel",
            "routed",
            "underlay",
            "overlay_redirect",
            "overlay_nobnf",
            "flannel_nobnf",
            "overlay_fw"
        ]
    );
    let h1 = dp.mesh.topo.host(1).ns.clone();

    // The redirected service sends straight to its router; the ordinary one through the
    // host (it ignores the redirect, as a service on a Docker host does).
    let r = path(&dp, "overlay_redirect").clone();
    assert_eq!(
        redirected_to(&r.from_ns, r.to_ip),
        Some("10.1.0.254".parse().unwrap())
    );
    let o = path(&dp, "overlay").clone();
    assert!(ping(
        &o.from_ns,
        &o.to_ip.to_string(),
        3,
        Duration::from_secs(3)
    ));
    assert_eq!(redirected_to(&o.from_ns, o.to_ip), None);
    assert_eq!(
        sysctl(&o.from_ns, "net.ipv4.conf.all.accept_redirects"),
        "0"
    );

    // Conditions: bridge netfilter off only under NoBridgeNf, firewall only under
    // Firewall; Plain puts both back.
    dp.set_condition(Condition::NoBridgeNf).unwrap();
    assert_eq!(sysctl(&h1, "net.bridge.bridge-nf-call-iptables"), "0");
    assert!(!dp.mesh.topo.host(1).firewall_enabled());
    dp.set_condition(Condition::Firewall).unwrap();
    assert_eq!(sysctl(&h1, "net.bridge.bridge-nf-call-iptables"), "1");
    assert!(dp.mesh.topo.host(1).firewall_enabled());
    dp.set_condition(Condition::Plain).unwrap();
    assert!(!dp.mesh.topo.host(1).firewall_enabled());
    assert_eq!(sysctl(&h1, "net.bridge.bridge-nf-call-iptables"), "1");

    // Under the firewall the host may not forward into a protected bridge from
    // outside: the Flannel-style path is dead, the overlay is not.
    assert!(!dp.flannel_under_firewall().unwrap());
    assert!(!dp.mesh.topo.host(1).firewall_enabled());
    let f = path(&dp, "flannel").clone();
    assert!(ping(
        &f.from_ns,
        &f.to_ip.to_string(),
        3,
        Duration::from_secs(3)
    ));

    // A short run on each VXLAN path carries data.
    let dir = dp.log_dir().to_path_buf();
    for (i, name) in ["overlay", "flannel", "overlay_redirect"]
        .iter()
        .enumerate()
    {
        let p = path(&dp, name).clone();
        let mbit = iperf(&dir, &p, 5300 + i as u16, 1, 1, dp.mss).unwrap();
        assert!(mbit > 10.0, "{name}: {mbit} Mbit/s");
    }
}
