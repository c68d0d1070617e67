//! Test-only crash points. `VROUTER_CRASH_AT=<point>[:<n>]` in a daemon's environment
//! makes it kill itself with SIGKILL the `n`-th time (default: the first) it passes
//! `crash::point("<point>")`: no destructor, no flush, no unlock, exactly what
//! `kill -9` at that instant leaves behind. The chaos tests use it to crash inside the
//! risky windows (after each apply and publish step) that random kills rarely hit.
//!
//! Unset (production), a call costs one atomic load after the first. A malformed value
//! is ignored with a warning, never a crash. Points are listed in docs/operations.md
//! (Crash points) and found with `grep -rn 'crash::point(' crates`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms one crash point.
pub const ENV: &str = "VROUTER_CRASH_AT";

struct Armed {
    point: String,
    nth: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var(ENV).ok()?;
            match parse(&v) {
                Some((point, nth)) => Some(Armed {
                    point,
                    nth,
                    seen: AtomicU64::new(0),
                }),
                None => {
                    tracing::warn!(
                        "{ENV}={v:?} ignored: expected <point> or <point>:<n> with n >= 1"
                    );
                    None
                }
            }
        })
        .as_ref()
}

/// Parses `<point>[:<n>]`.
pub fn parse(v: &str) -> Option<(String, u64)> {
    let (point, nth) = match v.rsplit_once(':') {
        Some((p, n)) => (p, n.parse::<u64>().ok().filter(|n| *n >= 1)?),
        None => (v, 1),
    };
    let ok = !point.is_empty()
        && point
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    ok.then(|| (point.to_string(), nth))
}

/// A crash point: kills the process here when it is the armed one and this is the
/// armed pass.
pub fn point(name: &str) {
    let Some(a) = armed() else { return };
    if a.point != name {
        return;
    }
    if a.seen.fetch_add(1, Ordering::SeqCst) + 1 == a.nth {
        eprintln!("crash point {name} (pass {}): SIGKILL", a.nth);
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        // SIGKILL cannot be caught; should raise fail, still die without unwinding.
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_point_and_pass() {
        assert_eq!(
            parse("discovery.after_fdb"),
            Some(("discovery.after_fdb".into(), 1))
        );
        assert_eq!(
            parse("router.after_routes:3"),
            Some(("router.after_routes".into(), 3))
        );
        assert_eq!(parse("x:0"), None);
        assert_eq!(parse("x:y"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("a b"), None);
    }
}
