//! Running external commands (`ip`, `nft`, `sysctl`, ...) with a timeout on every call.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Default timeout for a single configuration command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(15);

/// Captured result of a finished command.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Human readable rendering of the command line.
    pub cmdline: String,
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Turn a non-zero exit into an error carrying stderr.
    pub fn check(self) -> Result<CmdOutput> {
        if self.success() {
            Ok(self)
        } else {
            bail!(
                "`{}` failed (exit {:?}): {}{}",
                self.cmdline,
                self.code,
                self.stderr.trim(),
                if self.stdout.trim().is_empty() {
                    String::new()
                } else {
                    format!(" [stdout: {}]", self.stdout.trim())
                }
            )
        }
    }
}

fn render(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run `cmd` to completion, feeding `input` on stdin, killing it (and its process group)
/// after `timeout`. A timeout is an error; a non-zero exit is not (see [`CmdOutput::check`]).
pub fn run_cmd(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Result<CmdOutput> {
    use std::os::unix::process::CommandExt;
    let cmdline = render(cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning `{cmdline}`"))?;
    let pid = child.id() as i32;
    let writer = input.map(|data| {
        let mut stdin = child.stdin.take().expect("piped stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    });
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            // Say where it hung before killing it.
            let _ = std::fs::write(
                std::env::temp_dir().join(format!("vrt-hang-{pid}")),
                where_stuck(pid),
            );
            eprintln!("`{cmdline}` hung: {}", where_stuck(pid));
            // Kill the whole process group so grandchildren do not keep the pipes open.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    match status {
        None => bail!(
            "`{cmdline}` timed out after {timeout:?}; stderr: {}",
            stderr.trim()
        ),
        Some(st) => Ok(CmdOutput {
            cmdline,
            code: st.code(),
            stdout,
            stderr,
        }),
    }
}

/// State, wait channel and kernel stack of a process and its children, for the message
/// of a command that timed out.
fn where_stuck(pid: i32) -> String {
    let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
    let mut out = String::new();
    let mut pids = vec![pid];
    let children = read(format!("/proc/{pid}/task/{pid}/children"));
    pids.extend(
        children
            .split_whitespace()
            .filter_map(|c| c.parse::<i32>().ok()),
    );
    for p in pids {
        let state = read(format!("/proc/{p}/stat"));
        let cmd = read(format!("/proc/{p}/cmdline")).replace('\0', " ");
        out.push_str(&format!(
            "[pid {p} {cmd}: {} wchan={} stack: {}] ",
            state.split_whitespace().nth(2).unwrap_or("?"),
            read(format!("/proc/{p}/wchan")),
            read(format!("/proc/{p}/stack")).replace('\n', " | ")
        ));
    }
    out
}

fn build(ns: Option<&str>, argv: &[&str]) -> Command {
    assert!(!argv.is_empty(), "empty command");
    match ns {
        // nsenter joins only the network namespace. `ip netns exec` also makes a mount
        // namespace (to remount /sys), and tearing that down waits for an expedited RCU
        // grace period, which on this VM kernel sometimes takes longer than the command's
        // whole timeout. /proc/sys/net follows the network namespace either way; /sys
        // does not, so read link details through netlink (`ip`), not /sys.
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg("--").args(argv);
            c
        }
        None => {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        }
    }
}

/// Run `argv` in network namespace `ns` (`None`: the caller's namespace) with the default
/// timeout. Returns the output whatever the exit code.
pub fn exec(ns: Option<&str>, argv: &[&str]) -> Result<CmdOutput> {
    exec_timeout(ns, argv, CMD_TIMEOUT)
}

/// [`exec`] with an explicit timeout.
pub fn exec_timeout(ns: Option<&str>, argv: &[&str], timeout: Duration) -> Result<CmdOutput> {
    run_cmd(&mut build(ns, argv), None, timeout)
}

/// Like [`exec`] but fails on a non-zero exit.
pub fn exec_ok(ns: Option<&str>, argv: &[&str]) -> Result<CmdOutput> {
    exec(ns, argv)?.check()
}

/// Run `argv` in `ns` with `input` on stdin; fails on a non-zero exit.
pub fn exec_input(ns: Option<&str>, argv: &[&str], input: &[u8]) -> Result<CmdOutput> {
    run_cmd(&mut build(ns, argv), Some(input), CMD_TIMEOUT)?.check()
}

/// Run a whitespace-split command line in `ns`; fails on a non-zero exit.
/// Convenient for `ip`/`bridge` recipes: `ns_run(Some(ns), "ip link set eth0 up")`.
pub fn ns_run(ns: Option<&str>, line: &str) -> Result<CmdOutput> {
    let argv: Vec<&str> = line.split_whitespace().collect();
    exec_ok(ns, &argv)
}

/// Run a `sh -c` script in `ns`; fails on a non-zero exit.
pub fn sh(ns: Option<&str>, script: &str) -> Result<CmdOutput> {
    exec_ok(ns, &["sh", "-c", script])
}
