//! Long-running processes in a namespace, with logs captured to files.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The `sh -c` script run under `unshare -m` inside `ip netns exec <ns>`; the command and
/// its arguments follow as `$@`.
///
/// - `ip netns exec` has already unshared a mount namespace and mounted a fresh sysfs;
///   `unshare -m` gives us a private copy (propagation private), so nothing leaks out.
/// - `/proc/sys` is not a mount point of its own: bind it onto itself first, then
///   `remount,bind,ro` changes only this mount's flags (not the proc superblock).
/// - `/sys` gets the same read-only bind remount, as in a Docker container.
/// - The copies of namespace mounts (`/run/netns/*`, Docker's `/run/docker/netns/*`)
///   are detached: a private copy of such a mount keeps that namespace alive for as long
///   as the daemon runs, even after `ip netns del` or Docker removed it. A restarted
///   router container's old namespace then keeps its overlay macvlan up, with the MAC
///   the new one needs, and the Docker test's router restart fails while any simulated
///   host started during it still runs.
/// - setpriv keeps only CAP_NET_ADMIN in the bounding, inheritable and ambient sets; as uid
///   0 the exec'd command then has CapEff = CapPrm = CapBnd = 0x1000.
pub const PRIVILEGED_WRAPPER: &str = "for m in $(cut -d' ' -f5 /proc/self/mountinfo | grep -E '^/run/(docker/)?netns/'); do umount -l \"$m\" 2>/dev/null; done; \
mount --bind /proc/sys /proc/sys && \
mount -o remount,bind,ro /proc/sys && \
mount -o remount,bind,ro /sys && \
exec setpriv --bounding-set=-all,+net_admin --inh-caps=-all,+net_admin --ambient-caps=-all,+net_admin -- \"$@\"";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A process started in a namespace. SIGKILLed (whole process group) on drop; its
/// stdout/stderr go to `<log_dir>/<name>.stdout|.stderr` and are printed on drop when the
/// test is panicking.
pub struct Daemon {
    pub name: String,
    pub ns: String,
    child: Child,
    exited: Option<ExitStatus>,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

fn basename(cmd: &str) -> String {
    Path::new(cmd)
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cmd".into())
}

fn start(
    ns: &str,
    log_dir: &Path,
    privileged_wrapper: bool,
    cmd: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Daemon> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(log_dir)
        .with_context(|| format!("creating log dir {}", log_dir.display()))?;
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let name = format!("{n:02}-{ns}-{}", basename(cmd));
    let stdout_path = log_dir.join(format!("{name}.stdout"));
    let stderr_path = log_dir.join(format!("{name}.stderr"));
    let out = File::create(&stdout_path)?;
    let err = File::create(&stderr_path)?;
    // Daemons under test get `ip netns exec` (a sysfs of their own network namespace, as
    // in a container); helpers join only the network namespace (see cmd.rs: a mount
    // namespace's teardown can stall for seconds on this kernel).
    let mut c = if privileged_wrapper {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        c
    } else {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}")).arg("--");
        c
    };
    if privileged_wrapper {
        c.args(["unshare", "-m", "--propagation", "private", "sh", "-c"])
            .arg(PRIVILEGED_WRAPPER)
            .arg("vrt-spawn");
    }
    c.arg(cmd).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let child = c
        .spawn()
        .with_context(|| format!("spawning {cmd} in {ns}"))?;
    Ok(Daemon {
        name,
        ns: ns.to_string(),
        child,
        exited: None,
        stdout_path,
        stderr_path,
    })
}

/// Run `cmd args` in network namespace `ns` "as Docker would": only CAP_NET_ADMIN,
/// read-only /proc/sys and /sys. See [`PRIVILEGED_WRAPPER`].
pub fn spawn_privileged_in(
    ns: &str,
    log_dir: &Path,
    cmd: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Daemon> {
    start(ns, log_dir, true, cmd, args, env)
}

/// Run `cmd args` in `ns` as full root (for test helpers such as probes).
pub fn spawn_in(
    ns: &str,
    log_dir: &Path,
    cmd: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Daemon> {
    start(ns, log_dir, false, cmd, args, env)
}

impl Daemon {
    /// Process id (after exec chains: `ip netns exec`, `unshare`, `sh` and `setpriv` all
    /// exec, so this is the command's own pid).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send `signal` (e.g. `libc::SIGTERM`) to the process only, as `docker stop` does.
    pub fn kill(&mut self, signal: i32) -> Result<()> {
        if self.exited.is_some() {
            bail!("{} already exited", self.name);
        }
        let r = unsafe { libc::kill(self.child.id() as i32, signal) };
        if r != 0 {
            bail!(
                "kill {} ({}): {}",
                self.name,
                self.child.id(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Non-blocking: the exit status if it has exited.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait()?;
        }
        Ok(self.exited)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.try_exit(), Ok(None))
    }

    /// Wait up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait for exit and require status 0 (errors carry the logs).
    pub fn wait_success(&mut self, timeout: Duration) -> Result<()> {
        match self.wait_exit(timeout)? {
            Some(st) if st.success() => Ok(()),
            Some(st) => bail!("{} exited with {st}\n{}", self.name, self.logs()),
            None => bail!(
                "{} still running after {timeout:?}\n{}",
                self.name,
                self.logs()
            ),
        }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Wait until `needle` appears in stdout or stderr (bounded by `timeout`).
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> bool {
        crate::wait_until(timeout, Duration::from_millis(20), || {
            self.stdout().contains(needle) || self.stderr().contains(needle)
        })
    }

    pub fn logs(&self) -> String {
        format!(
            "----- {} stdout ({}) -----\n{}----- {} stderr ({}) -----\n{}-----",
            self.name,
            self.stdout_path.display(),
            self.stdout(),
            self.name,
            self.stderr_path.display(),
            self.stderr()
        )
    }

    /// Print both logs to stderr (shown by the test harness on failure).
    pub fn dump_logs(&self) {
        eprintln!("{}", self.logs());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let pid = self.child.id() as i32;
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
            }
            let _ = self.wait_exit(Duration::from_secs(5));
        }
        if std::thread::panicking() {
            self.dump_logs();
        }
    }
}
