//! What the root tests of this crate share: each runs on its own thread inside a
//! throwaway network namespace (`unshare(CLONE_NEWNET)` on that thread), so nothing
//! leaks into the host. Without root they print a skip line, except under CI=true,
//! where a skip would hide a regression, so they fail.
#![allow(dead_code)]

use nix::sched::{setns, unshare, CloneFlags};
use std::future::Future;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

/// The longest a test body may run.
pub const TIMEOUT: Duration = Duration::from_secs(60);

pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("root test skipped under CI: {test} needs root for network namespaces");
    }
    eprintln!("skipping {test}: needs root for network namespaces");
    false
}

/// Runs `body` on a new thread with a current-thread runtime, after `enter` has put
/// that thread in the namespace to use.
pub fn on_thread<F, Fut, T>(enter: impl FnOnce() + Send, body: F) -> T
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
    T: Send,
{
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || {
            enter();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async {
                tokio::time::timeout(TIMEOUT, body())
                    .await
                    .expect("test timed out")
            })
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Runs a test in a fresh network namespace.
pub fn in_new_netns<F, Fut>(test: &str, body: F)
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = ()>,
{
    if root_or_skip(test) {
        on_thread(
            || unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)"),
            body,
        );
    }
}

/// Runs `body` in the namespace behind `netns`.
pub fn in_netns<F, Fut, T>(netns: &OwnedFd, body: F) -> T
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = T>,
    T: Send,
{
    on_thread(
        || setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns"),
        body,
    )
}

/// A second namespace, kept alive by the descriptor (as a router hands it over).
pub fn spare_netns() -> OwnedFd {
    std::thread::spawn(|| {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").expect("open ns/net"))
    })
    .join()
    .expect("namespace thread")
}
