//! Overlay liveness probes: what each router writes about the remote routers it probes
//! over the overlay, and discovery reads to tell a host whose gossip membership failed
//! but whose datapath still works from a host that is really gone.
//!
//! One file per local stack, `probes/<stack>.json` in the state directory, written
//! atomically (no lock) by that stack's router ([`crate::StateDir::write_probes`])
//! and read without a lock ([`crate::StateDir::read_all_probes`]).

use crate::schema::Versioned;
use crate::types::StackName;
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// UDP port every router answers overlay probes on, bound to its router IP.
pub const OVERLAY_PROBE_PORT: u16 = 7471;

/// Subdirectory of the state directory holding the routers' probe files.
pub const PROBES_DIR: &str = "probes";

/// A probes file older than this is stale: its router is stuck or gone.
pub const PROBE_FRESH_MS: u64 = 5_000;

/// How far ahead of the reader's clock a probes file may be dated and still count
/// (the writer runs on the same host and clock; this only absorbs rounding).
pub const PROBE_FUTURE_SLACK_MS: u64 = 1_000;

/// `probes/<stack>.json`: one router's view of the remote routers it probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbesFile {
    /// [`crate::SCHEMA_VERSION`].
    pub schema: u32,
    /// Counts up with every write by this router process.
    pub generation: u64,
    /// The stack whose router wrote this file.
    pub stack: StackName,
    /// Milliseconds since the Unix epoch; a reader ignores a stale file.
    pub updated_ms: u64,
    /// Time between probes to each peer.
    pub interval_ms: u64,
    pub peers: Vec<PeerProbe>,
    /// The router's own health: routes in sync with routes.json, overlay link present.
    /// None from a router that does not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<RouterHealth>,
    /// Traffic to and from each remote stack, counted in the router's namespace.
    /// Empty when the router cannot count (see `RouterHealth::traffic_error`).
    #[serde(default)]
    pub traffic: Vec<StackTraffic>,
    /// The router's recent events. Routers write nothing in the shared directory but
    /// this file; discovery copies new events from here into events.log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<RouterEvents>,
    /// Per access-control rule, what it admitted and dropped (issue 14), in policy
    /// order, the default last. Empty from a router that does not enforce a policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acl: Vec<AclRuleCounters>,
}

/// Packets and bytes of one access-control rule of a router's policy, counted in the
/// kernel since the router started (kept across policy reloads). "Accepted" counts
/// every packet of the connections the rule admitted, both ways; "dropped" every
/// packet the rule dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclRuleCounters {
    /// The rule's name (unique in the policy), `(default)` for the default verdict,
    /// or a check before the rules: `(spoof from stack)`, `(spoof from overlay)`,
    /// `(tcp not syn)`, `(closed)`, `(fallback)` (rule names hold no parentheses).
    pub rule: String,
    /// The rule's verdict: `allow` or `deny`; `-` for a rule no longer in the policy
    /// (its totals stay).
    pub verdict: String,
    pub accepted_packets: u64,
    pub accepted_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

/// The router's access-control policy as it stands in the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclHealth {
    /// The default verdict in force: `allow` or `deny`.
    pub default: String,
    /// Rules of the policy in force.
    pub rules: u32,
    /// Counts up with every table the router installs (the ct mark's upper half).
    pub generation: u32,
    /// Why nothing enters the stack from the overlay: the policy could not be
    /// installed (the closed table is in force, or the overlay link is held down).
    /// The router's health fails while this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed: Option<String>,
    /// The last policy refused (a bad file on reload); the previous policy stays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Stacks rules name that routes.json does not list: their rules cover nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unresolved: Vec<StackName>,
}

/// Most events a router keeps for discovery to copy.
pub const ROUTER_EVENTS_KEPT: usize = 32;

/// A router's last [`ROUTER_EVENTS_KEPT`] events, numbered: `recent[i]` has sequence
/// number `next_seq - recent.len() + i`. `boot` is random per router process, so a
/// restarted router (numbering from 0 again) is told apart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterEvents {
    pub boot: u64,
    pub next_seq: u64,
    pub recent: Vec<crate::schema::Event>,
}

impl RouterEvents {
    /// Keeps `event`, dropping the oldest past the cap.
    pub fn push(&mut self, event: crate::schema::Event) {
        if self.recent.len() >= ROUTER_EVENTS_KEPT {
            self.recent.remove(0);
        }
        self.recent.push(event);
        self.next_seq += 1;
    }

