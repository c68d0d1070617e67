//! The state directory on disk: atomic writes of the JSON files, readers that say why
//! a file cannot be used, the capped events log, and discovery's private directory with
//! its locks.
//!
//! Trust. Routers mount the shared directory read-write as root, so everything in it
//! may be hostile: every access goes through [`crate::fsio`] (no link following, no
//! blocking on FIFOs, regular files only, a size cap, exclusive unpredictable temp
//! names). Nothing discovery depends on lives there: its node id, claims, leader lock
//! and write lock are in its private directory ([`PrivateDir`]), which no router mounts.
//!
//! Locking. Discovery serialises its own writes with an exclusive `flock` on
//! `state.lock` in the private directory, taken on a fresh open for each operation
//! (flock belongs to the open file description, so threads sharing one `StateDir` are
//! serialised exactly like separate processes). No lock a router can take is on that
//! path: a router that holds a lock, or is frozen by `docker pause` while holding one,
//! cannot stall discovery. Routers take no lock at all: each writes only its own
//! `probes/<stack>.json`, by atomic rename; its events travel in that file and
//! discovery copies them into events.log.
//!
//! Readers take no lock. A JSON file is replaced by `rename(2)` of a complete, fsynced
//! temp file, which is atomic: a reader opens either the old inode or the new one,
//! never a mix. Watchers must watch the directory, not the file, since the rename
//! replaces the inode they would be watching.
//!
//! The leader lock (`leader.lock`, private directory) is a different file from
//! `state.lock`: holding leadership for the life of a process must not block writes.

use crate::fsio::Dir;
use crate::probes::{ProbesFile, RouterEvents, PROBES_DIR};
use crate::schema::{
    DiscoveryFile, Event, RoutesFile, Versioned, DISCOVERY_FILE, EVENTS_FILE, LEADER_LOCK_FILE,
    ROUTES_FILE, SCHEMA_VERSION, STATE_LOCK_FILE,
};
use crate::ATTACH_SOCKET;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// events.log is rotated to events.log.1 once an append would take it past this size.
pub const DEFAULT_EVENTS_CAP: u64 = 1024 * 1024;

/// Name of the rotated events log (one old file is kept).
pub const EVENTS_ROTATED_FILE: &str = "events.log.1";

/// Mode of every file this module creates in the shared directory: the router may run
/// as another uid and only needs to read.
const FILE_MODE: u32 = 0o644;

/// Mode of the private directory and of the files in it.
const PRIVATE_DIR_MODE: u32 = 0o700;
const PRIVATE_FILE_MODE: u32 = 0o600;

