//! The state directory under contention, crashes and bad files.

mod common;

use common::{assert_whole, discovery, private_path, role, routes, Rng, RoleChild, TempDir};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vrouter_state::{
    DiscoveryFile, Event, EventKind, ReadError, RoutesFile, StateDir, StateError, EVENTS_FILE,
    LEADER_LOCK_FILE, ROUTES_FILE, SCHEMA_VERSION, STATE_LOCK_FILE,
};

/// Routes per file in the contention test (~60 KB of pretty JSON).
const ROUTES_SMALL: usize = 300;
/// Routes per file in the crash test (~1.3 MB, so a kill often lands mid-write).
const ROUTES_BIG: usize = 6000;
const UPDATES_PER_WRITER: u64 = 40;

/// Entry point of child processes (see common::RoleChild); does nothing in a normal
/// run.
#[test]
fn child_process_entry() {
    let Some((role, dir, arg)) = role() else {
        return;
    };
    match role.as_str() {
        "writer" => {
            let state = discovery(&dir);
            write_generations(&state, &format!("process-{arg}"));
        }
        "big_writer" => {
            let state = discovery(&dir);
            // Bounded: the parent kills it long before this ends.
            for _ in 0..2000 {
                state
                    .update_routes(|prev| routes(prev.unwrap().generation + 1, ROUTES_BIG))
                    .unwrap();
            }
        }
        "leader" => {
            let state = discovery(&dir);
            let _lock = state.try_lead().unwrap().expect("leader lock is free");
            println!("LEADING");
            std::thread::sleep(Duration::from_secs(30));
        }
        "shared_lock_holder" => {
            // A router of an older version, or a hostile one, holding the shared
            // state.lock (or frozen by `docker pause` while holding it).
            let f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(dir.join(STATE_LOCK_FILE))
                .unwrap();
            f.lock().unwrap();
            println!("HOLDING");
            std::thread::sleep(Duration::from_secs(60));
        }
        "open" => match StateDir::open(&dir) {
            Ok(_) => println!("OPEN ok"),
            Err(e) => println!("OPEN {e}"),
        },
        other => panic!("unknown role {other}"),
    }
}

/// One writer's share of the contention test: generations derived from the file
/// under the lock, and one event per write.
fn write_generations(state: &StateDir, writer: &str) {
    for i in 0..UPDATES_PER_WRITER {
        state
            .update_routes(|prev| routes(prev.unwrap().generation + 1, ROUTES_SMALL))
            .unwrap();
        state
            .append_event(&Event::new(
                writer,
                EventKind::Started,
                format!("write {i}"),
            ))
            .unwrap();
    }
}

fn temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect()
}