    /// The events after `cursor` (`(boot, next_seq)` of what was copied before), and the
    /// cursor after them. Another boot than the cursor's means a new router process:
    /// all its events are new.
    pub fn after(&self, cursor: Option<(u64, u64)>) -> (Vec<crate::schema::Event>, (u64, u64)) {
        let first = self.next_seq.saturating_sub(self.recent.len() as u64);
        let from = match cursor {
            Some((boot, seq)) if boot == self.boot => seq,
            _ => 0,
        };
        let new = self
            .recent
            .iter()
            .enumerate()
            .filter(|(i, _)| first.saturating_add(*i as u64) >= from)
            .map(|(_, e)| e.clone())
            .collect();
        (new, (self.boot, self.next_seq.max(from)))
    }
}

/// What the router knows about its own datapath (written with the probes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterHealth {
    /// Remote routes routes.json asks for (this stack's entry).
    pub routes_desired: u32,
    /// Of those, present in the kernel as desired at the last check.
    pub routes_installed: u32,
    /// Routes or neighbours the router found wrong or missing and repaired, since start.
    pub drift_repaired: u64,
    /// The overlay link (`ovl<VNI>`) exists in the router's namespace and is up.
    pub overlay_link_up: bool,
    /// The last reconcile error, if the last reconcile failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why traffic counters are missing, if they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_error: Option<String>,
    /// When the router's control loop last completed a reconcile (ms since the Unix
    /// epoch); its healthcheck fails when that is more than three intervals ago.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconciled_ms: Option<u64>,
    /// The access-control policy (issue 14); None from a router without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl: Option<AclHealth>,
}

/// Bytes and packets between this stack and one remote stack, in IP bytes (the IP
/// header and payload, no Ethernet or VXLAN overhead), counted by the router's
/// forwarding path since the counters were created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackTraffic {
    /// The remote stack.
    pub stack: StackName,
    /// Forwarded from this stack toward the remote stack.
    pub tx_bytes: u64,
    pub tx_packets: u64,
    /// Forwarded from the remote stack into this stack.
    pub rx_bytes: u64,
    pub rx_packets: u64,
}

/// The path-MTU check of one peer: a probe of exactly the overlay MTU, sent with DF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MtuCheck {
    /// IP bytes of the probe (the overlay link's MTU).
    pub size: u32,
    /// The full-size probe was answered at the last check.
    pub ok: bool,
    /// When the last check finished (ms since the Unix epoch).
    pub checked_ms: u64,
}

/// One remote router as seen by the probing router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerProbe {
    /// The remote router's overlay address (the routes' gateway).
    pub router_ip: Ipv4Addr,
    /// The remote stack.
    pub stack: StackName,
    /// Underlay address of the host carrying the remote stack (`RemoteRoute.host`).
    pub host: Ipv4Addr,
    /// When the last answer arrived (ms since the Unix epoch); None if none ever did.
    pub last_ok_ms: Option<u64>,
    /// Round-trip time of the last answer, in microseconds.
    pub rtt_us: Option<u64>,
    /// Requests sent since the peer appeared.
    pub sent: u64,
    /// Answers received since the peer appeared.
    pub received: u64,
    /// An answer arrived within the reach window (three intervals).
    pub reachable: bool,
    /// Smoothed round-trip time (microseconds), over recent answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srtt_us: Option<u64>,
    /// Requests in the recent loss window (the last 10 s or so) and how many of them
    /// got no answer; loss = recent_lost / recent_sent.
    #[serde(default)]
    pub recent_sent: u32,
    #[serde(default)]
    pub recent_lost: u32,
    /// The full-MTU check, once one has run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<MtuCheck>,
}

impl ProbesFile {
    /// Written within [`PROBE_FRESH_MS`] before `now_ms`. A file dated in the future
    /// (beyond [`PROBE_FUTURE_SLACK_MS`]) is not fresh: otherwise a router, or anyone
    /// who can write the shared directory, could make its claims count forever.
    pub fn is_fresh(&self, now_ms: u64) -> bool {
        if self.updated_ms > now_ms.saturating_add(PROBE_FUTURE_SLACK_MS) {
            return false;
        }
        now_ms.saturating_sub(self.updated_ms) <= PROBE_FRESH_MS
    }

    /// The file's name inside [`PROBES_DIR`].
    pub fn file_name(stack: &StackName) -> String {
        format!("{stack}.json")
    }
}

