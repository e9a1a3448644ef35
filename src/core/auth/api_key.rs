//! The keymeter API-key format.
//!
//! `km_<id:12>_<secret:32><checksum:6>`, all base62, 54 bytes in total.
//! - The fixed `km_` prefix and shape let secret scanners (GitHub, GitGuardian, ...)
//!   recognise leaked keys with one regex: `km_[0-9A-Za-z]{12}_[0-9A-Za-z]{38}`.
//! - The id is public: it names the key in the key set, logs, metrics and headers, and
//!   makes lookup O(1) without ever storing or hashing-for-lookup the secret.
//! - The CRC32 checksum (over everything before it) rejects typos and random strings
//!   before any shared-data lookup, so garbage costs no host call.
//!
//! The key set stores only `sha256(full key)`.

use sha2::{Digest, Sha256};

pub const PREFIX: &str = "km_";
pub const ID_LEN: usize = 12;
pub const SECRET_LEN: usize = 32;
pub const CHECKSUM_LEN: usize = 6;
/// Length of a full key: prefix, id, separator, secret, checksum.
pub const KEY_LEN: usize = PREFIX.len() + ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;
/// Offset of the `_` between id and secret.
const SEP_AT: usize = PREFIX.len() + ID_LEN;
const SECRET_AT: usize = SEP_AT + 1;
const CHECKSUM_AT: usize = SECRET_AT + SECRET_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Why a presented string is not a well-formed key. Deliberately coarse: the caller
/// gets the same 401 either way, the distinction only feeds metrics and the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormatError {
    /// Wrong length, prefix, separator or alphabet.
    Malformed,
    /// Right shape, wrong checksum: a typo or a made-up key.
    BadChecksum,
}

impl std::fmt::Display for KeyFormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyFormatError::Malformed => f.write_str("not a keymeter key (expected km_<id>_<secret>)"),
            KeyFormatError::BadChecksum => f.write_str("key checksum does not match (typo?)"),
        }
    }
}

/// A syntactically valid key, borrowed from the request. Holds the secret: never log it.
#[derive(Clone, Copy)]
pub struct ApiKey<'a> {
    full: &'a str,
}

impl<'a> ApiKey<'a> {
    /// Validates shape and checksum without allocating.
    pub fn parse(s: &'a str) -> Result<Self, KeyFormatError> {
        let b = s.as_bytes();
        if b.len() != KEY_LEN || !s.starts_with(PREFIX) || b[SEP_AT] != b'_' {
            return Err(KeyFormatError::Malformed);
        }
        let alnum = |r: &[u8]| r.iter().all(u8::is_ascii_alphanumeric);
        if !alnum(&b[PREFIX.len()..SEP_AT]) || !alnum(&b[SECRET_AT..]) {
            return Err(KeyFormatError::Malformed);
        }
        if checksum(&b[..CHECKSUM_AT]) != b[CHECKSUM_AT..] {
            return Err(KeyFormatError::BadChecksum);
        }
        Ok(ApiKey { full: s })
    }

    /// The public key id (12 base62 characters).
    pub fn id(&self) -> &'a str {
        &self.full[PREFIX.len()..SEP_AT]
    }

    /// The whole key text; only for hashing.
    pub fn as_str(&self) -> &'a str {
        self.full
    }

    /// What the key set stores for this key.
    pub fn hash(&self) -> [u8; 32] {
        hash_key(self.full)
    }
}

impl std::fmt::Debug for ApiKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({}…)", self.id())
    }
}

/// SHA-256 of the full key text.
pub fn hash_key(full: &str) -> [u8; 32] {
    Sha256::digest(full.as_bytes()).into()
}

/// Constant-time equality of two hashes, so response timing does not reveal how many
/// leading bytes of a guessed secret's hash matched.
pub fn hashes_equal<const N: usize>(a: &[u8; N], b: &[u8; N]) -> bool {
    let mut diff = 0u8;
    for i in 0..N {
        diff |= a[i] ^ b[i];
    }
    std::hint::black_box(diff) == 0
}

/// True for a string that is a valid key id (used to validate key sets and CLI input).
pub fn is_valid_id(id: &str) -> bool {
    id.len() == ID_LEN && id.bytes().all(|c| c.is_ascii_alphanumeric())
}