#[test]
fn concurrent_writers_and_readers_never_see_a_torn_file() {
    let tmp = TempDir::new("contention");
    let state = Arc::new(discovery(tmp.path()));
    state.write_routes(&routes(0, ROUTES_SMALL)).unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let state = Arc::clone(&state);
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                let (mut last, mut reads) = (0u64, 0u64);
                while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let file = state.read_routes().unwrap_or_else(|e| panic!("{e}"));
                    assert_whole(&file, ROUTES_SMALL);
                    assert!(
                        file.generation >= last,
                        "went back {last} -> {}",
                        file.generation
                    );
                    last = file.generation;
                    reads += 1;
                    // Every newline-terminated line of events.log parses; only the
                    // line being appended right now may be incomplete.
                    let log = fs::read(state.events_path()).unwrap_or_default();
                    let end = log.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                    for line in log[..end].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                        serde_json::from_slice::<Event>(line).expect("events.log line parses");
                    }
                }
                (reads, last)
            })
        })
        .collect();

    let started = Instant::now();
    let mut children: Vec<_> = (0..3)
        .map(|i| RoleChild::spawn("writer", tmp.path(), &i.to_string()))
        .collect();
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let state = Arc::clone(&state);
            std::thread::spawn(move || write_generations(&state, &format!("thread-{i}")))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for c in &mut children {
        c.wait_success(Duration::from_secs(120));
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let mut total_reads = 0;
    for r in readers {
        let (reads, _) = r.join().unwrap();
        assert!(reads > 0);
        total_reads += reads;
    }

    // Every read-modify-write ran alone under the lock: no generation was lost.
    let writes = 6 * UPDATES_PER_WRITER;
    let last = state.read_routes().unwrap();
    assert_eq!(last.generation, writes);
    let events = state.read_events().unwrap();
    assert_eq!(
        events.len() as u64,
        writes,
        "every appended event is a whole line"
    );
    for w in [
        "thread-0",
        "thread-1",
        "thread-2",
        "process-0",
        "process-1",
        "process-2",
    ] {
        let mine: Vec<_> = events.iter().filter(|e| e.source == w).collect();
        assert_eq!(mine.len() as u64, UPDATES_PER_WRITER, "{w}");
        assert_eq!(
            mine.last().unwrap().message,
            format!("write {}", UPDATES_PER_WRITER - 1)
        );
    }
    assert!(temp_files(tmp.path()).is_empty());
    let mode = fs::metadata(state.routes_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
    let text = fs::read_to_string(state.routes_path()).unwrap();
    assert!(
        text.ends_with("}\n") && text.contains("\n  \"generation\""),
        "pretty JSON"
    );
    eprintln!(
        "{writes} writes by 3 threads + 3 processes in {elapsed:?}; {total_reads} reads, none torn"
    );
}

#[test]
fn writer_killed_mid_write_never_leaves_a_torn_file() {
    let tmp = TempDir::new("killed");
    let state = discovery(tmp.path());
    state.write_routes(&routes(0, ROUTES_BIG)).unwrap();
    // A temp file from some earlier crash, with garbage in it.
    let stale = tmp.path().join(format!(".{ROUTES_FILE}.tmp.999999.0"));
    fs::write(&stale, b"{\"schema\": 1, \"gener").unwrap();

    let mut rng = Rng::from_time();
    let (mut last, mut kills_leaving_temp) = (0u64, 0);
    for i in 0..20 {
        let mut child = RoleChild::spawn("big_writer", tmp.path(), "");
        if i % 4 == 3 {
            // Every fourth child first proves that writers still make progress after
            // the kills before it (a lock left held would stop them here).
            let deadline = Instant::now() + Duration::from_secs(60);
            while state.read_routes().unwrap().generation == last {
                assert!(Instant::now() < deadline, "no writer progress after a kill");
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(rng.below(60)));
        } else {
            std::thread::sleep(Duration::from_millis(30 + rng.below(300)));
        }
        child.sigkill();
        if !temp_files(tmp.path()).is_empty() {
            kills_leaving_temp += 1;
        }
        let file = state.read_routes().unwrap_or_else(|e| panic!("{e}"));
        assert_whole(&file, ROUTES_BIG);
        assert!(file.generation >= last);
        last = file.generation;
    }
    assert!(last >= 5, "each fourth child completed a write");

    // The next write under the lock sweeps every leftover temp file.
    state
        .update_routes(|prev| routes(prev.unwrap().generation + 1, ROUTES_BIG))
        .unwrap();
    assert!(
        temp_files(tmp.path()).is_empty(),
        "{:?}",
        temp_files(tmp.path())
    );
    assert_eq!(state.read_routes().unwrap().generation, last + 1);
    eprintln!(
        "20 kills: {last} generations written, {kills_leaving_temp} kills left a temp file behind"
    );
}

#[test]
fn read_errors_say_what_is_wrong() {
    let tmp = TempDir::new("read-errors");
    let state = discovery(tmp.path());
    let path = state.routes_path();

    let e = state.read_routes().unwrap_err();
    assert!(matches!(e, ReadError::Missing { .. }), "{e:?}");
    assert!(e.to_string().contains("does not exist yet"), "{e}");

    fs::write(&path, b"hello, world\n").unwrap();
    let e = state.read_routes().unwrap_err();
    assert!(matches!(e, ReadError::Corrupt { .. }), "{e:?}");
    assert!(e.to_string().contains("not valid"), "{e}");

    // Partial: a valid file cut in half.
    state.write_routes(&routes(3, 10)).unwrap();
    let whole = fs::read(&path).unwrap();
    fs::write(&path, &whole[..whole.len() / 2]).unwrap();
    assert!(matches!(
        state.read_routes().unwrap_err(),
        ReadError::Corrupt { .. }
    ));

    // Right schema, wrong shape.
    fs::write(&path, br#"{"schema": 1, "generation": "three"}"#).unwrap();
    assert!(matches!(
        state.read_routes().unwrap_err(),
        ReadError::Corrupt { .. }
    ));
    fs::write(&path, br#"{"generation": 3}"#).unwrap();
    assert!(matches!(
        state.read_routes().unwrap_err(),
        ReadError::Corrupt { .. }
    ));

    // A future version is reported as such even when its shape is unknown to us.
    fs::write(&path, br#"{"schema": 99, "whatever": []}"#).unwrap();
    match state.read_routes().unwrap_err() {
        e @ ReadError::UnknownSchema {
            found: 99,
            expected,
            ..
        } => {
            assert_eq!(expected, SCHEMA_VERSION);
            assert!(e.to_string().contains("schema version 99"), "{e}");
        }
        e => panic!("{e:?}"),
    }

    state.write_routes(&routes(4, 10)).unwrap();
    assert_eq!(state.read_routes().unwrap(), routes(4, 10));
    let e = state.read_discovery().unwrap_err();
    assert!(matches!(e, ReadError::Missing { .. }), "{e:?}");
}

#[test]
fn update_sees_the_current_file_or_why_not() {
    let tmp = TempDir::new("update");
    let state = discovery(tmp.path());
    let mut seen = None;
    state
        .update_routes(|prev| {
            seen = Some(matches!(prev, Err(ReadError::Missing { .. })));
            routes(1, 2)
        })
        .unwrap();
    assert_eq!(seen, Some(true));
    let next = state
        .update_routes(|prev| routes(prev.unwrap().generation + 1, 2))
        .unwrap();
    assert_eq!(next.generation, 2);
    assert_eq!(state.read_routes().unwrap(), next);
}

#[test]
fn open_names_the_setting_and_the_fix() {
    let tmp = TempDir::new("open");
    let missing = tmp.path().join("nope");
    let e = StateDir::open(&missing).unwrap_err();
    assert!(matches!(e, StateError::Missing { .. }));
    let msg = e.to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(msg.contains("--state-dir / VROUTER_STATE_DIR"), "{msg}");
    assert!(msg.contains("create it or bind-mount it"), "{msg}");
    assert!(StateDir::open_readonly(&missing).is_err());

    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    assert!(matches!(
        StateDir::open(&file).unwrap_err(),
        StateError::NotADirectory { .. }
    ));

    // Not writable: a directory this uid cannot write to.
    let ro = tmp.path().join("ro");
    fs::create_dir(&ro).unwrap();
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let euid = unsafe { libc::geteuid() };
    let msg = if euid == 0 {
        // Root writes anywhere: ask the question as nobody instead.
        let mut child = RoleChild::spawn_with("open", &ro, "", |cmd| {
            std::os::unix::process::CommandExt::uid(cmd, 65534);
        });
        let msg = child.wait_line("OPEN ", Duration::from_secs(30));
        child.wait_success(Duration::from_secs(30));
        assert!(msg.contains("uid 65534"), "{msg}");
        msg
    } else {
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
        let msg = StateDir::open(&ro).unwrap_err().to_string();
        assert!(msg.contains(&format!("uid {euid}")), "{msg}");
        msg
    };
    assert!(msg.contains("is not writable"), "{msg}");
    assert!(msg.contains("--state-dir / VROUTER_STATE_DIR"), "{msg}");
    assert!(
        fs::read_dir(&ro).unwrap().next().is_none(),
        "probe file left behind"
    );

    // Read-only handles read but refuse every write.
    let state = discovery(tmp.path());
    state.write_routes(&routes(1, 1)).unwrap();
    let reader = StateDir::open_readonly(tmp.path()).unwrap();
    assert_eq!(reader.read_routes().unwrap().generation, 1);
    assert!(matches!(
        reader.write_routes(&routes(2, 1)),
        Err(StateError::ReadOnly { .. })
    ));
    assert!(matches!(
        reader.append_event(&Event::new("t", EventKind::Started, "m")),
        Err(StateError::ReadOnly { .. })
    ));
    assert!(matches!(
        reader.try_lead(),
        Err(StateError::ReadOnly { .. })
    ));
    assert_eq!(state.socket_path(), tmp.path().join("discovery.sock"));
}

#[test]
fn events_skip_a_torn_line_and_the_next_append_is_whole() {
    let tmp = TempDir::new("events-torn");
    let state = discovery(tmp.path());
    assert!(state.read_events().unwrap().is_empty());
    for i in 0..3 {
        state
            .append_event(&Event::new(
                "discovery",
                EventKind::Started,
                format!("e{i}"),
            ))
            .unwrap();
    }
    // A writer killed mid-append.
    let mut log = fs::OpenOptions::new()
        .append(true)
        .open(state.events_path())
        .unwrap();
    std::io::Write::write_all(&mut log, br#"{"ts_ms":1,"source":"disc"#).unwrap();
    let events = state.read_events().unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| e.message.as_str())
            .collect::<Vec<_>>(),
        ["e0", "e1", "e2"]
    );

    state
        .append_event(&Event::new("discovery", EventKind::Started, "e3"))
        .unwrap();
    let events = state.read_events().unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| e.message.as_str())
            .collect::<Vec<_>>(),
        ["e0", "e1", "e2", "e3"]
    );
    // A corrupt line in the middle is skipped too.
    std::io::Write::write_all(&mut log, b"not json\n").unwrap();
    state
        .append_event(&Event::new("discovery", EventKind::Started, "e4"))
        .unwrap();
    assert_eq!(state.read_events().unwrap().len(), 5);
}

/// The numbers of the retained events (their messages), checked to end at `last` and
/// to run without a gap across events.log.1 and events.log.
fn kept_sequence(state: &StateDir, last: u32) -> Vec<u32> {
    let seq: Vec<u32> = state
        .read_events()
        .unwrap()
        .iter()
        .map(|e| e.message.parse().unwrap())
        .collect();
    assert_eq!(*seq.last().unwrap(), last);
    assert!(seq.windows(2).all(|w| w[1] == w[0] + 1), "{seq:?}");
    seq
}

#[test]
fn events_rotate_at_the_cap_keeping_one_old_file() {
    let tmp = TempDir::new("events-rotate");
    let cap = 1000;
    let state = discovery(tmp.path()).with_events_cap(cap);
    for i in 0..60 {
        state
            .append_event(&Event::new(
                "discovery",
                EventKind::Started,
                format!("{i:03}"),
            ))
            .unwrap();
    }
    let current = fs::metadata(state.events_path()).unwrap().len();
    let old = fs::metadata(tmp.path().join("events.log.1")).unwrap().len();
    assert!(current <= cap && old <= cap, "{current} {old}");
    assert!(old > cap / 2, "rotated file was nearly full: {old}");
    assert!(!tmp.path().join("events.log.2").exists());

    // What is kept is the newest events, contiguous across the two files.
    let seq = kept_sequence(&state, 59);
    assert!(seq[0] > 0, "oldest events were dropped");
    let lines = fs::read_to_string(state.events_path())
        .unwrap()
        .lines()
        .count();
    assert!(lines < seq.len(), "some events come from events.log.1");
    assert_eq!(EVENTS_FILE, "events.log");
}

#[test]
fn a_batch_of_events_is_one_write_and_keeps_the_cap() {
    let tmp = TempDir::new("events-batch");
    let state = discovery(tmp.path());
    state
        .append_event(&Event::new("discovery", EventKind::Started, "first"))
        .unwrap();
    // Every write to the shared directory wakes every router watching it: a batch of
    // route events must reach events.log as one write, not one per line.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(fd >= 0);
    let path = std::ffi::CString::new(state.events_path().as_os_str().as_encoded_bytes()).unwrap();
    assert!(unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_MODIFY) } >= 0);
    let batch: Vec<Event> = (0..100)
        .map(|i| Event::new("discovery", EventKind::RouteAdded, format!("{i:03}")))
        .collect();
    state.append_events(&batch).unwrap();
    let mut buf = [0u8; 4096];
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    unsafe { libc::close(fd) };
    let header = std::mem::size_of::<libc::inotify_event>() as isize;
    assert_eq!(n, header, "one IN_MODIFY event for the whole batch");
    let events = state.read_events().unwrap();
    assert_eq!(events.len(), 101);
    assert_eq!(events[1].message, "000");
    assert_eq!(events[100].message, "099");

    // A batch larger than the cap rotates between runs of whole lines: both files stay
    // within the cap and the newest events are kept, contiguous.
    let tmp = TempDir::new("events-batch-cap");
    let cap = 1000;
    let state = discovery(tmp.path()).with_events_cap(cap);
    let batch: Vec<Event> = (0..60)
        .map(|i| Event::new("discovery", EventKind::RouteAdded, format!("{i:03}")))
        .collect();
    state.append_events(&batch).unwrap();
    let current = fs::metadata(state.events_path()).unwrap().len();
    let old = fs::metadata(tmp.path().join("events.log.1")).unwrap().len();
    assert!(current <= cap && old <= cap, "{current} {old}");
    kept_sequence(&state, 59);
    state.append_events(&[]).unwrap();
}