impl Versioned for ProbesFile {
    fn schema(&self) -> u32 {
        self.schema
    }
    fn generation(&self) -> u64 {
        self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{StateDir, SCHEMA_VERSION};

    use crate::test_dir::TempDir;

    fn file(stack: &str, generation: u64) -> ProbesFile {
        ProbesFile {
            schema: SCHEMA_VERSION,
            generation,
            stack: StackName::new(stack).unwrap(),
            updated_ms: 1_700_000_000_000,
            interval_ms: 250,
            peers: vec![
                PeerProbe {
                    router_ip: "10.2.0.254".parse().unwrap(),
                    stack: StackName::new("b").unwrap(),
                    host: "192.168.0.2".parse().unwrap(),
                    last_ok_ms: Some(1_699_999_999_900),
                    rtt_us: Some(412),
                    sent: 10,
                    received: 9,
                    reachable: true,
                    srtt_us: Some(400),
                    recent_sent: 40,
                    recent_lost: 1,
                    mtu: Some(MtuCheck {
                        size: 1450,
                        ok: true,
                        checked_ms: 1_699_999_999_000,
                    }),
                },
                PeerProbe {
                    router_ip: "10.3.0.254".parse().unwrap(),
                    stack: StackName::new("c").unwrap(),
                    host: "192.168.0.3".parse().unwrap(),
                    last_ok_ms: None,
                    rtt_us: None,
                    sent: 10,
                    received: 0,
                    reachable: false,
                    srtt_us: None,
                    recent_sent: 0,
                    recent_lost: 0,
                    mtu: None,
                },
            ],
            health: Some(RouterHealth {
                routes_desired: 2,
                routes_installed: 2,
                drift_repaired: 0,
                overlay_link_up: true,
                last_error: None,
                traffic_error: None,
                reconciled_ms: None,
                acl: Some(AclHealth {
                    default: "deny".into(),
                    rules: 1,
                    generation: 3,
                    closed: None,
                    refused: None,
                    unresolved: vec![StackName::new("z").unwrap()],
                }),
            }),
            traffic: vec![StackTraffic {
                stack: StackName::new("b").unwrap(),
                tx_bytes: 1000,
                tx_packets: 10,
                rx_bytes: 2000,
                rx_packets: 20,
            }],
            events: None,
            acl: vec![AclRuleCounters {
                rule: "web https".into(),
                verdict: "allow".into(),
                accepted_packets: 12,
                accepted_bytes: 3400,
                dropped_packets: 0,
                dropped_bytes: 0,
            }],
        }
    }

    fn sorted(mut v: Vec<ProbesFile>) -> Vec<ProbesFile> {
        v.sort_by(|a, b| a.stack.cmp(&b.stack));
        v
    }

    #[test]
    fn round_trip_creates_the_directory() {
        let tmp = TempDir::new("state-probes");
        let dir = StateDir::open(tmp.path()).unwrap();
        assert!(dir.read_all_probes().is_empty(), "no probes directory yet");
        let a = file("a", 1);
        dir.write_probes(&a).unwrap();
        assert!(tmp.path().join(PROBES_DIR).join("a.json").is_file());
        assert_eq!(dir.read_all_probes(), vec![a.clone()]);

        // A rewrite replaces; another stack adds a file.
        let mut a2 = file("a", 2);
        a2.peers.pop();
        dir.write_probes(&a2).unwrap();
        let b = file("b", 7);
        dir.write_probes(&b).unwrap();
        assert_eq!(sorted(dir.read_all_probes()), vec![a2, b]);

        // No temp files are left behind.
        let names: Vec<String> = std::fs::read_dir(tmp.path().join(PROBES_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_file_without_acl_fields_reads_and_writes_as_before() {
        let mut f = file("a", 1);
        f.acl.clear();
        f.health.as_mut().unwrap().acl = None;
        let json = serde_json::to_string(&f).unwrap();
        assert!(!json.contains("acl"), "{json}");
        let back: ProbesFile = serde_json::from_str(&json).unwrap();
        assert_eq!(back, f);
        // And with them, they round-trip.
        let full = file("a", 1);
        let json = serde_json::to_string(&full).unwrap();
        assert!(
            json.contains(r#""acl":[{"rule":"web https","verdict":"allow","accepted_packets":12"#),
            "{json}"
        );
        assert!(json.contains(r#""unresolved":["z"]"#), "{json}");
        assert_eq!(serde_json::from_str::<ProbesFile>(&json).unwrap(), full);
    }

    #[test]
    fn unusable_files_are_skipped() {
        let tmp = TempDir::new("state-probes");
        let dir = StateDir::open(tmp.path()).unwrap();
        let a = file("a", 1);
        dir.write_probes(&a).unwrap();
        let probes = tmp.path().join(PROBES_DIR);
        let full = serde_json::to_string(&file("t", 1)).unwrap();
        // Torn (a writer that bypassed the atomic rename), garbage, another schema,
        // the wrong shape, a stray temp file and a directory.
        std::fs::write(probes.join("t.json"), &full[..full.len() / 2]).unwrap();
        std::fs::write(probes.join("g.json"), b"\x00\xffnot json").unwrap();
        let mut other = file("o", 1);
        other.schema = SCHEMA_VERSION + 1;
        std::fs::write(probes.join("o.json"), serde_json::to_vec(&other).unwrap()).unwrap();
        std::fs::write(probes.join("s.json"), br#"{"schema":1,"peers":3}"#).unwrap();
        std::fs::write(probes.join(".a.json.tmp.1.0"), full.as_bytes()).unwrap();
        std::fs::create_dir(probes.join("d.json")).unwrap();
        assert_eq!(dir.read_all_probes(), vec![a]);
    }

    #[test]
    fn router_events_after_a_cursor() {
        let ev = |i: u64| crate::Event::new("router/a", crate::EventKind::Started, format!("{i}"));
        let mut r = RouterEvents {
            boot: 7,
            ..Default::default()
        };
        for i in 0..40 {
            r.push(ev(i));
        }
        assert_eq!(r.recent.len(), ROUTER_EVENTS_KEPT);
        assert_eq!(r.next_seq, 40);
        let (all, cur) = r.after(None);
        assert_eq!(all.len(), ROUTER_EVENTS_KEPT);
        assert_eq!(all[0].message, "8");
        assert_eq!(cur, (7, 40));
        assert!(r.after(Some(cur)).0.is_empty());
        r.push(ev(40));
        let (new, cur) = r.after(Some(cur));
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].message, "40");
        assert_eq!(cur, (7, 41));
        // A new router process: everything it kept is new.
        let fresh = RouterEvents {
            boot: 8,
            next_seq: 1,
            recent: vec![ev(0)],
        };
        assert_eq!(fresh.after(Some(cur)).0.len(), 1);
        // A file that goes backwards (forged) never repeats what was copied.
        let back = RouterEvents {
            boot: 7,
            next_seq: 20,
            recent: vec![ev(19)],
        };
        let (none, cur2) = back.after(Some(cur));
        assert!(none.is_empty());
        assert_eq!(cur2, (7, 41));
    }

    #[test]
    fn a_file_dated_in_the_future_is_not_fresh() {
        let now = 1_700_000_000_000;
        let mut f = file("a", 1);
        f.updated_ms = now - 300;
        assert!(f.is_fresh(now));
        f.updated_ms = now - PROBE_FRESH_MS - 1;
        assert!(!f.is_fresh(now), "stale");
        f.updated_ms = now + 500;
        assert!(f.is_fresh(now), "within the slack");
        f.updated_ms = now + 3_600_000;
        assert!(!f.is_fresh(now), "an hour ahead");
        f.updated_ms = u64::MAX;
        assert!(!f.is_fresh(now), "the end of time");
    }

    #[test]
    fn links_fifos_and_huge_files_in_probes_do_not_stall_or_bloat_the_reader() {
        use std::os::unix::fs::symlink;
        use std::time::{Duration, Instant};
        let tmp = TempDir::new("state-probes");
        let dir = StateDir::open(tmp.path()).unwrap();
        let a = file("a", 1);
        dir.write_probes(&a).unwrap();
        let probes = tmp.path().join(PROBES_DIR);
        let secret = tmp.path().join("secret.json");
        std::fs::write(&secret, serde_json::to_vec(&file("s", 1)).unwrap()).unwrap();
        symlink(&secret, probes.join("s.json")).unwrap();
        symlink("/dev/zero", probes.join("zero.json")).unwrap();
        nix::unistd::mkfifo(
            &probes.join("fifo.json"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        // Valid JSON, padded past the cap.
        let mut big = serde_json::to_vec(&file("big", 1)).unwrap();
        big.pop();
        big.extend(std::iter::repeat_n(
            b' ',
            crate::store::MAX_PROBES_FILE_BYTES as usize,
        ));
        big.push(b'}');
        std::fs::write(probes.join("big.json"), big).unwrap();

        let start = Instant::now();
        assert_eq!(dir.read_all_probes(), vec![a.clone()]);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );

        // probes/ itself a link: not followed, for reading or writing.
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::rename(&probes, &elsewhere).unwrap();
        symlink(&elsewhere, &probes).unwrap();
        assert!(dir.read_all_probes().is_empty());
        assert!(dir.write_probes(&a).is_err());
    }

    #[test]
    fn writing_probes_takes_no_lock() {
        let tmp = TempDir::new("state-probes");
        let dir = StateDir::open(tmp.path()).unwrap();
        dir.write_probes(&file("a", 1)).unwrap();
        assert!(
            !tmp.path().join(crate::STATE_LOCK_FILE).exists(),
            "a router made or took the old shared state.lock"
        );
    }

    #[test]
    fn read_only_dir_cannot_write_probes() {
        let tmp = TempDir::new("state-probes");
        let dir = StateDir::open_readonly(tmp.path()).unwrap();
        assert!(dir.write_probes(&file("a", 1)).is_err());
        assert!(dir.read_all_probes().is_empty());
    }
}
