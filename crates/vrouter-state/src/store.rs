//! The state directory on disk: atomic locked writes of the JSON files, readers that
//! say why a file cannot be used, the capped events log, and the leader lock.
//!
//! Locking. Writers take an exclusive `flock` on `state.lock`, a file that is never
//! renamed or removed, so every writer locks the same inode. The lock is taken on a
//! fresh open for each operation: flock belongs to the open file description, so
//! threads sharing one `StateDir` are serialised exactly like separate processes.
//! The kernel drops the lock when its holder dies, so a killed writer never wedges the
//! directory.
//!
//! Readers take no lock. A JSON file is replaced by `rename(2)` of a complete, fsynced
//! temp file, which is atomic: a reader opens either the old inode or the new one,
//! never a mix. Watchers must watch the directory, not the file, since the rename
//! replaces the inode they would be watching.
//!
//! The leader lock (`leader.lock`) is a different file from `state.lock`: holding
//! leadership for the life of a process must not block writes by routers.

use crate::probes::{ProbesFile, PROBES_DIR};
use crate::schema::{
    DiscoveryFile, Event, RoutesFile, Versioned, DISCOVERY_FILE, EVENTS_FILE, LEADER_LOCK_FILE,
    ROUTES_FILE, SCHEMA_VERSION, STATE_LOCK_FILE,
};
use crate::ATTACH_SOCKET;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// events.log is rotated to events.log.1 once an append would take it past this size.
pub const DEFAULT_EVENTS_CAP: u64 = 1024 * 1024;

/// Name of the rotated events log (one old file is kept).
pub const EVENTS_ROTATED_FILE: &str = "events.log.1";

/// Mode of every file this module creates: the router may run as another uid and only
/// needs to read.
const FILE_MODE: u32 = 0o644;

/// The settings that choose the state directory, for error messages.
const SETTING: &str = "--state-dir / VROUTER_STATE_DIR";

/// Counter that makes temp and probe names unique within this process (the pid makes
/// them unique across processes).
static UNIQUE: AtomicU64 = AtomicU64::new(0);

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
    /// The file exists but could not be read (permissions, I/O error).
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

/// The shared state directory.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    writable: bool,
    events_cap: u64,
}

impl StateDir {
    /// Opens the directory for reading and writing. It must exist and be writable by
    /// this process; writability is proven by creating and removing a probe file,
    /// because mode bits do not reveal a read-only bind mount.
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
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
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

    /// Writes this router's probe results to `probes/<stack>.json` atomically under
    /// the state lock, creating `probes/` if missing.
    pub fn write_probes(&self, file: &ProbesFile) -> Result<(), StateError> {
        let _lock = self.lock_state("writing probe results")?;
        let dir = self.path.join(PROBES_DIR);
        fs::create_dir_all(&dir).map_err(StateError::io("creating", &dir))?;
        self.write_json_in(&dir, &ProbesFile::file_name(&file.stack), file)
    }

