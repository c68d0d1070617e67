//! Sealing of every gossip packet: XChaCha20-Poly1305 with a key derived from a shared
//! secret through HKDF-SHA256, several keys accepted at once (rotation), one used to
//! send, and a per-sender sliding replay window.
//!
//! Wire format (all integers big-endian):
//!
//! ```text
//! magic "VRG1" (4) | key hint (4) | sender id (8) | sequence (8) | nonce tail (8) | ciphertext + tag (16)
//! ```
//!
//! The first 32 bytes are the associated data. The 24-byte nonce is sender | sequence |
//! nonce tail, so it never repeats under one key as long as a sender never reuses a
//! sequence number: the sequence starts from the wall clock in microseconds at start and
//! counts up, which also makes a restarted sender's packets newer than its old ones.
//! The key hint (the first 4 bytes of SHA-256 of the derived key) only picks the key to
//! try; authenticity comes from the tag alone.
//!
//! Across restarts ([`ReplayState`], stored by the caller): a sender reserves sequence
//! numbers ahead and starts above the reservation, so a wall clock that stepped back
//! neither reuses a number nor falls behind its peers' windows; a receiver restores
//! each sender's newest number, so a packet captured before the restart stays old.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

const MAGIC: &[u8; 4] = b"VRG1";
const HEADER: usize = 32;
const TAG: usize = 16;
/// Bytes a sealed packet adds to its plaintext.
pub const OVERHEAD: usize = HEADER + TAG;
/// Sequence numbers this far behind the newest seen from a sender are still accepted
/// once each (reordering on the wire).
const WINDOW: u64 = 1024;
/// Senders whose replay state is kept; the least recently heard is dropped beyond this.
const MAX_SENDERS: usize = 65_536;
/// Sequence numbers reserved by each [`Sealer::export_replay`]; the caller stores the
/// state again when half of them are used ([`Sealer::replay_due`]).
pub const SEQ_RESERVE: u64 = 1 << 20;
/// Shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;
/// The key every `--insecure` node uses: framing and replay checks still run, but anyone
/// can read and forge packets.
const INSECURE_SECRET: &str = "docker-vrouter insecure gossip (no secret configured)";

/// Why an incoming packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    /// Too short, wrong magic, or a plaintext that does not decode.
    Malformed,
    /// No accepted key authenticates it.
    BadKey,
    /// Authentic, but its sequence number was seen before or is too old.
    Replayed,
}

impl Reject {
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::BadKey => "bad_key",
            Reject::Replayed => "replayed",
        }
    }
}

#[derive(Clone)]
struct Key {
    hint: [u8; 4],
    cipher: XChaCha20Poly1305,
}

impl Key {
    fn derive(secret: &str) -> Key {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(b"docker-vrouter gossip v1"), secret.as_bytes());
        let mut okm = [0u8; 32];
        hk.expand(b"xchacha20poly1305 packet key", &mut okm)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let digest = Sha256::digest(okm);
        let mut hint = [0u8; 4];
        hint.copy_from_slice(&digest[..4]);
        let cipher = XChaCha20Poly1305::new_from_slice(&okm).expect("32-byte key");
        Key { hint, cipher }
    }

    fn hint_hex(&self) -> String {
        self.hint.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The keys in force: the first sends, all are accepted.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<Key>,
    insecure: bool,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("keys", &self.fingerprints())
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl Keyring {
    /// Builds a keyring from secrets, the sending one first. Blank entries are skipped
    /// and repeats are dropped; each secret must be at least `MIN_SECRET_LEN` bytes.
    pub fn from_secrets<S: AsRef<str>>(secrets: &[S]) -> Result<Keyring, String> {
        let mut keys: Vec<Key> = Vec::new();
        for (i, s) in secrets.iter().enumerate() {
            let s = s.as_ref().trim();
            if s.is_empty() {
                continue;
            }
            if s.len() < MIN_SECRET_LEN {
                return Err(format!(
                    "secret {} is {} bytes long; use at least {MIN_SECRET_LEN} (for example `head -c 32 /dev/urandom | base64`)",
                    i + 1,
                    s.len()
                ));
            }
            let k = Key::derive(s);
            if !keys.iter().any(|o| o.hint == k.hint) {
                keys.push(k);
            }
        }
        if keys.is_empty() {
            return Err("no secret given: the secret file or VROUTER_SECRET is empty".into());
        }
        Ok(Keyring {
            keys,
            insecure: false,
        })
    }

    /// The well-known key of `--insecure` mode.
    pub fn insecure() -> Keyring {
        Keyring {
            keys: vec![Key::derive(INSECURE_SECRET)],
            insecure: true,
        }
    }

    pub fn is_insecure(&self) -> bool {
        self.insecure
    }

    /// Short public fingerprints of the keys, the sending key first (safe to log).
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys.iter().map(Key::hint_hex).collect()
    }
}

