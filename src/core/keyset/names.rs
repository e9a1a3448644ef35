//! Names of the key set's shared-data entries (see the module doc of `keyset`).

pub const META: &str = "km/meta";
pub const GEN: &str = "km/gen";
pub const LOCK: &str = "km/lock";
pub const STATUS: &str = "km/status";
pub const UPLOAD: &str = "km/upload";
pub const CLEANUP: &str = "km/cleanup";
pub const DELTA: &str = "km/delta";

/// Prefix of per-key entries. Deliberately short: `k/` + a 12-byte id fits the host's
/// small-string buffer, which saves a heap allocation per key in a million-key set.
pub const KEY_ENTRY_PREFIX: &str = "k/";

/// Writes `k/<id>` into `buf` without allocating (ids are 12 ASCII bytes).
pub fn key_entry_name<'a>(id: &str, buf: &'a mut [u8; 32]) -> &'a str {
    let p = KEY_ENTRY_PREFIX.len();
    let n = p + id.len().min(32 - p);
    buf[..p].copy_from_slice(KEY_ENTRY_PREFIX.as_bytes());
    buf[p..n].copy_from_slice(&id.as_bytes()[..n - p]);
    std::str::from_utf8(&buf[..n]).unwrap_or(KEY_ENTRY_PREFIX)
}

pub fn plans_name(slot: u8) -> String {
    format!("km/plans/{}", slot & 1)
}
pub fn index_len_name(slot: u8) -> String {
    format!("km/idx/{}/n", slot & 1)
}
pub fn index_chunk_name(slot: u8, i: usize) -> String {
    format!("km/idx/{}/{i}", slot & 1)
}