/// Largest discovery.json or routes.json read (a 10,000-host mesh stays well below).
pub const MAX_STATE_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Largest probes file read (one router's view of its peers).
pub const MAX_PROBES_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// events.log may exceed its cap by this factor before readers refuse it (a line
/// appended at the cap, a rotation blocked by something planted).
const ROUTER_EVENTS_SLACK: u64 = 2;

/// This process's events when it is a router: they travel in its probes file (the only
/// file a router writes), and discovery copies them into events.log. One per process,
/// shared by every `StateDir` handle in it.
static ROUTER_EVENTS: std::sync::Mutex<Option<RouterEvents>> = std::sync::Mutex::new(None);

fn with_router_events<T>(f: impl FnOnce(&mut RouterEvents) -> T) -> T {
    let mut guard = ROUTER_EVENTS.lock().unwrap_or_else(|p| p.into_inner());
    let events = guard.get_or_insert_with(|| RouterEvents {
        boot: crate::fsio::random_u64(),
        ..Default::default()
    });
    f(events)
}

/// The settings that choose the state directory, for error messages.
const SETTING: &str = "--state-dir / VROUTER_STATE_DIR";

/// Opening the state directory or writing to it failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {} ({SETTING}) does not exist; create it or bind-mount it", path.display())]
    Missing { path: PathBuf },
    #[error("state directory {} ({SETTING}) is not a directory; point {SETTING} at a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("state directory {} ({SETTING}) is not readable by uid {uid} ({source}); fix its owner or mode", path.display())]
    NotReadable {
        path: PathBuf,
        uid: u32,
        source: io::Error,
    },
    #[error("state directory {} ({SETTING}) is not writable by uid {uid} ({source}); make it writable by this uid, or mount it read-write (a read-only bind mount will not do)", path.display())]
    NotWritable {
        path: PathBuf,
        uid: u32,
        source: io::Error,
    },
    #[error("state directory {} was opened read-only; {what} needs StateDir::open", path.display())]
    ReadOnly { path: PathBuf, what: &'static str },
    #[error("state directory {} was opened without discovery's private directory; {what} is discovery's alone (StateDir::open_discovery)", path.display())]
    NoPrivateDir { path: PathBuf, what: &'static str },
    #[error("private directory {} (--private-dir / VROUTER_PRIVATE_DIR): {source}; it must be a directory this uid can create and write, and must not be mounted into any router", path.display())]
    Private { path: PathBuf, source: io::Error },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl StateError {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
        move |source| StateError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A state file could not be used. The reader keeps its last good state and reports
/// this; each variant's message says what it means for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Nothing written yet: normal before discovery's first write.
    Missing { path: PathBuf },
    /// Not valid JSON of the expected shape (truncated, edited by hand, wrong file).
    Corrupt { path: PathBuf, detail: String },
    /// Written by another version of docker-vrouter.
    UnknownSchema {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    /// The file exists but could not be read (permissions, I/O error), or was refused:
    /// a link, a FIFO or device, or larger than the cap.
    Unreadable { path: PathBuf, source: io::Error },
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Missing { path } => write!(
                f,
                "{} does not exist yet; discovery writes it once it is running and leading on this host",
                path.display()
            ),
            ReadError::Corrupt { path, detail } => write!(
                f,
                "{} is not valid ({detail}); keeping the last good state until discovery rewrites it \
                 (do not edit state files by hand)",
                path.display()
            ),
            ReadError::UnknownSchema {
                path,
                found,
                expected,
            } => write!(
                f,
                "{} has schema version {found} but this binary understands {expected}; \
                 run the same docker-vrouter version for discovery and routers",
                path.display()
            ),
            ReadError::Unreadable { path, source } => write!(
                f,
                "{} cannot be read ({source}); check the state directory's owner and mode",
                path.display()
            ),
        }
    }
}

/// Exclusive leadership of discovery on this host, held until dropped (or the process
/// dies: the kernel releases the flock with the last descriptor).
#[derive(Debug)]
pub struct LeaderLock {
    file: File,
    path: PathBuf,
}

impl LeaderLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LeaderLock {
    fn drop(&mut self) {
        // The pid is for operators only; clear it so it never names a past leader.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

/// Held for one write; closing the descriptor would release the flock too, the unlock
/// just makes it explicit.
struct StateLock(File);

impl Drop for StateLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Discovery's private directory: node id, claims, the leader and write locks, replay
/// state. Never mounted by a router. Created with mode 0700.
#[derive(Debug, Clone)]
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// Opens the directory, creating it (and its parents) with mode 0700 if missing,
    /// and tightening its mode to 0700 if it is looser.
    pub fn open(path: &Path) -> Result<PrivateDir, StateError> {
        let private = |source| StateError::Private {
            path: path.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR_MODE)
            .create(path)
            .map_err(private)?;
        let dir = Dir::open(path).map_err(private)?;
        let meta = fs::metadata(path).map_err(private)?;
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(path, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
                .map_err(private)?;
        }
        drop(dir);
        Ok(PrivateDir {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn dir(&self) -> Result<Dir, StateError> {
        Dir::open(&self.path).map_err(|source| StateError::Private {
            path: self.path.clone(),
            source,
        })
    }

    /// The contents of `name`, at most `cap` bytes; `Ok(None)` when it does not exist.
    pub fn read(&self, name: &str, cap: u64) -> Result<Option<Vec<u8>>, StateError> {
        match self.dir()?.read(name, cap) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StateError::io("reading", &self.path.join(name))(e)),
        }
    }

    /// Replaces `name` atomically (mode 0600), through the one atomic writer.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        let dir = self.dir()?;
        dir.remove_stale_temps(name);
        dir.write_atomic(name, bytes, PRIVATE_FILE_MODE)
            .map_err(StateError::io("writing", &self.path.join(name)))
    }

    fn open_lock(&self, name: &str) -> Result<File, StateError> {
        self.dir()?
            .open_rw(name, PRIVATE_FILE_MODE)
            .map_err(StateError::io("opening", &self.path.join(name)))
    }
}

/// The shared state directory.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    writable: bool,
    events_cap: u64,
    /// Discovery's: its write lock and leader lock live there. None for a router, which
    /// writes only its probes file and its events.
    private: Option<PrivateDir>,
}

impl StateDir {
    /// Opens the shared directory and discovery's private directory, for discovery:
    /// the one writer of discovery.json and routes.json, which serialises its writes
    /// and holds its leader lock in the private directory.
    pub fn open_discovery(path: &Path, private: &Path) -> Result<StateDir, StateError> {
        let dir = StateDir::open(path)?;
        // Inside the shared directory it would be every router's to write. Checked
        // before it is created (a missing path is resolved through its parent).
        let resolved = fs::canonicalize(private).or_else(|_| {
            let parent = private.parent().unwrap_or(Path::new("."));
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            fs::canonicalize(parent).map(|p| p.join(private.file_name().unwrap_or_default()))
        });
        if let (Ok(shared), Ok(own)) = (fs::canonicalize(path), resolved) {
            if own.starts_with(&shared) {
                return Err(StateError::Private {
                    path: private.to_path_buf(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "it is inside the shared state directory {}, which every router mounts; choose a path outside it",
                            path.display()
                        ),
                    ),
                });
            }
        }
        let private = PrivateDir::open(private)?;
        Ok(StateDir {
            private: Some(private),
            ..dir
        })
    }

    /// Discovery's private directory, when opened with [`StateDir::open_discovery`].
    pub fn private(&self) -> Option<&PrivateDir> {
        self.private.as_ref()
    }

    /// Opens the directory for reading and writing, as a router: it may write its own
    /// probes file and append events. It must exist and be writable by this process;
    /// writability is proven by creating and removing a probe file, because mode bits
    /// do not reveal a read-only bind mount.
    pub fn open(path: &Path) -> Result<StateDir, StateError> {
        let dir = StateDir::open_readonly(path)?;
        dir.check_writable()?;
        Ok(StateDir {
            writable: true,
            ..dir
        })
    }

    /// Proves the directory writable now by creating and removing a probe file (mode
    /// bits do not reveal a read-only bind mount or missing capabilities).
    pub fn check_writable(&self) -> Result<(), StateError> {
        let path = &self.path;
        let probe = path.join(format!(
            ".probe.{}.{}",
            std::process::id(),
            crate::fsio::random_suffix()
        ));
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(FILE_MODE)
            .open(&probe);
        match created {
            Ok(_) => fs::remove_file(&probe).map_err(|source| StateError::NotWritable {
                path: path.to_path_buf(),
                uid: euid(),
                source,
            })?,
            Err(source) => {
                return Err(StateError::NotWritable {
                    path: path.to_path_buf(),
                    uid: euid(),
                    source,
                })
            }
        }
        Ok(())
    }

    /// Opens the directory for reading only (a healthcheck, a status command). It
    /// must exist and be listable; every write method then returns
    /// [`StateError::ReadOnly`].
    pub fn open_readonly(path: &Path) -> Result<StateDir, StateError> {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::Missing {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(StateError::NotReadable {
                    path: path.to_path_buf(),
                    uid: euid(),
                    source,
                })
            }
        };
        if !meta.is_dir() {
            return Err(StateError::NotADirectory {
                path: path.to_path_buf(),
            });
        }
        fs::read_dir(path).map_err(|source| StateError::NotReadable {
            path: path.to_path_buf(),
            uid: euid(),
            source,
        })?;
        Ok(StateDir {
            path: path.to_path_buf(),
            writable: false,
            events_cap: DEFAULT_EVENTS_CAP,
            private: None,
        })
    }

    /// Sets the size at which events.log is rotated (default [`DEFAULT_EVENTS_CAP`]).
    pub fn with_events_cap(mut self, bytes: u64) -> StateDir {
        self.events_cap = bytes;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn socket_path(&self) -> PathBuf {
        self.path.join(ATTACH_SOCKET)
    }

    pub fn discovery_path(&self) -> PathBuf {
        self.path.join(DISCOVERY_FILE)
    }

    pub fn routes_path(&self) -> PathBuf {
        self.path.join(ROUTES_FILE)
    }

    pub fn events_path(&self) -> PathBuf {
        self.path.join(EVENTS_FILE)
    }

    pub fn write_discovery(&self, file: &DiscoveryFile) -> Result<(), StateError> {
        let _lock = self.lock_state("writing discovery.json")?;
        self.write_json_locked(DISCOVERY_FILE, file)
    }

    pub fn write_routes(&self, file: &RoutesFile) -> Result<(), StateError> {
        let _lock = self.lock_state("writing routes.json")?;
        self.write_json_locked(ROUTES_FILE, file)
    }

    /// Reads discovery.json, lets `f` compute the next version from it, and writes
    /// that, all under the state lock: no other writer can slip in between, so a
    /// generation derived from the current one never goes backwards.
    pub fn update_discovery<F>(&self, f: F) -> Result<DiscoveryFile, StateError>
    where
        F: FnOnce(Result<DiscoveryFile, ReadError>) -> DiscoveryFile,
    {
        self.update_json(DISCOVERY_FILE, f)
    }

    /// Like [`StateDir::update_discovery`], for routes.json.
    pub fn update_routes<F>(&self, f: F) -> Result<RoutesFile, StateError>
    where
        F: FnOnce(Result<RoutesFile, ReadError>) -> RoutesFile,
    {
        self.update_json(ROUTES_FILE, f)
    }

    /// Needs no lock: see the module documentation.
    pub fn read_discovery(&self) -> Result<DiscoveryFile, ReadError> {
        self.read_json(DISCOVERY_FILE)
    }

    /// Needs no lock: see the module documentation.
    pub fn read_routes(&self) -> Result<RoutesFile, ReadError> {
        self.read_json(ROUTES_FILE)
    }

    /// The version of routes.json now there ([`crate::fsio::Dir::stamp`]), `None` when
    /// it cannot be read. A router compares it with the stamp of its last good read
    /// and parses the file only when it changed: at 100 stacks on a host routes.json is
    /// over 2 MB, and a parse on every timer tick of every router took 1.5 cores.
    pub fn routes_stamp(&self) -> Option<crate::fsio::Stamp> {
        Dir::open(&self.path).ok()?.stamp(ROUTES_FILE).ok()
    }

    /// Writes this router's probe results to `probes/<stack>.json` by atomic rename,
    /// creating `probes/` if missing. Takes no lock: each router writes only its own
    /// file. A `probes` that is a link is refused, not followed.
    pub fn write_probes(&self, file: &ProbesFile) -> Result<(), StateError> {
        self.require_writable("writing probe results")?;
        let mut file = file.clone();
        if file.events.is_none() && self.private.is_none() {
            file.events = with_router_events(|e| (!e.recent.is_empty()).then(|| e.clone()));
        }
        let file = &file;
        let dir = self.shared()?;
        let probes = dir
            .subdir(PROBES_DIR, Some(0o755))
            .map_err(StateError::io("opening", &self.path.join(PROBES_DIR)))?;
        let name = ProbesFile::file_name(&file.stack);
        // Temp files of this name are this stack's own, left by a writer that died.
        probes.remove_stale_temps(&name);
        write_json_in(&probes, &name, file)
    }

    /// Every router's probe results, sorted by stack. Takes no lock; files that are
    /// missing, corrupt, of another schema, unreadable, links, not regular files or
    /// larger than [`MAX_PROBES_FILE_BYTES`] are skipped (with a debug log), as are
    /// temp files. Whether a file is fresh is the caller's question
    /// ([`ProbesFile::is_fresh`]).
    pub fn read_all_probes(&self) -> Vec<ProbesFile> {
        let Ok(probes) = self.shared().and_then(|d| {
            d.subdir(PROBES_DIR, None)
                .map_err(StateError::io("opening", &self.path.join(PROBES_DIR)))
        }) else {
            return Vec::new();
        };
        let mut files = Vec::new();
        for name in probes.names().unwrap_or_default() {
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            match read_json_in::<ProbesFile>(&probes, &name, MAX_PROBES_FILE_BYTES) {
                // A file speaks only for the stack it is named after.
                Ok(f) if ProbesFile::file_name(&f.stack) != name => {
                    tracing::debug!("skipped {name}: it claims stack {}", f.stack)
                }
                Ok(f) => files.push(f),
                Err(e) => tracing::debug!("skipped a probe file: {e}"),
            }
        }
        files.sort_by(|a, b| a.stack.cmp(&b.stack));
        files
    }

    /// Records an event. Discovery appends it as one line to events.log (one `write(2)`
    /// with `O_APPEND`) under its private lock, rotating the log to events.log.1 first
    /// when the line would take it past the cap; a link or non-regular file planted at
    /// events.log is replaced, never written through. A router writes nothing to the
    /// shared directory but its probes file: its events are kept in memory (the last
    /// [`crate::probes::ROUTER_EVENTS_KEPT`]) and travel in that file, from which
    /// discovery copies them into events.log.
    pub fn append_event(&self, event: &Event) -> Result<(), StateError> {
        self.append_events(std::slice::from_ref(event))
    }

    /// Records several events as [`StateDir::append_event`] does, under one lock and in
    /// one `write(2)` per [`DEFAULT_EVENTS_CAP`]-sized run of lines. Every write to the
    /// shared directory wakes each process watching it (every router on the host):
    /// a publish at 100 stacks reports 10,000 routes, and one write per line kept the
    /// host's CPUs busy for minutes.
    pub fn append_events(&self, events: &[Event]) -> Result<(), StateError> {
        if events.is_empty() {
            return Ok(());
        }
        self.require_writable("appending to events.log")?;
        if self.private.is_none() {
            with_router_events(|e| {
                for ev in events {
                    e.push(ev.clone())
                }
            });
            return Ok(());
        }
        let _lock = self.lock_state("appending to events.log")?;
        let dir = self.shared()?;
        let mut lines = Vec::new();
        for ev in events {
            let mut line = serde_json::to_vec(ev).expect("an Event always serialises");
            line.push(b'\n');
            if !lines.is_empty() && (lines.len() + line.len()) as u64 > self.events_cap {
                self.append_lines(&dir, std::mem::take(&mut lines))?;
            }
            lines.extend_from_slice(&line);
        }
        self.append_lines(&dir, lines)
    }

    /// Appends whole lines to events.log in one write, rotating first when they would
    /// take it past the cap. The caller holds the state lock.
    fn append_lines(&self, dir: &Dir, mut line: Vec<u8>) -> Result<(), StateError> {
        let path = self.events_path();
        let mut log = self.open_events(dir)?;
        let len = log
            .metadata()
            .map_err(StateError::io("reading size of", &path))?
            .len();
        let mut torn = false;
        if len > 0 && len + line.len() as u64 > self.events_cap {
            match dir.rename(EVENTS_FILE, EVENTS_ROTATED_FILE) {
                Ok(()) => log = self.open_events(dir)?,
                // Something planted at events.log.1 (a directory) blocks the rename:
                // keep the cap anyway rather than grow or stop logging.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EISDIR | libc::ENOTEMPTY | libc::EEXIST | libc::ENOTDIR)
                    ) =>
                {
                    tracing::warn!(
                        "cannot rotate {} ({e}); truncating it instead",
                        path.display()
                    );
                    log.set_len(0)
                        .map_err(StateError::io("truncating", &path))?;
                }
                Err(e) => return Err(StateError::io("rotating", &path)(e)),
            }
        } else if len > 0 {
            // A writer killed mid-append leaves a line without its newline; start ours
            // on a fresh line so only the torn one is lost.
            let mut last = [0u8; 1];
            log.read_exact_at(&mut last, len - 1)
                .map_err(StateError::io("reading", &path))?;
            torn = last[0] != b'\n';
        }
        if torn {
            line.insert(0, b'\n');
        }
        log.write_all(&line)
            .and_then(|()| log.flush())
            .map_err(StateError::io("appending to", &path))
    }

    /// All retained events, oldest first (events.log.1 then events.log). Lines that
    /// do not parse, such as a torn last line, are skipped. Takes no lock: a rotation
    /// between the two reads can repeat or miss a few events, which is fine for
    /// showing an operator what happened.
    pub fn read_events(&self) -> Result<Vec<Event>, ReadError> {
        let mut events = Vec::new();
        let dir = Dir::open(&self.path).map_err(|source| ReadError::Unreadable {
            path: self.path.clone(),
            source,
        })?;
        let cap = self.events_cap.saturating_mul(ROUTER_EVENTS_SLACK + 1);
        for name in [EVENTS_ROTATED_FILE, EVENTS_FILE] {
            let path = self.path.join(name);
            let text = match dir.read(name, cap) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                // A link, FIFO or oversized file planted there: not our log.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData
                    ) =>
                {
                    tracing::debug!("skipped {}: {e}", path.display());
                    continue;
                }
                Err(source) => return Err(ReadError::Unreadable { path, source }),
            };
            // Only newline-terminated lines are complete.
            let complete = match text.iter().rposition(|&b| b == b'\n') {
                Some(i) => &text[..=i],
                None => &[][..],
            };
            let mut skipped = 0usize;
            for line in complete.split(|&b| b == b'\n') {
                if line.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<Event>(line) {
                    Ok(e) => events.push(e),
                    Err(_) => skipped += 1,
                }
            }
            if skipped > 0 || complete.len() < text.len() {
                tracing::debug!(path = %path.display(), skipped, torn_tail = complete.len() < text.len(), "skipped unparsable event lines");
            }
        }
        Ok(events)
    }

    /// Takes the leader lock if it is free; `None` when another process (or another
    /// `LeaderLock` in this one) holds it.
    pub fn try_lead(&self) -> Result<Option<LeaderLock>, StateError> {
        let (file, path) = self.open_leader()?;
        match file.try_lock() {
            Ok(()) => Ok(Some(self.became_leader(file, path)?)),
            Err(TryLockError::WouldBlock) => Ok(None),
            Err(TryLockError::Error(e)) => Err(StateError::io("locking", &path)(e)),
        }
    }

    /// Blocks until the leader lock is free, then takes it. The kernel releases a
    /// flock the moment its holder's last descriptor closes, including on SIGKILL,
    /// so a standby takes over within milliseconds. Blocks the calling thread: from
    /// async code run it in `spawn_blocking`.
    pub fn lead_blocking(&self) -> Result<LeaderLock, StateError> {
        let (file, path) = self.open_leader()?;
        file.lock().map_err(StateError::io("locking", &path))?;
        self.became_leader(file, path)
    }

    fn open_leader(&self) -> Result<(File, PathBuf), StateError> {
        let private = self.require_private("taking the leader lock")?;
        Ok((
            private.open_lock(LEADER_LOCK_FILE)?,
            private.path.join(LEADER_LOCK_FILE),
        ))
    }

    fn became_leader(&self, file: File, path: PathBuf) -> Result<LeaderLock, StateError> {
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
            .map_err(StateError::io("writing pid to", &path))?;
        Ok(LeaderLock { file, path })
    }

    fn require_writable(&self, what: &'static str) -> Result<(), StateError> {
        if self.writable {
            Ok(())
        } else {
            Err(StateError::ReadOnly {
                path: self.path.clone(),
                what,
            })
        }
    }

    fn require_private(&self, what: &'static str) -> Result<&PrivateDir, StateError> {
        self.require_writable(what)?;
        self.private
            .as_ref()
            .ok_or_else(|| StateError::NoPrivateDir {
                path: self.path.clone(),
                what,
            })
    }

    /// Discovery's write lock, in its private directory: no router can take it.
    fn lock_state(&self, what: &'static str) -> Result<StateLock, StateError> {
        let private = self.require_private(what)?;
        let file = private.open_lock(STATE_LOCK_FILE)?;
        file.lock().map_err(StateError::io(
            "locking",
            &private.path.join(STATE_LOCK_FILE),
        ))?;
        Ok(StateLock(file))
    }

    fn shared(&self) -> Result<Dir, StateError> {
        Dir::open(&self.path).map_err(StateError::io("opening", &self.path))
    }

    /// events.log for appending (by discovery, which holds its lock): a link or special
    /// file planted there is replaced.
    fn open_events(&self, dir: &Dir) -> Result<File, StateError> {
        let path = self.events_path();
        match dir.open_append(EVENTS_FILE, FILE_MODE) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                tracing::warn!("{e}; replacing it with a new events.log");
                dir.remove(EVENTS_FILE)
                    .map_err(StateError::io("removing", &path))?;
                dir.open_append(EVENTS_FILE, FILE_MODE)
                    .map_err(StateError::io("opening", &path))
            }
            Err(e) => Err(StateError::io("opening", &path)(e)),
        }
    }

    fn update_json<T, F>(&self, name: &str, f: F) -> Result<T, StateError>
    where
        T: Serialize + DeserializeOwned + Versioned,
        F: FnOnce(Result<T, ReadError>) -> T,
    {
        let _lock = self.lock_state("updating a state file")?;
        let next = f(self.read_json(name));
        self.write_json_locked(name, &next)?;
        Ok(next)
    }

    /// Replaces `name` atomically; the caller holds the state lock. Leftover temp
    /// files of this name are removed first: discovery makes them only under its lock,
    /// so any found while holding it belong to a writer that died.
    fn write_json_locked<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        let dir = self.shared()?;
        dir.remove_stale_temps(name);
        write_json_in(&dir, name, value)
    }

    fn read_json<T: DeserializeOwned + Versioned>(&self, name: &str) -> Result<T, ReadError> {
        let dir = Dir::open(&self.path).map_err(|source| ReadError::Unreadable {
            path: self.path.clone(),
            source,
        })?;
        read_json_in(&dir, name, MAX_STATE_FILE_BYTES)
    }
}