    /// Every router's probe results, sorted by stack. Takes no lock; files that are
    /// missing, corrupt, of another schema or unreadable are skipped (with a debug
    /// log), as are temp files.
    pub fn read_all_probes(&self) -> Vec<ProbesFile> {
        let Ok(entries) = fs::read_dir(self.path.join(PROBES_DIR)) else {
            return Vec::new();
        };
        let mut files = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            match self.read_json::<ProbesFile>(&format!("{PROBES_DIR}/{name}")) {
                Ok(f) => files.push(f),
                Err(e) => tracing::debug!("skipped a probe file: {e}"),
            }
        }
        files.sort_by(|a, b| a.stack.cmp(&b.stack));
        files
    }

    /// Appends one line to events.log under the state lock, rotating it to
    /// events.log.1 first when the line would take it past the cap.
    pub fn append_event(&self, event: &Event) -> Result<(), StateError> {
        let _lock = self.lock_state("appending to events.log")?;
        let path = self.events_path();
        let mut line = serde_json::to_vec(event).expect("an Event always serialises");
        line.push(b'\n');

        let mut log = self.open_events(&path)?;
        let len = log
            .metadata()
            .map_err(StateError::io("reading size of", &path))?
            .len();
        let mut torn = false;
        if len > 0 && len + line.len() as u64 > self.events_cap {
            let rotated = self.path.join(EVENTS_ROTATED_FILE);
            fs::rename(&path, &rotated).map_err(StateError::io("rotating", &path))?;
            log = self.open_events(&path)?;
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
        for name in [EVENTS_ROTATED_FILE, EVENTS_FILE] {
            let path = self.path.join(name);
            let text = match fs::read(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
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
        self.require_writable("taking the leader lock")?;
        let path = self.path.join(LEADER_LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(StateError::io("opening", &path))?;
        Ok((file, path))
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

    fn lock_state(&self, what: &'static str) -> Result<StateLock, StateError> {
        self.require_writable(what)?;
        let path = self.path.join(STATE_LOCK_FILE);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(StateError::io("opening", &path))?;
        file.lock().map_err(StateError::io("locking", &path))?;
        Ok(StateLock(file))
    }

    fn open_events(&self, path: &Path) -> Result<File, StateError> {
        OpenOptions::new()
            .read(true) // to check for a torn last line
            .append(true)
            .create(true)
            .mode(FILE_MODE)
            .open(path)
            .map_err(StateError::io("opening", path))
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
    /// files of this name are removed first: temp files are only made under the lock,
    /// so any found while holding it belong to a writer that died.
    fn write_json_locked<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StateError> {
        self.write_json_in(&self.path, name, value)
    }

    /// [`StateDir::write_json_locked`] for a file in `dir` (the state directory or a
    /// subdirectory of it); the caller holds the state lock.
    fn write_json_in<T: Serialize>(
        &self,
        dir: &Path,
        name: &str,
        value: &T,
    ) -> Result<(), StateError> {
        write_json_atomic(dir, name, value)
    }

    fn read_json<T: DeserializeOwned + Versioned>(&self, name: &str) -> Result<T, ReadError> {
        let path = self.path.join(name);
        let mut text = Vec::new();
        match File::open(&path).and_then(|mut f| f.read_to_end(&mut text)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ReadError::Missing { path })
            }
            Err(source) => return Err(ReadError::Unreadable { path, source }),
        }
        let corrupt = |detail: String| ReadError::Corrupt {
            path: path.clone(),
            detail,
        };
        // Check the version before the shape: another version's file may not parse
        // as ours, and "unknown schema" is the error that tells the operator why.
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
}

/// Replaces `dir/name` with `value` as pretty JSON, atomically: a complete, fsynced
/// temp file (created exclusively) renamed over it, then the directory synced. Readers
/// see the old file or the new one, never a mix. Callers serialise writers of one file
/// (the state files: under the state lock; others: one owner).
pub fn write_json_atomic<T: Serialize>(
    dir: &Path,
    name: &str,
    value: &T,
) -> Result<(), StateError> {
    let target = dir.join(name);
    let tmp_prefix = format!(".{name}.tmp.");
    remove_stale_temps(dir, &tmp_prefix);

    let tmp = dir.join(format!(
        "{tmp_prefix}{}.{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    ));
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError::Io {
        what: "serialising",
        path: target.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    bytes.push(b'\n');

    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        // The umask may have cleared bits; readers under other uids need 0644.
        f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
        f.write_all(&bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(StateError::io("writing", &tmp)(e));
    }
    if let Err(e) = fs::rename(&tmp, &target) {
        let _ = fs::remove_file(&tmp);
        return Err(StateError::io("renaming into place", &target)(e));
    }
    // Make the rename itself durable.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StateError::io("syncing", dir))
}

/// Removes the temp files starting with `prefix` in `dir`; see
/// [`StateDir::write_json_locked`].
fn remove_stale_temps(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
