//! File I/O in a directory that others can write to. Routers mount the shared state
//! directory read-write as root, so anything in it may have been planted: a symbolic
//! link to a file discovery must not touch, a FIFO that blocks a reader forever, a link
//! to /dev/zero that never ends. Every access here therefore:
//!
//! - works relative to a directory descriptor, and opens subdirectories and files with
//!   `O_NOFOLLOW`, so a link is refused instead of followed;
//! - opens with `O_NONBLOCK` and checks `fstat` before reading: regular files only;
//! - reads at most a cap;
//! - creates temp files exclusively (`O_EXCL | O_NOFOLLOW`) under unpredictable names,
//!   and replaces a file only by `rename(2)`, which replaces a planted link itself
//!   rather than writing through it.
//!
//! The directory given by path (the state directory itself) is the operator's and is
//! followed like any configured path; only what is inside it is distrusted.

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fstat, mkdirat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// One version of a file, as [`Dir::stamp`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// A directory opened by descriptor; names are resolved inside it without following
/// links.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn nix_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// `ELOOP` from `O_NOFOLLOW`, said plainly.
fn refused_link(e: Errno, path: &Path) -> io::Error {
    if e == Errno::ELOOP || e == Errno::ENOTDIR {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a symbolic link or not a directory: refused (links in the shared state directory are never followed)",
                path.display()
            ),
        )
    } else {
        nix_io(e)
    }
}

/// A random number from the kernel's CSPRNG (the getrandom system call), for names and
/// ids no one else can predict. The call is made by number: the static musl builds
/// resolve libc's `getrandom` wrapper to a null weak symbol (a jump to address 0).
/// Should the call fail (a seccomp profile refusing it), std's per-process random
/// hash keys stand in, which are still unpredictable to another process.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let mut filled = 0;
    while filled < b.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `b`.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getrandom,
                b[filled..].as_mut_ptr(),
                b.len() - filled,
                0,
            )
        };
        if n > 0 {
            filled += n as usize;
        } else if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(u64::from_ne_bytes(b));
            return h.finish();
        }
    }
    u64::from_ne_bytes(b)
}

/// 16 random hex digits, for temp names no other writer can predict.
pub fn random_suffix() -> String {
    format!("{:016x}", random_u64())
}