#[test]
fn leader_lock_is_exclusive_and_released_on_drop() {
    let tmp = TempDir::new("leader");
    let state = Arc::new(discovery(tmp.path()));
    let first = state.try_lead().unwrap().expect("free at first");
    assert!(
        state.try_lead().unwrap().is_none(),
        "second leader while the first holds"
    );
    let pid = fs::read_to_string(private_path(tmp.path()).join(LEADER_LOCK_FILE)).unwrap();
    assert_eq!(pid.trim(), std::process::id().to_string());
    // The leader lock is not the state lock: writes go on while it is held.
    state.write_routes(&routes(1, 1)).unwrap();

    let (tx, rx) = mpsc::channel();
    let standby = {
        let state = Arc::clone(&state);
        std::thread::spawn(move || {
            let lock = state.lead_blocking().unwrap();
            tx.send(Instant::now()).unwrap();
            lock
        })
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "standby led too early"
    );
    let released = Instant::now();
    drop(first);
    let acquired = rx
        .recv_timeout(Duration::from_secs(1))
        .expect("standby took over");
    eprintln!("in-process takeover after drop: {:?}", acquired - released);
    let second = standby.join().unwrap();
    assert!(state.try_lead().unwrap().is_none());
    drop(second);
    assert!(state.try_lead().unwrap().is_some());
}

