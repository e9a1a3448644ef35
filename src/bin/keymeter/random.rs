//! Key material from the kernel CSPRNG.

use keymeter::core::auth::api_key::random_base62;
use std::fs::File;
use std::io::{self, Read};

const URANDOM: &str = "/dev/urandom";

/// `n` uniformly random base62 characters read from /dev/urandom.
pub fn base62(n: usize) -> io::Result<String> {
    let mut f = File::open(URANDOM).map_err(|e| io::Error::new(e.kind(), format!("{URANDOM}: {e}")))?;
    base62_from(&mut f, n)
}

/// `n` base62 characters from `source`, which must yield uniformly random bytes.
/// Reads in blocks; a read error (or EOF) is returned instead of weak output.
pub fn base62_from(source: &mut impl Read, n: usize) -> io::Result<String> {
    let mut buf = [0u8; 64];
    let mut pos = buf.len();
    let mut error: Option<io::Error> = None;
    let s = random_base62(n, || {
        if error.is_some() {
            return 0; // keeps the loop going cheaply; the result is discarded below
        }
        if pos == buf.len() {
            if let Err(e) = source.read_exact(&mut buf) {
                error = Some(e);
                return 0;
            }
            pos = 0;
        }
        pos += 1;
        buf[pos - 1]
    });
    match error {
        Some(e) => Err(e),
        None => Ok(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_urandom() {
        let a = base62(32).unwrap();
        let b = base62(32).unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn short_source_is_an_error_not_weak_output() {
        let mut short: &[u8] = &[1, 2, 3];
        assert!(base62_from(&mut short, 12).is_err());
        let bytes: Vec<u8> = (0..=255u8).collect();
        let s = base62_from(&mut bytes.as_slice(), 12).unwrap();
        assert_eq!(s, "0123456789AB");
    }
}
