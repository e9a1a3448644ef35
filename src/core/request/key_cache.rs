//! A worker's cache of decoded key records, so a steady request skips the key-entry
//! copy out of shared data and its decode.

use crate::core::auth::key_record::KeyRecord;
use std::collections::HashMap;
use std::rc::Rc;

/// How long a cached record is trusted without re-reading its entry even while
/// `km/meta` is unchanged. Every committed update rewrites `km/meta` (a full push at its
/// flip, a delta at its end), which empties the cache at once; this bound only covers
/// entry writes without a meta write (a delta that failed half-way).
pub const TTL_MS: u64 = 1_000;
/// Records kept per worker (~200 B each); the cache starts over when full.
pub const CAPACITY: usize = 4_096;

/// Records of authentic keys, valid for one `km/meta` write: the CAS token of `km/meta`
/// changes with every write of it, and each request reads `km/meta` anyway, so a revoke
/// or any other committed change is seen by the very next request on every worker.
#[derive(Default)]
pub struct KeyCache {
    /// The `km/meta` CAS token the records were read under (0: none yet).
    meta_cas: u32,
    records: HashMap<String, (Rc<KeyRecord>, u64)>,
}

impl KeyCache {
    /// Forgets everything read under another `km/meta` write.
    fn sync(&mut self, meta_cas: u32) {
        if self.meta_cas != meta_cas {
            self.records.clear();
            self.meta_cas = meta_cas;
        }
    }

    /// Whether `id` may be served from the cache under `meta_cas` (then the caller reads
    /// the clock and calls [`KeyCache::get`]).
    pub fn holds(&mut self, meta_cas: u32, id: &str) -> bool {
        self.sync(meta_cas);
        self.records.contains_key(id)
    }

    /// The record of `id` if it was read less than [`TTL_MS`] before `now_ms`.
    pub fn get(&self, id: &str, now_ms: u64) -> Option<Rc<KeyRecord>> {
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

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}
