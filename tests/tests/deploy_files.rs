//! The compose files of deploy/, read as text (no root, no Docker): a host's discovery
//! runs once, as its own project (deploy/discovery, deploy/multi-host/discovery), and
//! mounts the shared and its private directory; stack files carry only their router,
//! which mounts the shared directory only. The all-in-one pattern is the one exception
//! (both roles in one privileged container per stack, by design). The Docker end-to-end
//! test (docker_e2e.rs) checks the same through Compose and the running containers.

use std::path::{Path, PathBuf};

use vrouter_tests::docker::{repo_root, Pattern};

const SHARED_MOUNT: &str = ":/var/lib/docker-router:z";
const PRIVATE_MOUNT: &str = ":/var/lib/docker-router-private:z";

/// The file without comments (whole-line ones and trailing ` # ...`).
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.trim_start().starts_with('#') {
                return "";
            }
            match l.find(" #") {
                Some(i) => l[..i].trim_end(),
                None => l,
            }
        })
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The keys of the top-level `services:` mapping (indented two spaces), in file order.
fn services(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for l in text.lines() {
        if !l.starts_with(' ') {
            inside = l.trim_end() == "services:";
            continue;
        }
        if inside && l.starts_with("  ") && !l.starts_with("   ") {
            if let Some(k) = l.trim().strip_suffix(':') {
                out.push(k.to_string());
            }
        }
    }
    out
}

/// The lines of one service's block (from its key to the next service or top-level key).
fn service_block(text: &str, name: &str) -> String {
    let mut out = Vec::new();
    let mut inside = false;
    for l in text.lines() {
        let is_key = l.starts_with("  ") && !l.starts_with("   ") && l.trim().ends_with(':');
        if !l.starts_with(' ') || is_key {
            inside = is_key && l.trim() == format!("{name}:");
            continue;
        }
        if inside {
            out.push(l);
        }
    }
    out.join("\n")
}

fn read(p: Pattern) -> String {
    let f = p.file();
    uncommented(&std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display())))
}

/// Every docker-compose.yml under `dir`.
fn compose_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            compose_files(&p, out);
        } else if p.file_name().is_some_and(|n| n == "docker-compose.yml") {
            out.push(p);
        }
    }
}

#[test]
fn every_compose_file_in_deploy_is_a_known_pattern() {
    let mut files = Vec::new();
    compose_files(&repo_root().join("deploy"), &mut files);
    let known: Vec<PathBuf> = Pattern::ALL.iter().map(|p| p.file()).collect();
    for f in &files {
        assert!(
            known.contains(f),
            "{} is not one of the patterns the tests check (tests/src/docker.rs Pattern)",
            f.display()
        );
    }
    for k in &known {
        assert!(k.exists(), "{} is missing", k.display());
    }
}

#[test]
fn stack_files_carry_only_their_router() {
    for p in Pattern::ALL
        .into_iter()
        .filter(|p| p.is_router_only_stack())
    {
        let text = read(p);
        let f = p.file();
        assert_eq!(
            services(&text),
            ["router", "web"],
            "{}: a stack holds its router and services only",
            f.display()
        );
        for bad in [
            "docker-vrouter/discovery",
            "network_mode",
            "privileged",
            "docker-router-private",
            "VROUTER_PRIVATE_DIR",
            "docker.sock",
        ] {
            assert!(!text.contains(bad), "{}: holds {bad:?}", f.display());
        }
        let router = service_block(&text, "router");
        assert!(
            router.contains(SHARED_MOUNT),
            "{}: the router does not mount the shared state directory",
            f.display()
        );
        assert!(router.contains("cap_drop: [ALL]") && router.contains("cap_add: [NET_ADMIN]"));
        assert!(router.contains("read_only: true"), "{}", f.display());
    }
}

