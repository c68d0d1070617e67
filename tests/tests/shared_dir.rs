//! The shared state directory is untrusted: routers mount it read-write as root. Real
//! daemons (CAP_NET_ADMIN only) on simulated hosts: a lock a router holds there does
//! not stall discovery, planted FIFOs and links in probes/ do not stall or bloat it,
//! discovery's own state lives in its private directory, and a `vxlan<N>` discovery did
//! not make is never touched.

use std::time::{Duration, Instant};
use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::*;

const CONVERGE: Duration = Duration::from_secs(20);
const HTTP: &str = "127.0.0.1:9474";

fn two_hosts(test: &str) -> Mesh {
    Mesh::build(
        test,
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
        ],
    )
    .unwrap()
}

fn start_all(mesh: &mut Mesh) {
    for h in 1..=2 {
        mesh.write_config(h).unwrap();
        mesh.start_discovery(h).unwrap();
    }
    mesh.start_routers().unwrap();
}

#[test]
fn a_router_holding_the_shared_state_lock_does_not_stall_discovery() {
    require_root!();
    let mut mesh = two_hosts("sharedlock");
    // What a router of an older version took for every write, or a hostile one holds
    // forever (or `docker pause` freezes while holding it).
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(mesh.state_dir(1).join("state.lock"))
        .unwrap();
    lock.lock().unwrap();
    let started = Instant::now();
    start_all(&mut mesh);
    mesh.wait_converged(CONVERGE).unwrap();
    eprintln!(
        "converged with the shared state.lock held: {:?}",
        started.elapsed()
    );
    assert!(
        mesh.events(1).iter().any(|e| e.kind == "started"),
        "discovery wrote no event while the shared lock was held"
    );

    // Discovery's own state is in its private directory, not in the shared one.
    let private = mesh.private_dir(1);
    for name in ["leader.lock", "state.lock"] {
        assert!(
            private.join(name).is_file(),
            "{name} not in {}",
            private.display()
        );
    }
    assert!(!mesh.state_dir(1).join("leader.lock").exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // Routers took no lock in the shared directory (theirs would have blocked on ours).
    let probes = mesh.state_dir(2).join("probes");
    assert!(
        wait_until(CONVERGE, Duration::from_millis(100), || probes
            .join("b.json")
            .is_file()),
        "router b wrote no probes file"
    );
    assert!(!mesh.state_dir(2).join("state.lock").exists());
    drop(lock);
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    vrouter_tests::ctlbench::status_kib(&status, "VmRSS").unwrap_or(0)
}

#[test]
fn fifos_and_links_in_probes_do_not_stall_or_bloat_discovery() {
    require_root!();
    let mut mesh = two_hosts("probesfifo");
    let probes = mesh.state_dir(1).join("probes");
    std::fs::create_dir_all(&probes).unwrap();
    nix::unistd::mkfifo(
        &probes.join("fifo.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::os::unix::fs::symlink("/dev/zero", probes.join("zero.json")).unwrap();
    // A link to a file outside the directory: never read through.
    std::os::unix::fs::symlink("/etc/hostname", probes.join("host.json")).unwrap();
    start_all(&mut mesh);
    mesh.wait_converged(CONVERGE).unwrap();

    // /v1/status reads every probes file: it answers, promptly, and memory stays flat.
    let ns = mesh.topo.host(1).ns.clone();
    let pid = mesh.discovery(1).pid();
    for _ in 0..3 {
        let start = Instant::now();
        let r = http_get(&ns, HTTP, "/v1/status").expect("status answered");
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
    let rss = rss_kib(pid);
    eprintln!("discovery VmRSS with a FIFO and /dev/zero in probes/: {rss} KiB");
    assert!(rss > 0 && rss < 100 * 1024, "{rss} KiB");
    // The control loop still runs: a new stack converges.
    mesh.add_stack(StackDef::new("c", 1, 1000, "10.3.0.0/24"))
        .unwrap();
    mesh.write_config(2).unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
}

fn link_details(mesh: &Mesh, host: usize, link: &str) -> String {
    exec_ok(
        Some(&mesh.topo.host(host).ns),
        &["ip", "-d", "-o", "link", "show", "dev", link],
    )
    .map(|o| o.stdout)
    .unwrap_or_default()
}

#[test]
fn a_foreign_vxlan_device_is_never_touched_and_its_vni_refused() {
    require_root!();
    let mut mesh = two_hosts("foreignvx");
    let ns = mesh.topo.host(1).ns.clone();
    // Someone else's vxlan1000 on host 1: another port, no marker.
    exec_ok(
        Some(&ns),
        &[
            "ip",
            "link",
            "add",
            "vxlan1000",
            "type",
            "vxlan",
            "id",
            "1000",
            "dstport",
            "4790",
            "nolearning",
        ],
    )
    .unwrap();
    let before = link_details(&mesh, 1, "vxlan1000");
    assert!(!before.is_empty());
    start_all(&mut mesh);

    let refused = wait_until(CONVERGE, Duration::from_millis(100), || {
        mesh.events(1).iter().any(|e| {
            e.kind == "conflict_refused"
                && e.reason == "foreign_device"
                && e.message.contains("vxlan1000")
                && e.message.contains("VNI 1000")
        })
    });
    assert!(refused, "no foreign_device event: {:?}", mesh.events(1));
    // Reconciles and the router's retries (every 5 s) go on; the link stays exactly as
    // it was, and the refusal is written once.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(link_details(&mesh, 1, "vxlan1000"), before);
    let refusals = mesh
        .events(1)
        .iter()
        .filter(|e| e.reason == "foreign_device")
        .count();
    assert_eq!(refusals, 1, "{:?}", mesh.events(1));
    mesh.stop_router("a", libc::SIGTERM).unwrap();
    mesh.stop_discovery(1, libc::SIGTERM).unwrap();
    assert_eq!(link_details(&mesh, 1, "vxlan1000"), before);

    // Once the operator removes it, discovery makes its own, marked.
    exec_ok(Some(&ns), &["ip", "link", "del", "vxlan1000"]).unwrap();
    mesh.start_discovery(1).unwrap();
    mesh.start_router("a").unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
    let ours = link_details(&mesh, 1, "vxlan1000");
    assert!(ours.contains("alias docker-vrouter vni=1000"), "{ours}");
}

#[test]
fn a_foreign_link_with_an_attachment_name_is_left_alone() {
    require_root!();
    let mut mesh = two_hosts("foreignvrm");
    let ns = mesh.topo.host(1).ns.clone();
    // The name discovery gives router a's macvlan while it moves it (vrm + router IP).
    exec_ok(
        Some(&ns),
        &["ip", "link", "add", "vrm0a0100fe", "type", "bridge"],
    )
    .unwrap();
    let before = link_details(&mesh, 1, "vrm0a0100fe");
    start_all(&mut mesh);
    let refused = wait_until(CONVERGE, Duration::from_millis(100), || {
        mesh.events(1)
            .iter()
            .any(|e| e.kind == "registration_refused" && e.message.contains("vrm0a0100fe"))
    });
    assert!(refused, "no refusal naming the link: {:?}", mesh.events(1));
    assert_eq!(link_details(&mesh, 1, "vrm0a0100fe"), before);
    exec_ok(Some(&ns), &["ip", "link", "del", "vrm0a0100fe"]).unwrap();
    mesh.wait_converged(CONVERGE).unwrap();
}