impl Dir {
    /// The directory at `path` (a configured path: links in it are followed).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(nix_io)?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The subdirectory `name`, which must be a real directory, not a link; created
    /// with `create` as its mode when given and missing.
    pub fn subdir(&self, name: &str, create: Option<u32>) -> io::Result<Dir> {
        let path = self.path.join(name);
        if let Some(mode) = create {
            match mkdirat(self.fd.as_fd(), name, Mode::from_bits_truncate(mode)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(nix_io(e)),
            }
        }
        let fd = openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| refused_link(e, &path))?;
        Ok(Dir { fd, path })
    }

    /// Opens `name` for reading: no link, no blocking, a regular file only.
    fn open_regular(&self, name: &str, flags: OFlag, mode: u32) -> io::Result<File> {
        let path = self.path.join(name);
        let fd = openat(
            self.fd.as_fd(),
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::from_bits_truncate(mode),
        )
        .map_err(|e| refused_link(e, &path))?;
        let st = fstat(fd.as_fd()).map_err(nix_io)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file: refused", path.display()),
            ));
        }
        Ok(File::from(fd))
    }

    /// What tells one version of `name` from the next, read without opening it and
    /// without following a link: inode, size and change times. Every writer here
    /// replaces a file by rename (a new inode), and the change time cannot be set by a
    /// writer, so an equal stamp means the same contents as when it was last read.
    pub fn stamp(&self, name: &str) -> io::Result<Stamp> {
        let st = nix::sys::stat::fstatat(
            self.fd.as_fd(),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(nix_io)?;
        Ok(Stamp {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            size: st.st_size as i64,
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime: (st.st_ctime as i64, st.st_ctime_nsec as i64),
        })
    }

    /// The contents of `name`, at most `cap` bytes (a larger file is an error, not a
    /// truncated read).
    pub fn read(&self, name: &str, cap: u64) -> io::Result<Vec<u8>> {
        let file = self.open_regular(name, OFlag::O_RDONLY, 0)?;
        let mut bytes = Vec::new();
        file.take(cap.saturating_add(1)).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > cap {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is larger than {cap} bytes: refused",
                    self.path.join(name).display()
                ),
            ));
        }
        Ok(bytes)
    }

    /// `name` opened for appending (and reading), created with `mode` if missing; a
    /// link or anything but a regular file is refused.
    pub fn open_append(&self, name: &str, mode: u32) -> io::Result<File> {
        self.open_regular(name, OFlag::O_RDWR | OFlag::O_APPEND | OFlag::O_CREAT, mode)
    }

    /// `name` opened read-write without truncation, created with `mode` if missing (a
    /// lock file); a link or anything but a regular file is refused.
    pub fn open_rw(&self, name: &str, mode: u32) -> io::Result<File> {
        self.open_regular(name, OFlag::O_RDWR | OFlag::O_CREAT, mode)
    }

    /// Replaces `name` with `bytes` atomically: a temp file with an unpredictable name,
    /// created exclusively, written and fsynced, renamed over `name`, then the
    /// directory fsynced. A reader sees the old file or the new one, never a mix; a link
    /// planted at `name` is replaced, never written through. Temp files start with
    /// `.{name}.tmp.`, which readers skip.
    pub fn write_atomic(&self, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
        let tmp = format!(".{name}.tmp.{}", random_suffix());
        let fd = openat(
            self.fd.as_fd(),
            tmp.as_str(),
            OFlag::O_WRONLY
                | OFlag::O_CREAT
                | OFlag::O_EXCL
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY,
            Mode::from_bits_truncate(mode),
        )
        .map_err(nix_io)?;
        let mut file = File::from(fd);
        let written = (|| {
            // The umask may have cleared bits; readers under other uids need them.
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            file.write_all(bytes)?;
            file.sync_all()?;
            renameat(self.fd.as_fd(), tmp.as_str(), self.fd.as_fd(), name).map_err(nix_io)
        })();
        if let Err(e) = written {
            let _ = self.remove(&tmp);
            return Err(e);
        }
        // Make the rename itself durable.
        nix::unistd::fsync(self.fd.as_fd()).map_err(nix_io)
    }

    /// Renames `from` to `to` inside this directory (links are renamed, not followed).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        renameat(self.fd.as_fd(), from, self.fd.as_fd(), to).map_err(nix_io)
    }

    /// Removes the name `name` (a link is removed itself, never its target).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        unlinkat(self.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir).map_err(nix_io)
    }

    /// The names in this directory, listed through its descriptor (by path only where
    /// /proc is missing: a name from a swapped directory is harmless then, since every
    /// open goes through the descriptor).
    pub fn names(&self) -> io::Result<Vec<String>> {
        use std::os::fd::AsRawFd;
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()));
        let listing = std::fs::read_dir(&by_fd).or_else(|_| std::fs::read_dir(&self.path));
        Ok(listing?
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect())
    }

    /// Removes the leftover temp files of [`Dir::write_atomic`] for `name`.
    pub fn remove_stale_temps(&self, name: &str) {
        let prefix = format!(".{name}.tmp.");
        for n in self.names().unwrap_or_default() {
            if n.starts_with(&prefix) {
                let _ = self.remove(&n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::time::{Duration, Instant};

    use crate::test_dir::TempDir;

    fn mkfifo(path: &Path) {
        nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o644)).unwrap();
    }

    #[test]
    fn reads_refuse_links_fifos_devices_and_oversize_files() {
        let tmp = TempDir::new("fsio");
        let dir = Dir::open(&tmp.0).unwrap();
        std::fs::write(tmp.0.join("ok"), b"fine").unwrap();
        assert_eq!(dir.read("ok", 16).unwrap(), b"fine");

        let secret = tmp.0.join("secret");
        std::fs::write(&secret, b"not yours").unwrap();
        symlink(&secret, tmp.0.join("link")).unwrap();
        symlink("/dev/zero", tmp.0.join("zero")).unwrap();
        mkfifo(&tmp.0.join("fifo"));
        std::fs::write(tmp.0.join("big"), vec![b'x'; 17]).unwrap();

        let start = Instant::now();
        for name in ["link", "zero", "fifo", "big"] {
            let e = dir.read(name, 16).unwrap_err();
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData
                ),
                "{name}: {e}"
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "a FIFO blocked the reader"
        );
        assert_eq!(
            dir.read("ok", 4).unwrap(),
            b"fine",
            "exactly the cap is fine"
        );
    }

    #[test]
    fn a_stamp_changes_with_each_replacement_only() {
        let tmp = TempDir::new("fsio");
        let dir = Dir::open(&tmp.0).unwrap();
        dir.write_atomic("f", b"same", 0o644).unwrap();
        let a = dir.stamp("f").unwrap();
        assert_eq!(dir.read("f", 16).unwrap(), b"same");
        assert_eq!(dir.stamp("f").unwrap(), a, "a read changes nothing");
        dir.write_atomic("f", b"same", 0o644).unwrap();
        assert_ne!(dir.stamp("f").unwrap(), a, "same bytes, new file");
        // A link is stamped as itself, not followed.
        symlink(tmp.0.join("f"), tmp.0.join("l")).unwrap();
        assert_ne!(dir.stamp("l").unwrap(), dir.stamp("f").unwrap());
        assert!(dir.stamp("missing").is_err());
    }

    #[test]
    fn subdirectories_are_not_followed() {
        let tmp = TempDir::new("fsio");
        let elsewhere = TempDir::new("fsio");
        std::fs::write(elsewhere.0.join("f"), b"outside").unwrap();
        symlink(&elsewhere.0, tmp.0.join("sub")).unwrap();
        let dir = Dir::open(&tmp.0).unwrap();
        assert!(dir.subdir("sub", None).is_err());
        assert!(
            dir.subdir("sub", Some(0o755)).is_err(),
            "not replaced by mkdir either"
        );
        let real = dir.subdir("real", Some(0o755)).unwrap();
        real.write_atomic("f", b"inside", 0o644).unwrap();
        assert_eq!(std::fs::read(tmp.0.join("real/f")).unwrap(), b"inside");
    }

    #[test]
    fn writes_and_appends_never_go_through_a_planted_link() {
        let tmp = TempDir::new("fsio");
        let victim = tmp.0.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        symlink(&victim, tmp.0.join("target")).unwrap();
        symlink(&victim, tmp.0.join("log")).unwrap();
        mkfifo(&tmp.0.join("fifo"));
        let dir = Dir::open(&tmp.0).unwrap();

        dir.write_atomic("target", b"new", 0o644).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(!tmp.0.join("target").is_symlink(), "the link was replaced");
        assert_eq!(std::fs::read(tmp.0.join("target")).unwrap(), b"new");

        assert!(dir.open_append("log", 0o644).is_err());
        assert!(dir.open_rw("log", 0o644).is_err());
        let start = Instant::now();
        assert!(dir.open_append("fifo", 0o644).is_err());
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn temp_names_are_unpredictable_and_cleaned_up() {
        let a = random_suffix();
        let b = random_suffix();
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
        let tmp = TempDir::new("fsio");
        let dir = Dir::open(&tmp.0).unwrap();
        std::fs::write(tmp.0.join(".f.tmp.dead"), b"").unwrap();
        dir.write_atomic("f", b"x", 0o600).unwrap();
        dir.remove_stale_temps("f");
        assert_eq!(dir.names().unwrap(), vec!["f".to_string()]);
        let mode = std::fs::metadata(tmp.0.join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