/// Serialises `value` as pretty JSON and replaces `name` in `dir` with it, through the
/// one atomic writer ([`Dir::write_atomic`]).
fn write_json_in<T: Serialize>(dir: &Dir, name: &str, value: &T) -> Result<(), StateError> {
    let target = dir.path().join(name);
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError::Io {
        what: "serialising",
        path: target.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    bytes.push(b'\n');
    dir.write_atomic(name, &bytes, FILE_MODE)
        .map_err(StateError::io("writing", &target))
}

/// Reads and checks a versioned JSON file in `dir`, refusing links, non-regular files
/// and files larger than `cap`.
fn read_json_in<T: DeserializeOwned + Versioned>(
    dir: &Dir,
    name: &str,
    cap: u64,
) -> Result<T, ReadError> {
    let path = dir.path().join(name);
    let text = match dir.read(name, cap) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadError::Missing { path }),
        Err(source) => return Err(ReadError::Unreadable { path, source }),
    };
    let corrupt = |detail: String| ReadError::Corrupt {
        path: path.clone(),
        detail,
    };
    // Check the version before the shape: another version's file may not parse as
    // ours, and "unknown schema" is the error that tells the operator why.
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    let found = value
        .get("schema")
        .and_then(|s| s.as_u64())
        .ok_or_else(|| corrupt("no \"schema\" number".to_string()))?;
    if found != u64::from(SCHEMA_VERSION) {
        return Err(ReadError::UnknownSchema {
            path,
            found: u32::try_from(found).unwrap_or(u32::MAX),
            expected: SCHEMA_VERSION,
        });
    }
    let file: T = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
    debug_assert_eq!(file.schema(), SCHEMA_VERSION);
    Ok(file)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
