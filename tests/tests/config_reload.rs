//! The static peer file is reloaded when it changes and on SIGHUP, and a bad edit keeps
//! the previous peers.

use std::path::PathBuf;
use std::time::Duration;
use vrouter_tests::mesh::bin_dir;
use vrouter_tests::*;

fn peers(stacks: &[(&str, &str)]) -> String {
    let mut s = String::from("[[host]]\naddress = \"198.18.0.2\"\n");
    for (name, cidr) in stacks {
        let router = cidr.replace(".0/24", ".254");
        s.push_str(&format!(
            "[[host.stack]]\nname = \"{name}\"\nprefixes = [\"{cidr}\"]\nrouter_ip = \"{router}\"\n"
        ));
    }
    s
}

fn routes(ns: &str) -> Vec<String> {
    let out = exec_ok(Some(ns), &["ip", "-4", "route", "show", "proto", "118"])
        .unwrap()
        .stdout;
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect();
    v.retain(|p| p != "default");
    v.sort();
    v
}

#[test]
fn reload_on_change_on_sighup_and_keep_previous_on_error() {
    require_root!();
    let p = prefix();
    let mut topo = Topology::builder("config_reload").hosts(2).build().unwrap();
    let h = topo.host_mut(1);
    h.add_network("a", "10.1.0.0/24", Protection::Protected)
        .unwrap();
    let rtr = h
        .add_container("a", "rtr", "10.1.0.254", Role::Router)
        .unwrap();
    let state = PathBuf::from(format!("/run/{p}-state-reload"));
    // The configuration is a symlink into another directory, as Kubernetes-style config
    // mounts are: edits of the target are invisible to the watcher, so only SIGHUP sees them.
    let conf_dir = PathBuf::from(format!("/run/{p}-conf-reload"));
    let target_dir = PathBuf::from(format!("/run/{p}-conf-reload-target"));
    for d in [&state, &conf_dir, &target_dir] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).unwrap();
    }
    let _ = std::fs::remove_dir_all(format!("/run/{p}-state-reload-private"));
    let target = target_dir.join("peers.toml");
    let link = conf_dir.join("peers.toml");
    std::fs::write(&target, peers(&[("b", "10.2.0.0/24")])).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();

    let bins = bin_dir().unwrap();
    let s = state.display().to_string();
    let mut disc = h
        .spawn_privileged(
            bins.join("vrouter-discovery").to_str().unwrap(),
            &["--state-dir", &s, "--config", link.to_str().unwrap()],
            &[],
        )
        .unwrap();
    let _rtr = rtr
        .spawn_privileged(
            bins.join("vrouter-router").to_str().unwrap(),
            &[],
            &[("VROUTER_STACK", "a"), ("VROUTER_STATE_DIR", &s)],
        )
        .unwrap();
    let want = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || routes(&rtr.ns) == want(&["10.2.0.0/24"])
    ));

    // A change the watcher cannot see waits for SIGHUP.
    std::fs::write(
        &target,
        peers(&[("b", "10.2.0.0/24"), ("c", "10.3.0.0/24")]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        routes(&rtr.ns),
        want(&["10.2.0.0/24"]),
        "applied without SIGHUP?"
    );
    disc.kill(libc::SIGHUP).unwrap();
    assert!(
        wait_until(
            Duration::from_secs(2),
            Duration::from_millis(50),
            || routes(&rtr.ns) == want(&["10.2.0.0/24", "10.3.0.0/24"])
        ),
        "SIGHUP did not reload: {:?}",
        routes(&rtr.ns)
    );

    // Replacing the watched path is picked up without a signal.
    let tmp = conf_dir.join("peers.toml.tmp");
    std::fs::write(&tmp, peers(&[("c", "10.3.0.0/24")])).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    assert!(
        wait_until(
            Duration::from_secs(3),
            Duration::from_millis(50),
            || routes(&rtr.ns) == want(&["10.3.0.0/24"])
        ),
        "file change not picked up: {:?}",
        routes(&rtr.ns)
    );

    // A bad edit is reported and the previous peers stay.
    std::fs::write(&tmp, "[[host]]\naddress = \"not-an-ip\"\n").unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    let events = || {
        vrouter_state::StateDir::open(&state)
            .unwrap()
            .read_events()
            .unwrap_or_default()
    };
    assert!(wait_until(
        Duration::from_secs(3),
        Duration::from_millis(50),
        || {
            events().iter().any(|e| {
                e.kind == "config_invalid"
                    && e.message.contains("not-an-ip")
                    && e.message.contains("keeping the previous peers")
            })
        }
    ));
    assert_eq!(routes(&rtr.ns), want(&["10.3.0.0/24"]));
    assert!(
        disc.is_running(),
        "discovery died on a bad configuration edit"
    );

    drop(disc);
    drop(topo);
    let private = PathBuf::from(format!("{}-private", state.display()));
    for d in [&state, &conf_dir, &target_dir, &private] {
        let _ = std::fs::remove_dir_all(d);
    }
}