#[test]
fn leader_lock_passes_when_the_holder_process_is_killed() {
    let tmp = TempDir::new("leader-kill");
    let state = Arc::new(discovery(tmp.path()));
    let mut holder = RoleChild::spawn("leader", tmp.path(), "");
    holder.wait_line("LEADING", Duration::from_secs(30));
    assert!(state.try_lead().unwrap().is_none());
    let pid = fs::read_to_string(private_path(tmp.path()).join(LEADER_LOCK_FILE)).unwrap();
    assert_eq!(pid.trim(), holder.pid().to_string());

    let (tx, rx) = mpsc::channel();
    let standby = {
        let state = Arc::clone(&state);
        std::thread::spawn(move || {
            let lock = state.lead_blocking().unwrap();
            tx.send(Instant::now()).unwrap();
            lock
        })
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "standby led too early"
    );
    let killed = Instant::now();
    holder.sigkill();
    let acquired = rx
        .recv_timeout(Duration::from_secs(1))
        .expect("standby took over within 1 s");
    eprintln!(
        "takeover after SIGKILL of the holder (incl. reaping): {:?}",
        acquired - killed
    );
    let _lock = standby.join().unwrap();
    let pid = fs::read_to_string(private_path(tmp.path()).join(LEADER_LOCK_FILE)).unwrap();
    assert_eq!(pid.trim(), std::process::id().to_string());
}

