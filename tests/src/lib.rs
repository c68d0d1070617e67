//! Simulated-host test harness for docker-vrouter.
//!
//! Builds "hosts" as network namespaces joined by an underlay bridge (in a namespace of its
//! own), Docker-like bridge networks and containers inside them, loads a Docker-28.2-like
//! nftables ruleset into each host, and runs daemons with the privileges Docker would give
//! them (CAP_NET_ADMIN only, read-only /proc/sys). Everything created is named with a
//! prefix (`VROUTER_TEST_PREFIX`, default `vrt`) and removed on drop, even on panic.
//!
//! Typical use:
//! ```no_run
//! use vrouter_tests::*;
//! #[test]
//! fn t() {
//!     require_root!();
//!     let mut topo = Topology::builder("t").hosts(2).build().unwrap();
//!     topo.host_mut(1).add_network("a", "10.1.0.0/24", Protection::Protected).unwrap();
//!     let svc = topo.host_mut(1).add_container("a", "svc", "10.1.0.5", Role::Service).unwrap();
//!     assert!(ping(&svc.ns, "10.1.0.1", 1, std::time::Duration::from_secs(2)));
//! }
//! ```

pub mod attach;
pub mod bench;
pub mod chaos;
pub mod cleanup;
pub mod cmd;
pub mod cpuprof;
pub mod ctlbench;
pub mod daemon;
pub mod datapath;
pub mod docker;
pub mod encryption;
pub mod firewall;
pub mod gossip;
pub mod http;
pub mod interrupt;
pub mod mesh;
pub mod migration;
pub mod nat;
pub mod oracle;
pub mod probe;
pub mod relaybench;
pub mod soak;
pub mod steering;
pub mod topology;
pub mod underlay;

pub use cleanup::cleanup_leftovers;
pub use cmd::{exec, exec_input, exec_ok, exec_timeout, ns_run, sh, CmdOutput, CMD_TIMEOUT};
pub use daemon::{spawn_in, spawn_privileged_in, Daemon, PRIVILEGED_WRAPPER};
pub use firewall::{render_ruleset, render_ruleset_with, FwNetwork, FwOptions};
pub use http::{http_get, http_request, metric, HttpReply};
pub use probe::{
    ping, ping_burst, ping_count, probe_bin, send_udp_file, tcp_hold, tcp_send, udp_burst,
    udp_burst_opts, udp_rr, TcpServer, UdpCapture, UdpEcho, UdpSink,
};
pub use topology::{Container, Host, Network, Protection, Role, Topology, TopologyBuilder};

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Name prefix for everything created in shared namespaces (netns names, host links, locks).
pub fn prefix() -> String {
    match std::env::var("VROUTER_TEST_PREFIX") {
        Ok(p) if !p.is_empty() => {
            assert!(
                p.len() <= 6 && p.chars().all(|c| c.is_ascii_alphanumeric()),
                "VROUTER_TEST_PREFIX must be 1-6 ASCII alphanumerics (interface names <= 15)"
            );
            p
        }
        _ => "vrt".to_string(),
    }
}

/// True when running as root. Otherwise: panics when `CI=true`, else prints
/// `SKIP: needs root` and returns false (the test should return). See [`require_root!`].
pub fn require_root() -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!("this test needs root and CI=true: refusing to skip");
    }
    eprintln!("SKIP: needs root");
    false
}

/// `require_root!();` at the top of a test returns early (skip) when not root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::require_root() {
            return;
        }
    };
}

/// Global lock serialising tests that share the host namespace (and Docker).
/// `flock` on `/run/<prefix>-tests.lock`; released on drop. Works across threads of one
/// process too (each acquisition opens its own file description).
pub struct TestLock {
    _file: File,
    pub path: PathBuf,
}

impl TestLock {
    /// Wait (bounded: 15 minutes) for the lock.
    pub fn acquire() -> Result<TestLock> {
        Self::acquire_timeout(Duration::from_secs(900))
    }

    pub fn acquire_timeout(timeout: Duration) -> Result<TestLock> {
        let path = PathBuf::from(format!("/run/{}-tests.lock", prefix()));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let deadline = Instant::now() + timeout;
        loop {
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                return Ok(TestLock { _file: file, path });
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                bail!("flock {}: {err}", path.display());
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {}", path.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Per-test log directory: `$VROUTER_TEST_LOGDIR` or `<tmp>/<prefix>-logs`, plus the test
/// name. Emptied when a topology for that test is built.
pub fn log_dir_for(test_name: &str) -> PathBuf {
    let base = std::env::var_os("VROUTER_TEST_LOGDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("{}-logs", prefix())));
    let safe: String = test_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    base.join(safe)
}

/// Replaces `path` atomically with `contents` (a temp file beside it, then a rename), as
/// a config-management tool would, so a watching daemon never reads half a file.
/// Creates the parent directory.
pub fn write_file_atomic(path: &std::path::Path, contents: impl AsRef<[u8]>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Poll `f` every `interval` until it returns true or `timeout` passes. Returns the last result.
pub fn wait_until(timeout: Duration, interval: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}