#[test]
fn discovery_runs_once_per_host_in_its_own_project() {
    for p in Pattern::ALL.into_iter().filter(|p| p.is_discovery()) {
        let text = read(p);
        let f = p.file();
        assert_eq!(services(&text), ["discovery"], "{}", f.display());
        let d = service_block(&text, "discovery");
        for want in [
            "image: docker-vrouter/discovery:",
            "container_name: vrouter-discovery",
            "network_mode: host",
            "cap_drop: [ALL]",
            "cap_add: [NET_ADMIN]",
            SHARED_MOUNT,
            PRIVATE_MOUNT,
            "VROUTER_PRIVATE_DIR: /var/lib/docker-router-private",
        ] {
            assert!(
                d.contains(want),
                "{}: discovery lacks {want:?}",
                f.display()
            );
        }
        for bad in ["privileged", "docker.sock", "networks:"] {
            assert!(!d.contains(bad), "{}: discovery holds {bad:?}", f.display());
        }
    }
}

#[test]
fn all_in_one_mounts_both_directories() {
    let text = read(Pattern::AllInOne);
    assert_eq!(services(&text), ["vrouter", "web"]);
    let v = service_block(&text, "vrouter");
    assert!(v.contains(SHARED_MOUNT) && v.contains(PRIVATE_MOUNT), "{v}");
    assert!(!service_block(&text, "web").contains("docker-router"));
}

#[test]
fn the_parsers_see_what_compose_sees() {
    let y = "version: \"2.4\"\n# services:\nservices:\n  a:\n    image: x  # c\n    volumes:\n      - /p:/q\n\n  b:\n    image: y\nnetworks:\n  n:\n    driver: bridge\n";
    let t = uncommented(y);
    assert_eq!(services(&t), ["a", "b"]);
    assert_eq!(
        service_block(&t, "a"),
        "    image: x\n    volumes:\n      - /p:/q"
    );
    assert_eq!(service_block(&t, "b"), "    image: y");
}

/// Port steering (the default) carries same-host traffic between protected networks, so
/// no file downgrades Docker's protection (`gateway_mode_ipv4: nat-unprotected`), and
/// every file that runs discovery passes the steering settings through.
#[test]
fn no_file_unprotects_its_network_and_discovery_files_carry_the_steering_setting() {
    for p in Pattern::ALL {
        let text = uncommented(&std::fs::read_to_string(p.file()).unwrap());
        assert!(
            !text.contains("gateway_mode_ipv4"),
            "{}: sets gateway_mode_ipv4",
            p.file().display()
        );
        if p.is_discovery() || p == Pattern::AllInOne {
            for key in [
                "VROUTER_STEERING: ${VROUTER_STEERING:-ports}",
                "VROUTER_STEERING_TABLE: ${VROUTER_STEERING_TABLE:-vrouter}",
            ] {
                assert!(text.contains(key), "{}: no `{key}`", p.file().display());
            }
        }
    }
}

/// The several-hosts discovery carries the encryption setting (off unless set) and the
/// TUN device the userspace WireGuard engine needs, and nothing more than CAP_NET_ADMIN
/// for it (checked above: not privileged, only NET_ADMIN).
#[test]
fn multi_host_discovery_can_encrypt_with_only_the_tun_device() {
    let text = read(Pattern::MultiHostDiscovery);
    let d = service_block(&text, "discovery");
    for want in [
        "VROUTER_ENCRYPTION: ${VROUTER_ENCRYPTION:-off}",
        "devices:",
        "- /dev/net/tun:/dev/net/tun",
        "cap_add: [NET_ADMIN]",
    ] {
        assert!(
            d.contains(want),
            "multi-host discovery lacks {want:?}:\n{d}"
        );
    }
    // The TUN device is the only one.
    let devices: Vec<&str> = d
        .lines()
        .skip_while(|l| l.trim() != "devices:")
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("- "))
        .collect();
    assert_eq!(devices, ["      - /dev/net/tun:/dev/net/tun"], "{d}");
}
