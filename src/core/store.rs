//! The shared-data interface keymeter needs, as a trait, so all the logic that lays out
//! and updates state in proxy-wasm shared data is tested on the host against a fake with
//! the same semantics.
//!
//! Semantics copied from proxy-wasm-cpp-host: one process-wide map; `get` returns a copy
//! and a CAS token that changes on every write; `set` with a CAS token fails with
//! `CasMismatch` only when the key exists and its token differs (a CAS on a missing key
//! always succeeds); nothing can be deleted or listed, "removing" stores an empty value.

use crate::core::cas::{unique_owner, LockError, TtlLock};

#[cfg(any(test, feature = "test-support"))]
pub use crate::core::mem_store::MemStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    CasMismatch,
    /// Any other host failure; treated as "try later", never as success.
    Host,
}

pub trait Store {
    /// Value and CAS token; `None` value for a key never set. An empty value means removed.
    fn get(&self, key: &str) -> (Option<Vec<u8>>, u32);
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

/// The value of `key`, with an empty value (a "removed" entry) read as absent, and its
/// CAS token.
pub fn read_value(store: &dyn Store, key: &str) -> (Option<Vec<u8>>, u32) {
    let (v, cas) = store.get(key);
    (v.filter(|v| !v.is_empty()), cas)
}

/// Decodes the little-endian u64 that counters, deadlines and lengths are stored as;
/// `None` unless `bytes` is exactly 8 bytes long.
pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_le_bytes)
}

/// A little-endian u64 entry; 0 when missing, removed or malformed.
pub fn read_u64(store: &dyn Store, key: &str) -> u64 {
    store.get(key).0.as_deref().and_then(decode_u64).unwrap_or(0)
}

/// Serializes creation of shared-data keys process-wide (see `ensure_exists`).
pub const CREATE_LOCK: &str = "km/create-lock";
/// A creator that died holding the lock loses it after this long.
const CREATE_LOCK_TTL_MS: u64 = 1_000;
const CREATE_LOCK_SPINS: usize = 10_000;

/// Creates the lock entry if missing. Call at VM start, before any request: racing
/// starters all write "free", which is harmless while nobody can hold it yet.
pub fn init_create_lock(store: &dyn Store) {
    if store.get(CREATE_LOCK).1 == 0 {
        let _ = store.set(CREATE_LOCK, &0u64.to_le_bytes(), None);
    }
}

/// Creates `key` holding `initial` unless it exists; returns whether this call created
/// it. CAS is not checked for keys that do not exist yet, so two workers creating the
/// same key would overwrite each other (and whatever the first one wrote right after);
/// creation therefore happens under a process-wide lock entry and re-checks existence
/// inside it. Creation is rare (first use of a key's limit state or usage record), so
/// the lock is never on a steady-state path.
pub fn ensure_exists(store: &dyn Store, key: &str, initial: &[u8], now_ms: u64) -> Result<bool, StoreError> {
    init_create_lock(store);
    let owner = unique_owner("c");
    for _ in 0..CREATE_LOCK_SPINS {
        let _lock = match TtlLock::acquire(store, CREATE_LOCK, &owner, CREATE_LOCK_TTL_MS, now_ms) {
            Ok(lock) => lock,
            Err(LockError::Store(e)) => return Err(e),
            Err(LockError::Held { .. } | LockError::Lost) => continue,
        };
        return if store.get(key).1 == 0 {
            store.set(key, initial, None).map(|()| true)
        } else {
            Ok(false)
        };
    }
    Err(StoreError::CasMismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::MemStore;

    #[test]
    fn ensure_exists_creates_once_and_never_overwrites() {
        let s = MemStore::default();
        assert!(ensure_exists(&s, "k", b"init", 10).unwrap());
        s.set("k", b"real data", None).unwrap();
        assert!(!ensure_exists(&s, "k", b"init", 10).unwrap());
        assert_eq!(s.get("k").0.as_deref(), Some(&b"real data"[..]));
        assert_eq!(s.get(CREATE_LOCK).0.unwrap(), 0u64.to_le_bytes(), "lock released");
    }

    #[test]
    fn ensure_exists_waits_out_a_dead_holder() {
        let s = MemStore::default();
        s.set(CREATE_LOCK, &500u64.to_le_bytes(), None).unwrap(); // held until t=500
        assert_eq!(ensure_exists(&s, "k", b"x", 100), Err(StoreError::CasMismatch));
        assert!(s.get("k").0.is_none());
        assert!(ensure_exists(&s, "k", b"x", 501).unwrap());
    }

    #[test]
    fn cas_semantics_match_the_host() {
        let s = MemStore::default();
        assert_eq!(s.get("a"), (None, 0));
        s.set("a", b"1", Some(42)).unwrap(); // missing key: CAS not checked
        let (v, c) = s.get("a");
        assert_eq!(v.as_deref(), Some(&b"1"[..]));
        assert_eq!(s.set("a", b"2", Some(c + 7)), Err(StoreError::CasMismatch));
        s.set("a", b"2", Some(c)).unwrap();
        assert_eq!(s.set("a", b"3", Some(c)), Err(StoreError::CasMismatch));
        s.set("a", b"3", None).unwrap();
        assert_eq!(s.get("a").0.as_deref(), Some(&b"3"[..]));
    }
}
