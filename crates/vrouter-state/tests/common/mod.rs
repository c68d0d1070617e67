//! Helpers shared by the integration tests: temp directories removed on drop, and
//! child processes that re-run this test binary in a "role".
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vrouter_state::{Mac, Prefix, RemoteRoute, RoutesFile, StackName, StackRoutes, Vni};

pub const ROLE_ENV: &str = "VROUTER_STATE_TEST_ROLE";
pub const DIR_ENV: &str = "VROUTER_STATE_TEST_DIR";
pub const ARG_ENV: &str = "VROUTER_STATE_TEST_ARG";

/// Name of the test in each binary that dispatches child roles.
pub const ENTRY_TEST: &str = "child_process_entry";

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A fresh directory under the system temp dir, removed with everything in it on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "vrouter-state-{tag}-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir_all(private_path(&self.0));
    }
}

/// Discovery's private directory for a shared directory in these tests.
pub fn private_path(shared: &Path) -> PathBuf {
    let mut s = shared.as_os_str().to_owned();
    s.push("-private");
    PathBuf::from(s)
}

/// `shared` opened as discovery opens it, with its private directory beside it.
pub fn discovery(shared: &Path) -> vrouter_state::StateDir {
    vrouter_state::StateDir::open_discovery(shared, &private_path(shared)).unwrap()
}

/// A child process running this test binary in `role`; SIGKILLed and reaped on drop
/// so a failing test leaves nothing behind.
pub struct RoleChild {
    pub child: Child,
    lines: Option<mpsc::Receiver<String>>,
}

impl RoleChild {
    pub fn spawn(role: &str, dir: &Path, arg: &str) -> RoleChild {
        RoleChild::spawn_with(role, dir, arg, |_| {})
    }

    pub fn spawn_with(
        role: &str,
        dir: &Path,
        arg: &str,
        adjust: impl FnOnce(&mut Command),
    ) -> RoleChild {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([ENTRY_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE_ENV, role)
            .env(DIR_ENV, dir)
            .env(ARG_ENV, arg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("re-running the test binary");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        RoleChild {
            child,
            lines: Some(rx),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line containing `prefix` and returns what follows it (the
    /// test harness may print "test ... " before it on the same line).
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let rx = self.lines.as_ref().unwrap();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(i) = line.find(prefix) {
                        return line[i + prefix.len()..].trim().to_string();
                    }
                }
                Err(e) => panic!("child never printed {prefix:?}: {e}"),
            }
        }
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the child to exit (bounded) and asserts it succeeded.
    pub fn wait_success(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "child failed: {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "child did not finish in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RoleChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.sigkill();
        }
    }
}

/// The role this process was started in, with its directory and argument; `None`
/// in a normal test run.
pub fn role() -> Option<(String, PathBuf, String)> {
    let role = std::env::var(ROLE_ENV).ok()?;
    let dir = PathBuf::from(std::env::var(DIR_ENV).unwrap());
    let arg = std::env::var(ARG_ENV).unwrap_or_default();
    Some((role, dir, arg))
}

/// A routes file whose every route names `generation` (in `host`), so a reader can
/// tell a whole file from a mix of two.
pub fn routes(generation: u64, n: usize) -> RoutesFile {
    let stack = StackName::new("web").unwrap();
    let host = Ipv4Addr::from(generation as u32);
    let routes = (0..n)
        .map(|i| RemoteRoute {
            prefix: Prefix::containing(Ipv4Addr::from(0x0a00_0000 + ((i as u32) << 8)), 24),
            stack: StackName::new(&format!("remote-{i}")).unwrap(),
            via: Ipv4Addr::new(10, 255, (i >> 8) as u8, i as u8),
            mac: Mac([2, 0, 0, 0, (i >> 8) as u8, i as u8]),
            host,
            same_host: i % 2 == 0,
        })
        .collect();
    let mut file = RoutesFile {
        schema: vrouter_state::SCHEMA_VERSION,
        generation,
        ..RoutesFile::default()
    };
    file.stacks.insert(
        stack,
        StackRoutes {
            vni: Some(Vni::new(1000).unwrap()),
            routes,
        },
    );
    file
}

/// Panics unless `file` is exactly what `routes(file.generation, n)` wrote.
pub fn assert_whole(file: &RoutesFile, n: usize) {
    let stack = &file.stacks[&StackName::new("web").unwrap()];
    assert_eq!(
        stack.routes.len(),
        n,
        "route count of generation {}",
        file.generation
    );
    let host = Ipv4Addr::from(file.generation as u32);
    assert!(
        stack.routes.iter().all(|r| r.host == host),
        "generation {} mixes routes of other generations",
        file.generation
    );
}

/// Small deterministic-enough randomness without a crate (xorshift seeded by time).
pub struct Rng(u64);

impl Rng {
    pub fn from_time() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("rng seed {seed}");
        Rng(seed | 1)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A minimal probes file of `stack`.
pub fn probes_file(stack: &str) -> vrouter_state::ProbesFile {
    vrouter_state::ProbesFile {
        schema: vrouter_state::SCHEMA_VERSION,
        generation: 1,
        stack: vrouter_state::StackName::new(stack).unwrap(),
        updated_ms: vrouter_state::now_ms(),
        interval_ms: 250,
        peers: Vec::new(),
        health: None,
        traffic: Vec::new(),
        events: None,
        acl: Vec::new(),
    }
}
