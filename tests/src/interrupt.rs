//! What every bench binary does around its run: refuse to start without root, turn
//! SIGINT/SIGTERM into a stop flag (the run ends after the current measurement, so the
//! harness's Drop removes the namespaces and daemons), and exit 1 with the error.

use anyhow::{bail, Result};
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether a stop was asked for.
pub fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// An error once a stop was asked for.
pub fn check_stop() -> Result<()> {
    if stopped() {
        bail!("interrupted; cleaning up");
    }
    Ok(())
}

/// Runs `run` as the bench `name`, as described above.
pub fn main_as_root(name: &str, run: impl FnOnce() -> Result<()>) {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("{name}: needs root (network namespaces)");
        std::process::exit(1);
    }
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if let Err(e) = run() {
        eprintln!("{name}: {e:#}");
        std::process::exit(1);
    }
}