#[test]
fn routes_file_round_trips() {
    let tmp = TempDir::new("roundtrip");
    let state = discovery(tmp.path());
    let file: RoutesFile = routes(7, 5);
    state.write_routes(&file).unwrap();
    assert_eq!(state.read_routes().unwrap(), file);

    // Built from JSON so that fields added later with serde defaults need no edit here.
    let discovery: DiscoveryFile = serde_json::from_value(serde_json::json!({
        "schema": SCHEMA_VERSION,
        "generation": 3,
        "updated_ms": 1,
        "host": {
            "underlay_interface": "eth0",
            "local_addr": "192.0.2.1",
            "advertise_addr": "192.0.2.1",
            "vxlan_port": 4789,
            "underlay_mtu": 1500,
            "pid": 42
        },
        "peers": [],
        "local_stacks": [],
        "refused": []
    }))
    .unwrap();
    state.write_discovery(&discovery).unwrap();
    assert_eq!(state.read_discovery().unwrap(), discovery);
    let bumped = state
        .update_discovery(|prev| DiscoveryFile {
            generation: prev.unwrap().generation + 1,
            ..discovery.clone()
        })
        .unwrap();
    assert_eq!(state.read_discovery().unwrap().generation, 4);
    assert_eq!(bumped.generation, 4);
}

