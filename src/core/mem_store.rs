//! In-memory `Store` with the host's semantics, for tests only (host tests, and other
//! crates of this workspace through the `test-support` feature): the production core
//! carries no fakes.

use crate::core::store::{Store, StoreError};
use std::cell::RefCell;
use std::collections::HashMap;

/// In-memory `Store` with the host's semantics, for tests (and host-side tooling).
#[derive(Default)]
pub struct MemStore {
    map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    /// Called before each `set`; lets tests interleave a "concurrent" writer.
    #[allow(clippy::type_complexity)]
    pub before_set: RefCell<Option<Box<dyn FnMut(&str)>>>,
    /// Called before each `set`; an error it returns fails that set (a host failure or
    /// a lost race) without writing.
    #[allow(clippy::type_complexity)]
    pub fail_set: RefCell<Option<Box<dyn FnMut(&str) -> Option<StoreError>>>>,
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
        if let Some(fail) = self.fail_set.borrow_mut().as_mut() {
            if let Some(e) = fail(key) {
                return Err(e);
            }
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
