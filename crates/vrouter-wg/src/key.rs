//! Curve25519 keys: generation, the base64 text form `wg` uses, and the private key
//! file (read with the checks a secret deserves, created atomically with mode 0600).

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use zeroize::{Zeroize, Zeroizing};

use crate::WgError;

/// Largest key file accepted: a key is 44 characters; anything near this cap is not one.
const KEY_FILE_MAX: u64 = 1024;

/// A Curve25519 public key (32 bytes). Text form: standard base64 (44 characters), as
/// `wg` prints it. Serde uses the text form.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

/// A Curve25519 private key. Never printed (Debug shows only the public key); zeroed
/// on drop. Text form (files): base64, as `wg genkey` writes it.
#[derive(Clone)]
pub struct PrivateKey(pub(crate) [u8; 32]);

impl Drop for PrivateKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PrivateKey {
    /// A fresh key from the kernel's random source, clamped as `wg genkey` clamps it.
    pub fn generate() -> PrivateKey {
        let mut bytes = [0u8; 32];
        fill_random(&mut bytes);
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        PrivateKey(bytes)
    }

    pub fn public_key(&self) -> PublicKey {
        let secret = self.secret();
        PublicKey(boringtun::x25519::PublicKey::from(&secret).to_bytes())
    }

    /// The key as x25519 wants it (the copy zeroes itself on drop).
    pub(crate) fn secret(&self) -> boringtun::x25519::StaticSecret {
        boringtun::x25519::StaticSecret::from(self.0)
    }

    /// The raw bytes (for the kernel backend's netlink message).
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses the base64 text form (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<PrivateKey, WgError> {
        decode32(text).map(PrivateKey)
    }

    /// The base64 text form, in a buffer that is zeroed when dropped.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

/// Compares in constant time (no early exit on the first differing byte).
impl PartialEq for PrivateKey {
    fn eq(&self, other: &PrivateKey) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for PrivateKey {}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key())
    }
}

impl PublicKey {
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl std::str::FromStr for PublicKey {
    type Err = WgError;
    fn from_str(s: &str) -> Result<PublicKey, WgError> {
        decode32(s).map(PublicKey)
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// 32 bytes from their base64 text form (standard alphabet, padded: 44 characters).
fn decode32(text: &str) -> Result<[u8; 32], WgError> {
    let text = text.trim();
    if text.len() != 44 {
        return Err(WgError::BadKey(format!(
            "a key is 44 base64 characters (as `wg genkey` / `wg pubkey` print it), got {}",
            text.len()
        )));
    }
    let mut out = Zeroizing::new([0u8; 33]);
    let n = base64::engine::general_purpose::STANDARD
        .decode_slice(text, &mut out[..])
        .map_err(|e| WgError::BadKey(format!("not base64: {e}")))?;
    if n != 32 {
        return Err(WgError::BadKey(format!("decodes to {n} bytes, not 32")));
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&out[..32]);
    Ok(key)
}

pub(crate) fn fill_random(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // getrandom(2) without GRND_NONBLOCK fails only on kernels older than 3.17
            // or under seccomp filters; a key must never come from a weaker source.
            panic!("getrandom failed: {err}");
        }
        filled += n as usize;
    }
}

/// Reads a private key file (base64, one line), refusing links, non-regular files,
/// files over 1 KiB and files readable by group or others; creates it (mode 0600,
/// atomically) with a fresh key when `create` and it does not exist.
pub fn load_or_create_key(path: &Path, create: bool) -> Result<PrivateKey, WgError> {
    match read_key_file(path) {
        Err(ReadError::Missing) if create => {}
        Err(ReadError::Missing) => {
            return Err(WgError::BadKey(format!(
                "private key file {} does not exist",
                path.display()
            )))
        }
        Err(ReadError::Other(e)) => return Err(e),
        Ok(key) => return Ok(key),
    }
    let key = PrivateKey::generate();
    match write_key_file(path, &key, false) {
        Ok(()) => Ok(key),
        // Another process created it between our read and our link: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_key_file(path).map_err(|e| match e {
                ReadError::Missing => WgError::BadKey(format!(
                    "private key file {} vanished while being created",
                    path.display()
                )),
                ReadError::Other(e) => e,
            })
        }
        Err(e) => Err(WgError::Io(std::io::Error::new(
            e.kind(),
            format!("cannot create private key file {}: {e}", path.display()),
        ))),
    }
}

