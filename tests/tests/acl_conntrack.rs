//! A router's access policy decides how discovery steers its stack's traffic (issue 15),
//! with the real daemons on two simulated hosts. Under the default policy the router's
//! table is stateless and it registers with `conntrack: false`, so stack a's frames go
//! from the service's port straight into the tunnel ("steer a b" counts them); a reload
//! to a restricting policy makes the router register again with `conntrack: true` on its
//! open connection, and discovery sends a's frames to a's own router ("own a"), which
//! then sees both directions; back to the default, straight again. Traffic passes in
//! every phase.

use std::path::PathBuf;
use std::time::Duration;

use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::*;

/// How long a policy change may take to reach the steering table (file watch, reload,
/// registration, discovery's steering pass), generously.
const APPLY: Duration = Duration::from_secs(10);

/// The policy file's directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The packet counter of the rule with `comment` in host 1's steering table (its name
/// from discovery.json), or None while the table or the rule is not there.
fn steering_counter(mesh: &Mesh, comment: &str) -> Option<u64> {
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mesh.state_dir(1).join("discovery.json")).ok()?)
            .ok()?;
    let table = doc["steering"]["table"].as_str()?.to_string();
    let out = exec_ok(
        Some(&mesh.topo.host(1).ns),
        &["nft", "list", "table", "netdev", &table],
    )
    .ok()?;
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains(&format!("comment \"{comment}\"")))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "packets")?;
    words.next()?.parse().ok()
}

/// Pings b from a until 5 answers in a row come back and the rule `via` counted them
/// (its counter rose by at least 5 while the other rule's did not), within [`APPLY`]:
/// the frames took that way.
fn traffic_takes(mesh: &Mesh, via: &str, not: &str) -> bool {
    let (a, b) = (mesh.svc("a"), mesh.svc("b"));
    wait_until(APPLY, Duration::from_millis(200), || {
        // The other way's rule may be gone from the table: then it counts nothing.
        let not_count = || steering_counter(mesh, not).unwrap_or(0);
        let before = (steering_counter(mesh, via), not_count());
        let answered = ping_count(&a.ns, &b.ip.to_string(), 5, Duration::from_secs(3))
            .is_ok_and(|(sent, got)| sent == 5 && got == 5);
        let after = (steering_counter(mesh, via), not_count());
        match (before, after) {
            ((Some(v0), n0), (Some(v1), n1)) => answered && v1 >= v0 + 5 && n1 <= n0,
            _ => false,
        }
    })
}

#[test]
fn a_policy_reload_switches_the_stacks_steering() {
    require_root!();
    let dir = TempDir(PathBuf::from(format!("/run/{}-acl-conntrack", prefix())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let file = dir.0.join("acl.toml");
    let write = |text: &str| {
        let tmp = dir.0.join("acl.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write("");
    let mut mesh = Mesh::build(
        "aclct",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
        ],
    )
    .expect("mesh builds");
    mesh.set_router_env("a", "VROUTER_ACL_FILE", file.to_str().unwrap());
    for h in 1..=2 {
        mesh.write_config(h).unwrap();
        mesh.start_discovery(h).unwrap();
    }
    mesh.start_routers().unwrap();
    mesh.wait_converged(Duration::from_secs(20)).unwrap();
    let acl = |mesh: &Mesh| {
        mesh.rtr("a")
            .exec(&["nft", "-s", "list", "table", "ip", "vrouter_acl"])
            .map(|o| o.stdout)
            .unwrap_or_default()
    };

    // The default policy: stateless, straight into the tunnel.
    let ok = traffic_takes(&mesh, "steer a b", "own a");
    if !ok {
        mesh.dump_logs();
    }
    assert!(ok, "default policy: a's frames not steered into the tunnel");
    let table = acl(&mesh);
    assert!(
        table.contains("acl entering") && !table.contains(" ct "),
        "{table}"
    );

    // Restricting: the router tracks connections and sees both directions.
    write("default = \"deny\"\n\n[[rule]]\nallow = \"b\"\n");
    let ok = traffic_takes(&mesh, "own a", "steer a b");
    if !ok {
        mesh.dump_logs();
    }
    assert!(
        ok,
        "restricting policy: a's frames not sent to its own router"
    );
    let table = acl(&mesh);
    assert!(table.contains("acl admitted"), "{table}");

    // And back.
    write("");
    let ok = traffic_takes(&mesh, "steer a b", "own a");
    if !ok {
        mesh.dump_logs();
    }
    assert!(
        ok,
        "default policy again: a's frames not steered into the tunnel"
    );
    assert!(mesh
        .events(1)
        .iter()
        .all(|e| e.kind != "registration_refused"));
}
