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
