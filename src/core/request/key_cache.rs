//! A worker's view of the key set: its copy of `km/meta` and the key records decoded
//! under it, so a steady request makes no shared-data call for either.

use super::meta_copy::{MetaCopy, MetaRead};
use crate::core::auth::key_record::KeyRecord;
use std::collections::HashMap;
use std::rc::Rc;

/// How long a cached record is trusted without re-reading its entry even while
/// `km/meta` is unchanged. Every committed update rewrites `km/meta` (a full push at its
/// flip, a delta at its end), which empties the cache as soon as this worker's copy of
/// `km/meta` shows it; this bound only covers entry writes without a meta write (a
/// delta that failed half-way).
pub const TTL_MS: u64 = 1_000;
/// Records kept per worker (~200 B each); the cache starts over when full.
pub const CAPACITY: usize = 4_096;

/// Records of authentic keys, valid for one `km/meta` write: the CAS token of `km/meta`
/// changes with every write of it, so a revoke or any other committed change empties
/// the cache as soon as this worker's copy of `km/meta` (see `super::meta_copy`) is
/// refreshed, which the admin API waits for before it answers.
#[derive(Default)]
pub struct KeyCache {
    /// This worker's last read of `km/meta`.
    pub(super) meta: MetaCopy,
    /// The `km/meta` CAS token the records were read under (0: none yet).
    meta_cas: u32,
    records: HashMap<String, (Rc<KeyRecord>, u64)>,
}

impl KeyCache {
    /// The worker's tick: re-reads `km/meta` (through `read`) if the copy is due.
    /// `now_ms` must be read before `read` is called. Returns whether it read.
    pub fn poll_meta(&mut self, now_ms: u64, read: impl FnOnce() -> MetaRead) -> bool {
        if !self.meta.due(now_ms) {
            return false;
        }
        self.meta.store(read(), now_ms);
        true
    }

    /// Forgets everything read under another `km/meta` write.
    fn sync(&mut self, meta_cas: u32) {
        if self.meta_cas != meta_cas {
            self.records.clear();
            self.meta_cas = meta_cas;
        }
    }

    /// The record of `id` read under `meta_cas` less than [`TTL_MS`] before `now_ms`.
    pub fn get(&mut self, meta_cas: u32, id: &str, now_ms: u64) -> Option<Rc<KeyRecord>> {
        self.sync(meta_cas);
        let (rec, read_at) = self.records.get(id)?;
        (now_ms >= *read_at && now_ms - read_at < TTL_MS).then(|| rec.clone())
    }

    /// Remembers an authentic key's record, read under `meta_cas` at `now_ms`.
    pub fn insert(&mut self, meta_cas: u32, rec: Rc<KeyRecord>, now_ms: u64) {
        self.sync(meta_cas);
        if self.records.len() >= CAPACITY && !self.records.contains_key(&rec.id) {
            self.records.clear();
        }
        self.records.insert(rec.id.clone(), (rec, now_ms));
    }

    /// Forgets the records but keeps the copy of `km/meta` (tests: a worker's first
    /// request of a key).
    #[cfg(test)]
    pub fn forget_records(&mut self) {
        self.records.clear();
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}