/// Writes `key` to `path` atomically (a 0600 file under an unpredictable temporary
/// name in the same directory, fsynced, then moved into place, and the directory
/// fsynced). `replace`: an existing file is replaced; otherwise the call fails with
/// `AlreadyExists` and leaves it alone.
pub fn write_key_file(path: &Path, key: &PrivateKey, replace: bool) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "key path has no file name",
        )
    })?;
    let mut suffix = [0u8; 8];
    fill_random(&mut suffix);
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(OsString::from_vec(
        format!(".tmp-{:016x}", u64::from_ne_bytes(suffix)).into_bytes(),
    ));
    let tmp = dir.join(tmp_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    let result: std::io::Result<()> = (|| {
        // The umask can only remove bits; set 0600 explicitly all the same.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let mut text = key.to_base64();
        text.push('\n');
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        if replace {
            std::fs::rename(&tmp, path)?;
        } else {
            // link(2) fails with EEXIST instead of replacing: no lost race overwrites
            // a key another process just wrote.
            std::fs::hard_link(&tmp, path)?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    result?;
    File::open(&dir)?.sync_all()
}

enum ReadError {
    Missing,
    Other(WgError),
}

fn read_key_file(path: &Path) -> Result<PrivateKey, ReadError> {
    let shown = path.display();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ReadError::Missing),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(ReadError::Other(WgError::BadKey(format!(
                "private key file {shown} is a symbolic link; point the setting at the file itself"
            ))))
        }
        Err(e) => {
            return Err(ReadError::Other(WgError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot open private key file {shown}: {e}"),
            ))))
        }
    };
    let bad = |msg: String| ReadError::Other(WgError::BadKey(msg));
    let meta = file
        .metadata()
        .map_err(|e| bad(format!("cannot stat private key file {shown}: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(bad(format!(
            "private key file {shown} is not a regular file"
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "private key file {shown} has mode {:04o}: group or others can access it; \
             run `chmod 600 {shown}` (and consider the key leaked if others could read it)",
            meta.mode() & 0o7777
        )));
    }
    if meta.size() > KEY_FILE_MAX {
        return Err(bad(format!(
            "private key file {shown} is {} bytes; a key file is one base64 line (44 characters)",
            meta.size()
        )));
    }
    let mut text = Zeroizing::new(Vec::with_capacity(KEY_FILE_MAX as usize + 1));
    (&mut file)
        .take(KEY_FILE_MAX + 1)
        .read_to_end(&mut text)
        .map_err(|e| bad(format!("cannot read private key file {shown}: {e}")))?;
    if text.len() as u64 > KEY_FILE_MAX {
        return Err(bad(format!(
            "private key file {shown} grew past 1 KiB while being read"
        )));
    }
    let text = std::str::from_utf8(&text)
        .map_err(|_| bad(format!("private key file {shown} is not text")))?;
    PrivateKey::from_base64(text).map_err(|e| bad(format!("private key file {shown}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let mut r = [0u8; 8];
            fill_random(&mut r);
            let p = std::env::temp_dir().join(format!(
                "vrouter-wg-{tag}-{}-{:x}",
                std::process::id(),
                u64::from_ne_bytes(r)
            ));
            std::fs::create_dir(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    // RFC 7748 section 6.1 test vector (Alice).
    const ALICE_PRIV: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
    const ALICE_PUB: &str = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";

    fn hex32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn public_key_matches_rfc7748_vector() {
        let k = PrivateKey(hex32(ALICE_PRIV));
        assert_eq!(k.public_key(), PublicKey(hex32(ALICE_PUB)));
    }

    #[test]
    fn generate_is_clamped_and_random() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        assert_ne!(a.0, b.0);
        assert_eq!(a.0[0] & 7, 0);
        assert_eq!(a.0[31] & 0xc0, 0x40);
    }

    #[test]
    fn public_key_text_round_trip_and_serde() {
        let k = PublicKey(hex32(ALICE_PUB));
        let text = k.to_string();
        assert_eq!(text.len(), 44);
        assert_eq!(text, "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=");
        assert_eq!(text.parse::<PublicKey>().unwrap(), k);
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), k);
        assert!(format!("{k:?}").contains(&text));
    }

    #[test]
    fn bad_key_text_is_refused() {
        for bad in [
            "",
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTm=", // 43
            "hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo=", // url alphabet
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo!",
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmoAAAA=",
        ] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad:?} accepted");
        }
        assert!(serde_json::from_str::<PublicKey>("\"nope\"").is_err());
        assert!(serde_json::from_str::<PublicKey>("12").is_err());
    }

    #[test]
    fn private_key_debug_never_prints_the_secret() {
        let k = PrivateKey(hex32(ALICE_PRIV));
        let shown = format!("{k:?}");
        let b64 = k.to_base64();
        assert!(!shown.contains(b64.as_str()), "{shown}");
        assert!(!shown.contains("77076d0a"), "{shown}");
        assert!(!shown.contains("[119"), "{shown}");
        assert!(shown.contains("hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo="));
    }

    #[test]
    fn private_keys_compare_by_value() {
        let a = PrivateKey(hex32(ALICE_PRIV));
        assert_eq!(a, a.clone());
        assert_ne!(a, PrivateKey::generate());
        let mut b = a.clone();
        b.0[31] ^= 1;
        assert_ne!(a, b);
    }

    #[test]
    fn private_key_is_zeroed_on_drop() {
        let mut slot = std::mem::MaybeUninit::new(PrivateKey(hex32(ALICE_PRIV)));
        // SAFETY: initialised above; dropped in place exactly once, then only its bytes
        // (plain u8s, valid in any state) are read.
        unsafe {
            std::ptr::drop_in_place(slot.as_mut_ptr());
            let bytes = &(*slot.as_ptr()).0;
            assert_eq!(bytes, &[0u8; 32]);
        }
    }

    #[test]
    fn create_then_load_same_key_mode_0600() {
        let d = TempDir::new("create");
        let p = d.0.join("wg.key");
        let k1 = load_or_create_key(&p, true).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.trim_end().len(), 44);
        let k2 = load_or_create_key(&p, false).unwrap();
        assert_eq!(k1.0, k2.0);
        let k3 = load_or_create_key(&p, true).unwrap();
        assert_eq!(k1.0, k3.0);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&d.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("wg.key")]);
    }

    #[test]
    fn missing_without_create_is_an_error() {
        let d = TempDir::new("missing");
        let p = d.0.join("wg.key");
        let e = load_or_create_key(&p, false).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert!(!p.exists());
    }

    #[test]
    fn reads_wg_genkey_format() {
        let d = TempDir::new("genkey");
        let p = d.0.join("wg.key");
        let k = PrivateKey(hex32(ALICE_PRIV));
        std::fs::write(&p, format!("{}\n", k.to_base64().as_str())).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        let got = load_or_create_key(&p, false).unwrap();
        assert_eq!(got.public_key(), k.public_key());
    }

    #[test]
    fn refuses_group_or_other_readable() {
        let d = TempDir::new("mode");
        let p = d.0.join("wg.key");
        std::fs::write(
            &p,
            format!("{}\n", PrivateKey::generate().to_base64().as_str()),
        )
        .unwrap();
        for mode in [0o640, 0o604, 0o660, 0o610] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load_or_create_key(&p, true).unwrap_err().to_string();
            assert!(e.contains("chmod 600"), "{mode:o}: {e}");
        }
    }

    #[test]
    fn refuses_symlink_directory_fifo_and_big_file() {
        let d = TempDir::new("kinds");
        let real = d.0.join("real.key");
        std::fs::write(
            &real,
            format!("{}\n", PrivateKey::generate().to_base64().as_str()),
        )
        .unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = d.0.join("link.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = load_or_create_key(&link, true).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");

        let dir = d.0.join("dir.key");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = load_or_create_key(&dir, true).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");

        // A FIFO: O_NONBLOCK keeps the open from waiting for a writer.
        let fifo = d.0.join("fifo.key");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = load_or_create_key(&fifo, true).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");

        let big = d.0.join("big.key");
        std::fs::write(&big, vec![b'A'; 2000]).unwrap();
        std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load_or_create_key(&big, true).unwrap_err().to_string();
        assert!(e.contains("2000 bytes"), "{e}");
    }

    #[test]
    fn refuses_garbage_content() {
        let d = TempDir::new("garbage");
        let p = d.0.join("wg.key");
        std::fs::write(&p, "not a key\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load_or_create_key(&p, true).unwrap_err().to_string();
        assert!(e.contains("44 base64"), "{e}");
        // The bad file is not replaced by a fresh key.
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "not a key\n");
    }

    #[test]
    fn write_key_file_replace_and_no_replace() {
        let d = TempDir::new("write");
        let p = d.0.join("wg.key.next");
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        write_key_file(&p, &a, false).unwrap();
        let e = write_key_file(&p, &b, false).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(load_or_create_key(&p, false).unwrap().0, a.0);
        write_key_file(&p, &b, true).unwrap();
        assert_eq!(load_or_create_key(&p, false).unwrap().0, b.0);
        assert_eq!(std::fs::read_dir(&d.0).unwrap().count(), 1);
    }
}