/// What replay protection must remember across a restart, as a value the caller
/// stores (discovery: replay.json in its private directory).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayState {
    /// Every sequence number this sender used, or may use before the state is stored
    /// again, is below this.
    pub seq_reserved: u64,
    /// (sender, newest sequence number accepted from it), most recently heard first.
    pub senders: Vec<(u64, u64)>,
}

/// Seals outgoing packets of one sender and opens incoming ones, with replay state.
pub struct Sealer {
    keyring: Keyring,
    sender: u64,
    next_seq: u64,
    /// The reservation last stored ([`Sealer::replay_stored`]).
    reserved: u64,
    windows: HashMap<u64, ReplayWindow>,
    /// Logical clock for the least-recently-heard eviction.
    heard: u64,
}

impl Sealer {
    /// `seq_base` must exceed every sequence number this sender used before: pass the
    /// wall clock in microseconds.
    pub fn new(keyring: Keyring, sender: u64, seq_base: u64) -> Sealer {
        Sealer {
            keyring,
            sender,
            next_seq: seq_base,
            reserved: 0,
            windows: HashMap::new(),
            heard: 0,
        }
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Switches keys; replay state is kept (it is per sender, not per key).
    pub fn set_keyring(&mut self, keyring: Keyring) {
        self.keyring = keyring;
    }

    /// The state to store: sequence numbers reserved up to `SEQ_RESERVE` ahead, and
    /// the newest number of every sender heard. Call [`Sealer::replay_stored`] once it
    /// is stored.
    pub fn export_replay(&self) -> ReplayState {
        let mut senders: Vec<(u64, u64, u64)> = self
            .windows
            .iter()
            .filter(|(_, w)| w.started)
            .map(|(id, w)| (w.heard, *id, w.top))
            .collect();
        senders.sort_unstable_by(|a, b| b.cmp(a));
        ReplayState {
            seq_reserved: self.next_seq.saturating_add(SEQ_RESERVE).max(self.reserved),
            senders: senders.into_iter().map(|(_, id, top)| (id, top)).collect(),
        }
    }

    /// The state exported with this reservation is stored durably.
    pub fn replay_stored(&mut self, seq_reserved: u64) {
        self.reserved = self.reserved.max(seq_reserved);
    }

    /// Whether half of the stored reservation is used (or none is stored yet): export
    /// and store the state now, before the sender runs past it.
    pub fn replay_due(&self) -> bool {
        self.next_seq.saturating_add(SEQ_RESERVE / 2) >= self.reserved
    }

    /// Restores a stored state: sending starts above its reservation, and each sender's
    /// numbers up to its newest are taken as seen (a packet captured before the restart
    /// is rejected; a reordered one that was never opened is lost, which gossip repairs).
    pub fn import_replay(&mut self, state: &ReplayState) {
        self.next_seq = self.next_seq.max(state.seq_reserved);
        self.reserved = self.reserved.max(state.seq_reserved);
        for (i, (sender, top)) in state.senders.iter().take(MAX_SENDERS).enumerate() {
            // Most recently heard first: keep that order for the eviction.
            let heard = (state.senders.len().min(MAX_SENDERS) - i) as u64;
            let w = self.windows.entry(*sender).or_default();
            if !w.started || w.top < *top {
                *w = ReplayWindow::restored(*top, heard);
            }
            self.heard = self.heard.max(heard);
        }
    }

    pub fn seal(&mut self, plaintext: &[u8]) -> Vec<u8> {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        let key = &self.keyring.keys[0];
        let mut header = [0u8; HEADER];
        header[..4].copy_from_slice(MAGIC);
        header[4..8].copy_from_slice(&key.hint);
        header[8..16].copy_from_slice(&self.sender.to_be_bytes());
        header[16..24].copy_from_slice(&seq.to_be_bytes());
        // Nonce tail: a mix of the sequence, so the nonce differs even if two processes
        // were (wrongly) given the same sender id and started in the same microsecond.
        let tail = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ std::process::id() as u64;
        header[24..32].copy_from_slice(&tail.to_be_bytes());
        let nonce = &XNonce::try_from(&header[8..32]).expect("24 bytes");
        let ct = key
            .cipher
            .encrypt(
                nonce,
                Payload {
                    msg: plaintext,
                    aad: &header,
                },
            )
            .expect("XChaCha20-Poly1305 encryption of a datagram cannot fail");
        let mut out = Vec::with_capacity(HEADER + ct.len());
        out.extend_from_slice(&header);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a packet: returns the sender id and the plaintext, or why it was dropped.
    pub fn open(&mut self, packet: &[u8]) -> Result<(u64, Vec<u8>), Reject> {
        if packet.len() < OVERHEAD || &packet[..4] != MAGIC {
            return Err(Reject::Malformed);
        }
        let header = &packet[..HEADER];
        let sender = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
        let seq = u64::from_be_bytes(header[16..24].try_into().expect("8 bytes"));
        let nonce = &XNonce::try_from(&header[8..32]).expect("24 bytes");
        let hint = &header[4..8];
        // The hinted key first, then the others (a hint collision must not lock out).
        let mut order: Vec<&Key> = self
            .keyring
            .keys
            .iter()
            .filter(|k| k.hint == hint)
            .collect();
        order.extend(self.keyring.keys.iter().filter(|k| k.hint != hint));
        let mut plain = None;
        for k in order {
            if let Ok(p) = k.cipher.decrypt(
                nonce,
                Payload {
                    msg: &packet[HEADER..],
                    aad: header,
                },
            ) {
                plain = Some(p);
                break;
            }
        }
        let plain = plain.ok_or(Reject::BadKey)?;
        self.heard += 1;
        let heard = self.heard;
        if !self.windows.contains_key(&sender) && self.windows.len() >= MAX_SENDERS {
            if let Some(oldest) = self
                .windows
                .iter()
                .min_by_key(|(_, w)| w.heard)
                .map(|(id, _)| *id)
            {
                self.windows.remove(&oldest);
            }
        }
        let w = self.windows.entry(sender).or_default();
        if !w.accept(seq) {
            return Err(Reject::Replayed);
        }
        w.heard = heard;
        Ok((sender, plain))
    }
}

/// A sliding window over one sender's sequence numbers (RFC 4303's anti-replay idea).
#[derive(Default)]
struct ReplayWindow {
    top: u64,
    /// Bit i set: sequence `top - i` was seen.
    seen: [u64; (WINDOW / 64) as usize],
    started: bool,
    heard: u64,
}

impl ReplayWindow {
    /// A window whose numbers up to `top` all count as seen.
    fn restored(top: u64, heard: u64) -> ReplayWindow {
        ReplayWindow {
            top,
            seen: [u64::MAX; (WINDOW / 64) as usize],
            started: true,
            heard,
        }
    }

    fn accept(&mut self, seq: u64) -> bool {
        if !self.started {
            self.started = true;
            self.top = seq;
            self.seen = Default::default();
            self.set(0);
            return true;
        }
        if seq > self.top {
            let shift = seq - self.top;
            self.shift(shift);
            self.top = seq;
            self.set(0);
            return true;
        }
        let age = self.top - seq;
        if age >= WINDOW || self.get(age) {
            return false;
        }
        self.set(age);
        true
    }

    fn get(&self, age: u64) -> bool {
        self.seen[(age / 64) as usize] & (1 << (age % 64)) != 0
    }

    fn set(&mut self, age: u64) {
        self.seen[(age / 64) as usize] |= 1 << (age % 64);
    }

    fn shift(&mut self, by: u64) {
        if by >= WINDOW {
            self.seen = Default::default();
            return;
        }
        // Move bit i to bit i + by across the words.
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        let n = self.seen.len();
        for i in (0..n).rev() {
            let src = i.checked_sub(words);
            let mut v = src.map(|s| self.seen[s] << bits).unwrap_or(0);
            if bits > 0 {
                if let Some(s) = src.and_then(|s| s.checked_sub(1)) {
                    v |= self.seen[s] >> (64 - bits);
                }
            }
            self.seen[i] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(s: &[&str]) -> Keyring {
        Keyring::from_secrets(s).unwrap()
    }

    #[test]
    fn round_trip_and_wrong_key() {
        let mut a = Sealer::new(ring(&["secret-number-one-1234"]), 7, 1_000);
        let mut b = Sealer::new(ring(&["secret-number-one-1234"]), 8, 5_000);
        let mut c = Sealer::new(ring(&["another-secret-entirely"]), 9, 9_000);
        let p = a.seal(b"hello");
        assert_eq!(p.len(), 5 + OVERHEAD);
        assert_eq!(b.open(&p).unwrap(), (7, b"hello".to_vec()));
        assert_eq!(c.open(&p).unwrap_err(), Reject::BadKey);
    }

    #[test]
    fn tampering_and_garbage_are_rejected() {
        let mut a = Sealer::new(ring(&["secret-number-one-1234"]), 7, 1);
        let mut b = Sealer::new(ring(&["secret-number-one-1234"]), 8, 1);
        let p = a.seal(b"hello world");
        for i in [0usize, 5, 9, 17, 30, 40, p.len() - 1] {
            let mut q = p.clone();
            q[i] ^= 0x40;
            assert!(b.open(&q).is_err(), "flip at {i} accepted");
        }
        assert_eq!(b.open(&[]).unwrap_err(), Reject::Malformed);
        assert_eq!(b.open(&p[..20]).unwrap_err(), Reject::Malformed);
        assert_eq!(b.open(&[0u8; 200]).unwrap_err(), Reject::Malformed);
        // Header changes that keep the magic are authentication failures.
        let mut q = p.clone();
        q[16] ^= 1; // sequence
        assert_eq!(b.open(&q).unwrap_err(), Reject::BadKey);
        assert!(b.open(&p).is_ok());
    }

    #[test]
    fn replays_are_rejected_and_reordering_is_not() {
        let mut a = Sealer::new(ring(&["secret-number-one-1234"]), 7, 100);
        let mut b = Sealer::new(ring(&["secret-number-one-1234"]), 8, 1);
        let ps: Vec<_> = (0..10).map(|i| a.seal(&[i])).collect();
        assert!(b.open(&ps[5]).is_ok());
        assert!(b.open(&ps[3]).is_ok(), "reordered packet within the window");
        assert_eq!(b.open(&ps[5]).unwrap_err(), Reject::Replayed);
        assert_eq!(b.open(&ps[3]).unwrap_err(), Reject::Replayed);
        assert!(b.open(&ps[9]).is_ok());
        assert!(b.open(&ps[4]).is_ok());
        // Far behind the window: rejected even though never seen.
        let old = a.seal(b"old");
        for _ in 0..(WINDOW + 5) {
            let p = a.seal(b"x");
            b.open(&p).unwrap();
        }
        assert_eq!(b.open(&old).unwrap_err(), Reject::Replayed);
        // A restarted sender (new, higher base) is accepted.
        let mut a2 = Sealer::new(ring(&["secret-number-one-1234"]), 7, 1_000_000);
        assert!(b.open(&a2.seal(b"again")).is_ok());
    }

    #[test]
    fn window_shift_keeps_bits_across_words() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(1000));
        assert!(w.accept(1001));
        assert!(w.accept(1070)); // shift by 69: crosses a word
        assert!(!w.accept(1000));
        assert!(!w.accept(1001));
        assert!(w.accept(1002));
        assert!(!w.accept(1070));
        assert!(w.accept(1000 + WINDOW + 2000));
        assert!(!w.accept(1070));
    }

    #[test]
    fn a_restarted_receiver_still_rejects_packets_captured_before() {
        let mut a = Sealer::new(ring(&["secret-number-one-1234"]), 7, 100);
        let mut b = Sealer::new(ring(&["secret-number-one-1234"]), 8, 1);
        let ps: Vec<_> = (0..2000).map(|i| a.seal(&[i as u8])).collect();
        for p in &ps[..1999] {
            b.open(p).unwrap();
        }
        let stored = b.export_replay();
        assert_eq!(stored.senders, vec![(7, 100 + 1998)]);
        // Without the state, a restarted receiver takes the first packet it sees.
        let mut fresh = Sealer::new(ring(&["secret-number-one-1234"]), 8, 1);
        assert!(fresh.open(&ps[5]).is_ok());
        let mut b2 = Sealer::new(ring(&["secret-number-one-1234"]), 8, 1);
        b2.import_replay(&stored);
        assert_eq!(b2.open(&ps[5]).unwrap_err(), Reject::Replayed);
        assert_eq!(b2.open(&ps[1990]).unwrap_err(), Reject::Replayed);
        assert!(b2.open(&ps[1999]).is_ok(), "the next new packet");
        assert!(b2.open(&a.seal(b"new")).is_ok());
    }

    #[test]
    fn a_sender_whose_clock_stepped_back_starts_above_its_old_numbers() {
        let key = "secret-number-one-1234";
        let mut a = Sealer::new(ring(&[key]), 7, 5_000_000);
        assert!(a.replay_due(), "nothing stored yet");
        let stored = a.export_replay();
        assert!(stored.seq_reserved >= 5_000_000 + SEQ_RESERVE);
        a.replay_stored(stored.seq_reserved);
        assert!(!a.replay_due());
        let mut b = Sealer::new(ring(&[key]), 8, 1);
        // Sends, then crashes without storing again: every number used is below the
        // stored reservation.
        let mut last = Vec::new();
        for _ in 0..5000 {
            last = a.seal(b"x");
            b.open(&last).unwrap();
        }
        // Restarted with the clock an hour back.
        let mut back = Sealer::new(ring(&[key]), 7, 1_000);
        assert_eq!(b.open(&back.seal(b"y")).unwrap_err(), Reject::Replayed);
        let mut a2 = Sealer::new(ring(&[key]), 7, 1_000);
        a2.import_replay(&stored);
        assert!(b.open(&a2.seal(b"z")).is_ok(), "accepted after the restart");
        assert_eq!(b.open(&last).unwrap_err(), Reject::Replayed);
        // The restored reservation is used up from the start: store a new one first.
        assert!(a2.replay_due());
        let next = a2.export_replay();
        assert!(next.seq_reserved >= stored.seq_reserved + SEQ_RESERVE);
    }

    #[test]
    fn the_state_is_due_again_when_half_the_reservation_is_used() {
        let mut a = Sealer::new(ring(&["secret-number-one-1234"]), 7, 0);
        let s = a.export_replay();
        a.replay_stored(s.seq_reserved);
        a.next_seq += SEQ_RESERVE / 2 - 1;
        assert!(!a.replay_due());
        a.seal(b"x");
        assert!(a.replay_due());
        assert!(a.next_seq < s.seq_reserved);
    }

    #[test]
    fn rotation_in_three_steps() {
        let old = "old-secret-0123456789";
        let new = "new-secret-9876543210";
        let mut n1 = Sealer::new(ring(&[old]), 1, 10);
        let mut n2 = Sealer::new(ring(&[old]), 2, 10);
        // Step 1: n1 accepts both, still sends old.
        n1.set_keyring(ring(&[old, new]));
        assert!(n2.open(&n1.seal(b"a")).is_ok());
        n2.set_keyring(ring(&[old, new]));
        // Step 2: n1 sends new; n2 (accepting both) opens it; n2 still on old is fine too.
        n1.set_keyring(ring(&[new, old]));
        assert!(n2.open(&n1.seal(b"b")).is_ok());
        assert!(n1.open(&n2.seal(b"c")).is_ok());
        n2.set_keyring(ring(&[new, old]));
        // Step 3: old removed everywhere.
        n1.set_keyring(ring(&[new]));
        n2.set_keyring(ring(&[new]));
        assert!(n2.open(&n1.seal(b"d")).is_ok());
        let mut stale = Sealer::new(ring(&[old]), 3, 10);
        assert_eq!(n2.open(&stale.seal(b"e")).unwrap_err(), Reject::BadKey);
    }

    #[test]
    fn secrets_are_checked() {
        assert!(Keyring::from_secrets(&["short"])
            .unwrap_err()
            .contains("at least 16"));
        assert!(Keyring::from_secrets(&["", "  "])
            .unwrap_err()
            .contains("empty"));
        let k = ring(&[
            "aaaaaaaaaaaaaaaaaaaa",
            "aaaaaaaaaaaaaaaaaaaa",
            "bbbbbbbbbbbbbbbbbbbbbbbb",
        ]);
        assert_eq!(k.fingerprints().len(), 2);
        assert!(Keyring::insecure().is_insecure());
    }
}
