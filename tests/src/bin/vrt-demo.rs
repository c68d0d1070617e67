//! `make demo`: a two-host mesh on simulated hosts (network namespaces with a
//! Docker-28.2-like firewall), one stack on each, run with the real binaries under the
//! privileges Docker gives them. Prints the state files and a cross-host transfer, then
//! removes everything it made.

use std::time::{Duration, Instant};
use vrouter_tests::mesh::{Mesh, StackDef};
use vrouter_tests::{exec_ok, ping_count, tcp_send, TcpServer};

fn main() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("vrt-demo: needs root (network namespaces); run `sudo make demo`");
        std::process::exit(1);
    }
    if let Err(e) = demo() {
        eprintln!("vrt-demo: {e:#}");
        std::process::exit(1);
    }
}

fn section(title: &str) {
    println!("\n==== {title} ====");
}

fn demo() -> anyhow::Result<()> {
    section("building two simulated hosts with stack a (host 1) and stack b (host 2)");
    let mesh = Mesh::start(
        "demo",
        2,
        vec![
            StackDef::new("a", 1, 1000, "10.1.0.0/24"),
            StackDef::new("b", 2, 1000, "10.2.0.0/24"),
        ],
    )?;
    let t = Instant::now();
    mesh.wait_converged(Duration::from_secs(20))?;
    println!("mesh converged in {:?}", t.elapsed());

    section("host 1: /run/.../discovery.json");
    println!(
        "{}",
        std::fs::read_to_string(mesh.state_dir(1).join("discovery.json"))?
    );
    section("host 1: routes.json");
    println!(
        "{}",
        std::fs::read_to_string(mesh.state_dir(1).join("routes.json"))?
    );
    section("host 1: events.log");
    for e in mesh.events(1) {
        println!("{} {}: {}", e.source, e.kind, e.message);
    }
    section("kernel state this made (host 1, router a)");
    let h1 = &mesh.topo.host(1).ns;
    for cmd in [
        &["ip", "-d", "link", "show", "vxlan1000"][..],
        &["bridge", "fdb", "show", "dev", "vxlan1000"],
        &["ip", "rule", "show"],
        &["ip", "route", "show", "table", "all", "proto", "118"],
    ] {
        println!("# {}", cmd.join(" "));
        print!("{}", exec_ok(Some(h1), cmd)?.stdout);
    }
    let ra = mesh.rtr("a");
    for cmd in [
        &["ip", "route", "show", "proto", "118"][..],
        &["ip", "neigh", "show", "dev", "ovl1000"],
    ] {
        println!("# (router a) {}", cmd.join(" "));
        print!("{}", exec_ok(Some(&ra.ns), cmd)?.stdout);
    }

    section("service a (10.1.0.5, host 1) -> service b (10.2.0.5, host 2)");
    let (a, b) = (mesh.svc("a"), mesh.svc("b"));
    let (sent, got) = ping_count(&a.ns, &b.ip.to_string(), 3, Duration::from_secs(5))?;
    println!("ping: {got}/{sent} answered");
    let addr = format!("{}:5000", b.ip);
    let server = TcpServer::start(&b.ns, &addr, mesh.topo.log_dir(), Duration::from_secs(30))?;
    let bytes = 64 * 1024 * 1024;
    let t = Instant::now();
    let line = tcp_send(&a.ns, &addr, bytes, Duration::from_secs(60))?;
    let secs = t.elapsed().as_secs_f64();
    println!("{line}");
    println!(
        "TCP: {} MiB echoed in {:.2} s ({:.0} Mbit/s each way, over VXLAN through both hosts' firewalls)",
        bytes >> 20,
        secs,
        bytes as f64 * 8.0 / secs / 1e6
    );
    println!(
        "the receiver saw the sender as {} (no NAT)",
        server.peer(Duration::from_secs(2))?
    );

    section("what an operator sees on host 1: vrouter-discovery status");
    // Give the routers' probe files a second to carry RTT and the traffic just sent.
    std::thread::sleep(Duration::from_millis(1500));
    let state = mesh.state_dir(1);
    let disc = mesh.bin("vrouter-discovery");
    let out = exec_ok(
        Some(h1),
        &[
            disc.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "status",
        ],
    )?;
    print!("{}", out.stdout);
    section("router a: vrouter-router status");
    let rtr = mesh.bin("vrouter-router");
    let env_state = format!("VROUTER_STATE_DIR={}", state.display());
    let out = ra.exec(&[
        "env",
        "VROUTER_STACK=a",
        "VROUTER_VNI=1000",
        &env_state,
        "RUST_LOG=warn",
        rtr.to_str().unwrap(),
        "status",
    ])?;
    print!("{}", out.stdout);
    println!(
        "(also: /metrics, /readyz, /v1/status on 127.0.0.1:9474 in each host; see docs/operations.md)"
    );

    section("cleaning up");
    drop(server);
    drop(mesh);
    println!("removed every namespace, link and process the demo made");
    Ok(())
}
