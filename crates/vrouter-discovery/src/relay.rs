//! Router events into events.log. A router writes nothing in the shared directory but
//! its own probes file, and its recent events travel in it (`ProbesFile::events`);
//! discovery copies the new ones into events.log. What is copied is remembered per
//! stack in the private directory (`relayed.json`), so a discovery restart repeats
//! nothing. The file is untrusted: each event is stamped with the stack whose file it
//! came from (source `router/<stack>`), never dated in the future, and its text is
//! capped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tracing::warn;
use vrouter_state::{now_ms, Event, EventKind, StackName, StateDir};

/// Discovery's record of what it copied: per stack, `(boot, next_seq)`.
pub const RELAYED_FILE: &str = "relayed.json";

/// At most one pass per this long, except on the reconcile timer.
const MIN_SPACING: Duration = Duration::from_secs(1);

const MAX_KIND: usize = 64;
const MAX_MESSAGE: usize = 2000;

pub struct Relay {
    dir: StateDir,
    cursors: BTreeMap<StackName, (u64, u64)>,
    last: Option<Instant>,
}

impl Relay {
    pub fn new(dir: StateDir) -> Relay {
        let cursors = dir
            .private()
            .and_then(|p| p.read(RELAYED_FILE, 4 * 1024 * 1024).ok().flatten())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Relay {
            dir,
            cursors,
            last: None,
        }
    }

    /// Copies the routers' new events into events.log; at most once a second unless
    /// `force`.
    pub fn run(&mut self, force: bool) {
        if !force && self.last.is_some_and(|t| t.elapsed() < MIN_SPACING) {
            return;
        }
        self.last = Some(Instant::now());
        let files = self.dir.read_all_probes();
        let before = self.cursors.clone();
        let now = now_ms();
        for f in &files {
            let Some(events) = &f.events else { continue };
            let (new, cursor) = events.after(self.cursors.get(&f.stack).copied());
            for e in new {
                if let Err(err) = self.dir.append_event(&sanitize(e, &f.stack, now)) {
                    warn!("cannot append a router event to events.log: {err}");
                }
            }
            self.cursors.insert(f.stack.clone(), cursor);
        }
        self.cursors
            .retain(|s, _| files.iter().any(|f| &f.stack == s));
        if self.cursors != before {
            let bytes = serde_json::to_vec(&self.cursors).expect("cursors serialise");
            if let Some(Err(e)) = self.dir.private().map(|p| p.write(RELAYED_FILE, &bytes)) {
                warn!("cannot record the copied router events: {e}");
            }
        }
    }
}

fn cap(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// A router's event as discovery writes it: attributed to the stack whose file it came
/// from, not later than now, its text capped.
pub fn sanitize(mut e: Event, stack: &StackName, now: u64) -> Event {
    e.source = format!("router/{stack}");
    e.stack = Some(stack.clone());
    e.ts_ms = e.ts_ms.min(now);
    if let EventKind::Other(k) = &mut e.kind {
        cap(k, MAX_KIND);
    }
    cap(&mut e.reason, MAX_KIND);
    cap(&mut e.message, MAX_MESSAGE);
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use vrouter_state::{ProbesFile, RouterEvents, SCHEMA_VERSION};

    #[test]
    fn a_forged_event_is_attributed_to_its_file_and_capped() {
        let a = StackName::new("a").unwrap();
        let mut e = Event::new(
            "discovery",
            EventKind::Other("x".repeat(100)),
            "é".repeat(3000),
        );
        e.stack = Some(StackName::new("b").unwrap());
        e.ts_ms = u64::MAX;
        let s = sanitize(e, &a, 1_000);
        assert_eq!(s.source, "router/a");
        assert_eq!(s.stack, Some(a));
        assert_eq!(s.ts_ms, 1_000);
        assert_eq!(s.kind.as_str().len(), MAX_KIND);
        assert!(s.message.len() <= MAX_MESSAGE);
    }

    #[test]
    fn events_are_copied_once_across_restarts() {
        let base = std::env::temp_dir().join(format!("vrt-relay-{}", std::process::id()));
        let private = base.with_extension("private");
        let _ = std::fs::remove_dir_all(&base);
        let _ = std::fs::remove_dir_all(&private);
        std::fs::create_dir_all(base.join("probes")).unwrap();
        let dir = || StateDir::open_discovery(&base, &private).unwrap();
        let mut events = RouterEvents {
            boot: 5,
            ..Default::default()
        };
        events.push(Event::new("router/a", EventKind::SameHostBlocked, "one"));
        let write = |events: &RouterEvents| {
            let f = ProbesFile {
                schema: SCHEMA_VERSION,
                generation: 1,
                stack: StackName::new("a").unwrap(),
                updated_ms: now_ms(),
                interval_ms: 250,
                peers: vec![],
                health: None,
                traffic: vec![],
                events: Some(events.clone()),
                acl: vec![],
            };
            std::fs::write(base.join("probes/a.json"), serde_json::to_vec(&f).unwrap()).unwrap();
        };
        write(&events);
        let mut relay = Relay::new(dir());
        relay.run(true);
        relay.run(true);
        let count = || {
            dir()
                .read_events()
                .unwrap()
                .iter()
                .filter(|e| e.source == "router/a")
                .count()
        };
        assert_eq!(count(), 1);
        // A restarted discovery copies nothing twice; a new event once.
        events.push(Event::new("router/a", EventKind::SameHostOk, "two"));
        write(&events);
        let mut relay = Relay::new(dir());
        relay.run(true);
        relay.run(true);
        assert_eq!(count(), 2);
        let _ = std::fs::remove_dir_all(&base);
        let _ = std::fs::remove_dir_all(&private);
    }
}
