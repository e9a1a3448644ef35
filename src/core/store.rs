//! The shared-data interface keymeter needs, as a trait, so all the logic that lays out
//! and updates state in proxy-wasm shared data is tested on the host against a fake with
//! the same semantics.
//!
//! Semantics copied from proxy-wasm-cpp-host: one process-wide map; `get` returns a copy
//! and a CAS token that changes on every write; `set` with a CAS token fails with
//! `CasMismatch` only when the key exists and its token differs (a CAS on a missing key
//! always succeeds); nothing can be deleted or listed, "removing" stores an empty value.

use std::cell::RefCell;
use std::collections::HashMap;

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
    for _ in 0..CREATE_LOCK_SPINS {
        let (v, cas) = store.get(CREATE_LOCK);
        let held_until = v.and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
        if held_until > now_ms {
            continue;
        }
        match store.set(CREATE_LOCK, &(now_ms + CREATE_LOCK_TTL_MS).to_le_bytes(), Some(cas)) {
            Ok(()) => {}
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
        let result = if store.get(key).1 == 0 {
            store.set(key, initial, None).map(|()| true)
        } else {
            Ok(false)
        };
        let _ = store.set(CREATE_LOCK, &0u64.to_le_bytes(), None);
        return result;
    }
    Err(StoreError::CasMismatch)
}

/// In-memory `Store` with the host's semantics, for tests (and host-side tooling).
#[derive(Default)]
pub struct MemStore {
    map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// Called before each `set`; lets tests interleave a "concurrent" writer.
    #[allow(clippy::type_complexity)]
    pub before_set: RefCell<Option<Box<dyn FnMut(&str)>>>,
}

impl MemStore {
    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.borrow().is_empty()
    }
    /// Bytes held in values (what an ABI-0.2 "remove" can free).
    pub fn value_bytes(&self) -> usize {
        self.map.borrow().values().map(|(v, _)| v.len()).sum()
    }
    /// Writes like a concurrent writer would (bumping the CAS), bypassing `before_set`.
    pub fn map_set_raw(&self, key: &str, value: &[u8]) {
        let mut map = self.map.borrow_mut();
        let e = map.entry(key.to_string()).or_insert((Vec::new(), 0));
        e.0 = value.to_vec();
        e.1 = e.1.wrapping_add(1).max(1);
    }

    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .map
            .borrow()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

impl Store for MemStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        match self.map.borrow().get(key) {
            Some((v, cas)) => (Some(v.clone()), *cas),
            None => (None, 0),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        if let Some(hook) = self.before_set.borrow_mut().as_mut() {
            hook(key);
        }
        let mut map = self.map.borrow_mut();
        match map.get_mut(key) {
            Some((v, c)) => {
                if cas.is_some_and(|want| want != 0 && want != *c) {
                    return Err(StoreError::CasMismatch);
                }
                *v = value.to_vec();
                *c = c.wrapping_add(1).max(1);
            }
            None => {
                map.insert(key.to_string(), (value.to_vec(), 1));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
