//! Removal of everything a (possibly crashed) test run left behind.

use std::time::Duration;

use anyhow::Result;

use crate::cmd::exec;

/// Network namespaces whose name starts with `<prefix>-`.
pub fn list_namespaces(prefix: &str) -> Vec<String> {
    let pat = format!("{prefix}-");
    let mut v = Vec::new();
    if let Ok(out) = exec(None, &["ip", "netns", "list"]) {
        for line in out.stdout.lines() {
            if let Some(name) = line.split_whitespace().next() {
                if name.starts_with(&pat) {
                    v.push(name.to_string());
                }
            }
        }
    }
    v
}

/// Links in the caller's namespace whose name starts with `<prefix>-`.
pub fn list_links(prefix: &str) -> Vec<String> {
    let pat = format!("{prefix}-");
    let mut v = Vec::new();
    if let Ok(out) = exec(None, &["ip", "-o", "link", "show"]) {
        for line in out.stdout.lines() {
            // "12: name@peer: <...>"
            if let Some(name) = line.split(": ").nth(1) {
                let name = name.split('@').next().unwrap_or(name);
                if name.starts_with(&pat) {
                    v.push(name.to_string());
                }
            }
        }
    }
    v
}

/// SIGKILL every process in namespace `ns` (`ip netns pids`), bounded.
pub fn kill_ns_pids(ns: &str) {
    for _ in 0..20 {
        let pids: Vec<i32> = exec(None, &["ip", "netns", "pids", ns])
            .map(|o| {
                o.stdout
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let me = std::process::id() as i32;
        let pids: Vec<i32> = pids.into_iter().filter(|p| *p != me).collect();
        if pids.is_empty() {
            return;
        }
        for p in pids {
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Delete namespace `ns` after killing its processes. Missing namespaces are fine.
pub fn delete_namespace(ns: &str) {
    kill_ns_pids(ns);
    let _ = exec(None, &["ip", "netns", "del", ns]);
}

/// Remove every `<prefix>-*` namespace (killing its processes first) and every
/// `<prefix>-*` link in the caller's namespace. Returns what was removed.
pub fn cleanup_leftovers(prefix: &str) -> Result<Vec<String>> {
    assert!(!prefix.is_empty(), "empty prefix");
    let mut removed = Vec::new();
    for ns in list_namespaces(prefix) {
        delete_namespace(&ns);
        removed.push(format!("netns {ns}"));
    }
    for link in list_links(prefix) {
        // A veth peer disappears with its pair: only count what we actually deleted.
        if exec(None, &["ip", "link", "del", &link])
            .map(|o| o.success())
            .unwrap_or(false)
        {
            removed.push(format!("link {link}"));
        }
    }
    Ok(removed)
}