/// Runs `f` on a thread and fails the test if it takes longer than `limit` (instead of
/// hanging it).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}: stalled on a lock?"))
}

#[test]
fn a_held_shared_state_lock_does_not_stall_discovery_writes() {
    let tmp = TempDir::new("shared-lock");
    let mut holder = RoleChild::spawn("shared_lock_holder", tmp.path(), "");
    holder.wait_line("HOLDING", Duration::from_secs(30));
    let path = tmp.path().to_path_buf();
    let elapsed = within(Duration::from_secs(5), move || {
        let start = Instant::now();
        let state = discovery(&path);
        state.write_routes(&routes(1, 3)).unwrap();
        state
            .update_routes(|prev| routes(prev.unwrap().generation + 1, 3))
            .unwrap();
        state
            .update_routes(|prev| routes(prev.unwrap().generation + 1, 3))
            .unwrap();
        state
            .append_event(&Event::new("t", EventKind::Started, "m"))
            .unwrap();
        let lead = state.try_lead().unwrap();
        assert!(lead.is_some(), "leader lock free");
        start.elapsed()
    });
    eprintln!("discovery writes while a router holds the shared state.lock: {elapsed:?}");
    assert_eq!(discovery(tmp.path()).read_routes().unwrap().generation, 3);
}

#[test]
fn discovery_keeps_its_locks_in_its_private_dir() {
    let tmp = TempDir::new("private");
    let state = discovery(tmp.path());
    state.write_routes(&routes(1, 1)).unwrap();
    state
        .append_event(&Event::new("t", EventKind::Started, "m"))
        .unwrap();
    let _lead = state.try_lead().unwrap().unwrap();
    let private = private_path(tmp.path());
    for name in [STATE_LOCK_FILE, LEADER_LOCK_FILE] {
        assert!(!tmp.path().join(name).exists(), "{name} in the shared dir");
        assert!(
            private.join(name).is_file(),
            "{name} not in the private dir"
        );
    }
    let mode = fs::metadata(&private).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    // A loose private dir is tightened.
    drop(_lead);
    fs::set_permissions(&private, fs::Permissions::from_mode(0o755)).unwrap();
    let _ = discovery(tmp.path());
    let mode = fs::metadata(&private).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    // A router's handle writes no discovery file and takes no discovery lock.
    let router = StateDir::open(tmp.path()).unwrap();
    assert!(matches!(
        router.write_routes(&routes(2, 1)),
        Err(StateError::NoPrivateDir { .. })
    ));
    assert!(matches!(
        router.try_lead(),
        Err(StateError::NoPrivateDir { .. })
    ));
}