/// Base62 CRC32, fixed width, of `data`.
fn checksum(data: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut v = crc32(data) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(v % 62) as usize];
        v /= 62;
    }
    out
}

/// CRC-32/ISO-HDLC (the zlib one), one table lookup per byte. Every request with a key
/// runs it; the bitwise form (8 shift steps per byte) was a fifth of the steady-state
/// request's own CPU in a host profile, more than sha256.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc = CRC_TABLE[((crc ^ byte as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The 1 KiB table, computed at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Builds a key from an id and a secret (both base62 of the right length), adding the
/// checksum. Used by the CLI with random input; panics on wrong lengths (a caller bug).
pub fn assemble(id: &str, secret: &str) -> String {
    assert!(is_valid_id(id), "bad key id");
    assert!(secret.len() == SECRET_LEN && secret.bytes().all(|c| c.is_ascii_alphanumeric()));
    let mut s = String::with_capacity(KEY_LEN);
    s.push_str(PREFIX);
    s.push_str(id);
    s.push('_');
    s.push_str(secret);
    let sum = checksum(s.as_bytes());
    s.push_str(std::str::from_utf8(&sum).expect("base62 is ascii"));
    s
}

/// Maps uniformly random bytes to base62 text of length `n` (rejection sampling, so no
/// modulo bias). `random` must yield fresh random bytes each call.
pub fn random_base62(n: usize, mut random: impl FnMut() -> u8) -> String {
    let mut s = String::with_capacity(n);
    while s.len() < n {
        let b = random();
        if b < 248 {
            s.push(BASE62[(b % 62) as usize] as char);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        assemble("AbCdEf012345", "0123456789abcdefghijABCDEFGHIJkl")
    }

    #[test]
    fn crc32_matches_reference_vector() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn round_trip() {
        let k = sample();
        assert_eq!(k.len(), KEY_LEN);
        let p = ApiKey::parse(&k).unwrap();
        assert_eq!(p.id(), "AbCdEf012345");
        assert_eq!(p.hash(), hash_key(&k));
        assert!(!format!("{p:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn every_single_character_typo_is_rejected() {
        let k = sample();
        for i in PREFIX.len()..KEY_LEN {
            if i == SEP_AT {
                continue;
            }
            let mut b = k.clone().into_bytes();
            b[i] = if b[i] == b'x' { b'y' } else { b'x' };
            let s = String::from_utf8(b).unwrap();
            assert!(ApiKey::parse(&s).is_err(), "typo at {i} accepted");
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        // The CRC-32/ISO-HDLC check value (crc of "123456789"), as zlib computes it.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn malformed_shapes() {
        let k = sample();
        assert_eq!(ApiKey::parse("").unwrap_err(), KeyFormatError::Malformed);
        assert_eq!(ApiKey::parse(&k[1..]).unwrap_err(), KeyFormatError::Malformed);
        assert_eq!(ApiKey::parse(&format!("{k}x")).unwrap_err(), KeyFormatError::Malformed);
        assert_eq!(
            ApiKey::parse(&k.replace("km_", "kx_")).unwrap_err(),
            KeyFormatError::Malformed
        );
        let mut b = k.clone().into_bytes();
        b[20] = b'-';
        assert_eq!(
            ApiKey::parse(std::str::from_utf8(&b).unwrap()).unwrap_err(),
            KeyFormatError::Malformed
        );
        // multi-byte UTF-8 of the right byte length must not panic on slicing
        let weird = format!("km_{}", "é".repeat((KEY_LEN - 3) / 2)) + "a";
        assert!(ApiKey::parse(&weird).is_err());
    }

    #[test]
    fn constant_time_compare() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(hashes_equal(&a, &b));
        b[31] ^= 1;
        assert!(!hashes_equal(&a, &b));
    }

    #[test]
    fn random_base62_is_alphanumeric_and_sized() {
        let mut n = 0u8;
        let s = random_base62(40, || {
            n = n.wrapping_add(37);
            n
        });
        assert_eq!(s.len(), 40);
        assert!(s.bytes().all(|c| c.is_ascii_alphanumeric()));
    }
}
