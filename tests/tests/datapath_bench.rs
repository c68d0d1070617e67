//! The world `vrt-bench` measures in (root): every path answers under its condition,
//! the firewall is loaded only under its condition, the hosts run the steering the
//! paths are named after (port steering for `overlay` and `same_host`, the policy rule
//! for `overlay_rule`, whose sender ignores the host's redirect as on a Docker host),
//! and the Flannel-style path carries nothing under the Docker-like firewall. One short
//! iperf3 run per VXLAN path shows the probes work.

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
fn datapath_paths_conditions_and_steering() {
    require_root!();
    let mut dp = Datapath::build("dpbench").expect("the bench topology builds");
    let names: Vec<&str> = dp.paths.iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        [
            "overlay",
            "overlay_rule",
            "flannel",
            "routed",
            "underlay",
            "same_host",
            "bridged",
            "overlay_fw"
        ]
    );
    let h1 = dp.mesh.topo.host(1).ns.clone();
    dp.check_steering()
        .expect("ports on hosts 1 and 2, rule on 3");

    // The policy-rule sender goes through the host (it ignores the redirect, as a
    // service on a Docker host does).
    let r = path(&dp, "overlay_rule").clone();
    assert!(ping(
        &r.from_ns,
        &r.to_ip.to_string(),
        3,
        Duration::from_secs(3)
    ));
    assert_eq!(redirected_to(&r.from_ns, r.to_ip), None);
    assert_eq!(
        sysctl(&r.from_ns, "net.ipv4.conf.all.accept_redirects"),
        "0"
    );

    // Conditions: the firewall only under Firewall; Plain takes it off.
    dp.set_condition(Condition::Firewall).unwrap();
    assert!(dp.mesh.topo.host(1).firewall_enabled());
    assert_eq!(sysctl(&h1, "net.bridge.bridge-nf-call-iptables"), "1");
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

    // A short run on each VXLAN path and the same-host one carries data.
    let dir = dp.log_dir().to_path_buf();
    for (i, name) in ["overlay", "overlay_rule", "flannel", "same_host"]
        .iter()
        .enumerate()
    {
        let p = path(&dp, name).clone();
        let mbit = iperf(&dir, &p, 5300 + i as u16, 1, 1, dp.mss).unwrap();
        assert!(mbit > 10.0, "{name}: {mbit} Mbit/s");
    }
}