#[test]
fn planted_links_in_the_shared_dir_are_never_written_through() {
    let tmp = TempDir::new("planted");
    let victim = tmp.path().join("victim");
    fs::write(&victim, b"keep").unwrap();
    for name in [EVENTS_FILE, ROUTES_FILE] {
        std::os::unix::fs::symlink(&victim, tmp.path().join(name)).unwrap();
    }
    // A router never writes events.log (its events go into its probes file).
    let router = StateDir::open(tmp.path()).unwrap();
    router
        .append_event(&Event::new("r", EventKind::Started, "m"))
        .unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"keep");
    // Reads refuse the links.
    let state = discovery(tmp.path());
    assert!(matches!(
        state.read_routes(),
        Err(ReadError::Unreadable { .. })
    ));
    // Discovery replaces them.
    state.write_routes(&routes(1, 1)).unwrap();
    state
        .append_event(&Event::new("t", EventKind::Started, "m"))
        .unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"keep");
    for name in [EVENTS_FILE, ROUTES_FILE] {
        assert!(!tmp.path().join(name).is_symlink(), "{name}");
    }
    assert_eq!(state.read_events().unwrap().len(), 1);

    // A FIFO planted at events.log neither blocks discovery nor the reader.
    fs::remove_file(tmp.path().join(EVENTS_FILE)).unwrap();
    nix_mkfifo(&tmp.path().join(EVENTS_FILE));
    let path = tmp.path().to_path_buf();
    within(Duration::from_secs(5), move || {
        let state = discovery(&path);
        let _ = state.read_events();
        state
            .append_event(&Event::new("t", EventKind::Started, "after"))
            .unwrap();
    });
    assert_eq!(state.read_events().unwrap().len(), 1);
}

fn nix_mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

#[test]
fn router_events_travel_in_its_probes_file_not_events_log() {
    let tmp = TempDir::new("router-events");
    let router = StateDir::open(tmp.path()).unwrap();
    for i in 0..3 {
        router
            .append_event(&Event::new("router/a", EventKind::Started, format!("{i}")))
            .unwrap();
    }
    assert!(
        !tmp.path().join(EVENTS_FILE).exists(),
        "a router wrote events.log"
    );
    router.write_probes(&common::probes_file("a")).unwrap();
    let files = discovery(tmp.path()).read_all_probes();
    let events = files[0].events.as_ref().expect("events in the probes file");
    let messages: Vec<&str> = events.recent.iter().map(|e| e.message.as_str()).collect();
    // Other tests in this process may have added theirs: ours are the last three.
    assert!(messages.ends_with(&["0", "1", "2"]), "{messages:?}");
    let names: Vec<String> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["probes".to_string()],
        "a router wrote {names:?}"
    );
}

#[test]
fn a_planted_rotation_target_keeps_the_cap_and_the_log_going() {
    let tmp = TempDir::new("rotation-blocked");
    fs::create_dir(tmp.path().join(vrouter_state::store::EVENTS_ROTATED_FILE)).unwrap();
    fs::write(
        tmp.path()
            .join(vrouter_state::store::EVENTS_ROTATED_FILE)
            .join("x"),
        b"",
    )
    .unwrap();
    let state = discovery(tmp.path()).with_events_cap(300);
    for i in 0..20 {
        state
            .append_event(&Event::new("t", EventKind::Started, format!("event {i}")))
            .unwrap();
    }
    let len = fs::metadata(tmp.path().join(EVENTS_FILE)).unwrap().len();
    assert!(len <= 300, "{len}");
    let events = state.read_events().unwrap();
    assert_eq!(events.last().unwrap().message, "event 19");
}

#[test]
fn a_private_dir_inside_the_shared_one_is_refused() {
    let tmp = TempDir::new("private-inside");
    let e = StateDir::open_discovery(tmp.path(), &tmp.path().join("private")).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("VROUTER_PRIVATE_DIR"), "{msg}");
    assert!(msg.contains("inside the shared state directory"), "{msg}");
    assert!(StateDir::open_discovery(tmp.path(), tmp.path()).is_err());
    assert!(
        !tmp.path().join("private").exists(),
        "created before the check"
    );
}
