//! Usage counting for billing.
//!
//! Requests are counted in a per-worker `Aggregator` (no host call, no lock) and merged
//! every flush interval into one shared-data record per key lineage (`km/u/<lineage>`)
//! with CAS; the records are cumulative since the Envoy process started. Worst-case
//! loss: what a worker counted since its last flush if Envoy crashes (a plugin reload
//! or shutdown flushes first). A rotated key shares its predecessor's lineage, so its
//! usage continues in the same record.
//!
//! Shared data cannot be listed, so lineages with a record are also appended to an
//! index (`km/uidx/...`) when their record is created; the usage API pages through it.

use crate::core::cas::{add_u64_capped, cas_update, Create, Step};
use crate::core::store::{read_u64, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// How a request ended, from the key holder's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Admitted,
    /// Authentic key refused: disabled, expired, not yet valid.
    Unauthorized,
    /// Authentic key outside its scopes or CIDRs.
    Forbidden,
    RateLimited,
    QuotaExceeded,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Admitted,
        Outcome::Unauthorized,
        Outcome::Forbidden,
        Outcome::RateLimited,
        Outcome::QuotaExceeded,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Admitted => "admitted",
            Outcome::Unauthorized => "unauthorized",
            Outcome::Forbidden => "forbidden",
            Outcome::RateLimited => "rate_limited",
            Outcome::QuotaExceeded => "quota_exceeded",
        }
    }
}

pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Indexed like `Outcome::ALL`.
    pub requests: [u64; 5],
    /// Responses by status class, indexed like `STATUS_CLASSES`.
    pub responses: [u64; 5],
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Cost units consumed by admitted requests (route weights).
    pub cost_units: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        for i in 0..5 {
            self.requests[i] += o.requests[i];
            self.responses[i] += o.responses[i];
        }
        self.request_bytes += o.request_bytes;
        self.response_bytes += o.response_bytes;
        self.cost_units += o.cost_units;
    }

    pub fn is_zero(&self) -> bool {
        *self == Counters::default()
    }

    /// Counts one finished request.
    pub fn record(&mut self, outcome: Outcome, status: u32, req_bytes: u64, resp_bytes: u64, cost: u64) {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.requests[i] += 1;
        if (100..600).contains(&status) {
            self.responses[(status / 100 - 1) as usize] += 1;
        }
        self.request_bytes += req_bytes;
        self.response_bytes += resp_bytes;
        if outcome == Outcome::Admitted {
            self.cost_units += cost;
        }
    }

    /// The usage API's JSON shape (`counts::UsageCounts`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(crate::core::metering::counts::UsageCounts::from(self)).expect("counts serialize")
    }
}

/// The cumulative record of one lineage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub lineage: String,
    /// The last key id, consumer and plan seen for the lineage.
    pub key_id: String,
    pub consumer: String,
    pub plan: String,
    pub counters: Counters,
}

/// Identity a usage row is attributed to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Subject {
    pub lineage: String,
    pub key_id: String,
    pub consumer: String,
    pub plan: String,
}

/// A worker's not-yet-flushed counts, keyed by lineage so counting a request for a
/// lineage already seen this interval allocates nothing.
#[derive(Debug, Default)]
pub struct Aggregator {
    rows: HashMap<String, (Subject, Counters)>,
    /// Lineages whose record this worker created but could not index yet, with the
    /// index position already claimed, if any.
    unindexed: Vec<(String, Option<u64>)>,
}

impl Aggregator {
    /// The counters of `lineage`, created with `subject()` on first use. The subject's
    /// key id, consumer and plan are refreshed when they changed (rotation, plan change).
    pub fn counters(&mut self, lineage: &str, key_id: &str, consumer: &str, plan: &str) -> &mut Counters {
        if !self.rows.contains_key(lineage) {
            let subject = Subject {
                lineage: lineage.to_string(),
                key_id: key_id.to_string(),
                consumer: consumer.to_string(),
                plan: plan.to_string(),
            };
            self.rows.insert(lineage.to_string(), (subject, Counters::default()));
        }
        let (subject, counters) = self.rows.get_mut(lineage).expect("just inserted");
        if subject.key_id != key_id || subject.consumer != consumer || subject.plan != plan {
            subject.key_id = key_id.to_string();
            subject.consumer = consumer.to_string();
            subject.plan = plan.to_string();
        }
        counters
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    pub fn drain(&mut self) -> Vec<(Subject, Counters)> {
        self.rows.drain().map(|(_, v)| v).collect()
    }
    /// Puts back rows whose flush failed, so nothing is lost.
    pub fn restore(&mut self, subject: Subject, c: Counters) {
        let Subject {
            lineage,
            key_id,
            consumer,
            plan,
        } = &subject;
        self.counters(lineage, key_id, consumer, plan).add(&c);
    }
}

pub const INDEX_LEN: &str = "km/uidx/n";
const INDEX_CHUNK: usize = 1024;
const CAS_RETRIES: usize = 32;

fn record_name(lineage: &str) -> String {
    format!("km/u/{lineage}")
}
fn index_chunk_name(i: usize) -> String {
    format!("km/uidx/{i}")
}

/// Adds `delta` to the lineage's shared record. Returns whether this call wrote the
/// record's first counts: exactly one merge per record does (CAS), and that one must
/// see the lineage indexed (`index_lineage`).
fn merge_counts(store: &dyn Store, subject: &Subject, delta: &Counters, now_ms: u64) -> Result<bool, StoreError> {
    let name = record_name(&subject.lineage);
    cas_update(store, &name, CAS_RETRIES, Create::ViaLock { now_ms }, |bytes| {
        let first = bytes.is_none();
        let mut rec: UsageRecord = bytes.and_then(|b| bincode::deserialize(b).ok()).unwrap_or_default();
        rec.lineage.clone_from(&subject.lineage);
        rec.key_id.clone_from(&subject.key_id);
        rec.consumer.clone_from(&subject.consumer);
        rec.plan.clone_from(&subject.plan);
        rec.counters.add(delta);
        Step::Write(bincode::serialize(&rec).expect("usage encodes"), first)
    })
}

/// Appends `lineage` to the usage index. `slot` remembers the position claimed (by
/// bumping the count) across attempts, so a retry after a failed chunk write fills the
/// same position instead of claiming another: a lineage is indexed exactly once.
/// Both steps are bounded CAS loops; on error the caller retries later.
fn index_lineage(store: &dyn Store, lineage: &str, slot: &mut Option<u64>, now_ms: u64) -> Result<(), StoreError> {
    let create = Create::ViaLock { now_ms };
    let n = match *slot {
        Some(n) => n,
        None => {
            let len = add_u64_capped(store, INDEX_LEN, 1, u64::MAX, CAS_RETRIES, create)?.unwrap_or(u64::MAX);
            *slot = Some(len - 1);
            len - 1
        }
    };
    let chunk = index_chunk_name(n as usize / INDEX_CHUNK);
    let at = n as usize % INDEX_CHUNK;
    cas_update(store, &chunk, CAS_RETRIES, create, |v| {
        let mut ids: Vec<String> = v.and_then(|b| bincode::deserialize(b).ok()).unwrap_or_default();
        if ids.len() <= at {
            ids.resize(at + 1, String::new());
        }
        ids[at] = lineage.to_string();
        Step::Write(bincode::serialize(&ids).expect("index encodes"), ())
    })
}

/// Merges and indexes in one call (tests and tools; the filter flushes through
/// `Aggregator::flush`, which retries a failed index write without re-adding counts).
#[cfg(test)]
pub fn merge(store: &dyn Store, subject: &Subject, delta: &Counters, now_ms: u64) -> Result<bool, StoreError> {
    let created = merge_counts(store, subject, delta, now_ms)?;
    if created {
        index_lineage(store, &subject.lineage, &mut None, now_ms)?;
    }
    Ok(created)
}

impl Aggregator {
    /// Merges every row into shared data. A row whose merge failed stays (nothing of
    /// it was written); a row whose merge succeeded is gone for good, even if indexing
    /// its new lineage failed: the index write is retried at the next flush on its
    /// own, so counts are never added twice. Returns the merged rows (for metrics).
    pub fn flush(&mut self, store: &dyn Store, now_ms: u64) -> Vec<(Subject, Counters)> {
        let mut pending = std::mem::take(&mut self.unindexed);
        let mut merged = Vec::new();
        for (subject, c) in self.drain() {
            match merge_counts(store, &subject, &c, now_ms) {
                Ok(created) => {
                    if created {
                        pending.push((subject.lineage.clone(), None));
                    }
                    merged.push((subject, c));
                }
                Err(_) => self.restore(subject, c),
            }
        }
        for (lineage, mut slot) in pending {
            if index_lineage(store, &lineage, &mut slot, now_ms).is_err() {
                self.unindexed.push((lineage, slot));
            }
        }
        merged
    }
}

/// One page of cumulative usage, in index order. `cursor` is an index position.
pub fn page(store: &dyn Store, consumer: Option<&str>, cursor: u64, limit: usize) -> (Vec<UsageRecord>, Option<u64>) {
    let (rows, next) = entries(store, consumer, cursor, limit);
    (rows.into_iter().map(|(_, r)| r).collect(), next)
}

/// Like `page`, with each record's index position (the usage export resumes from one).
pub fn entries(
    store: &dyn Store,
    consumer: Option<&str>,
    cursor: u64,
    limit: usize,
) -> (Vec<(u64, UsageRecord)>, Option<u64>) {
    let n = read_u64(store, INDEX_LEN);
    let mut out = Vec::new();
    let mut pos = cursor;
    let mut chunk_cache: Option<(usize, Vec<String>)> = None;
    while pos < n && out.len() < limit {
        let ci = pos as usize / INDEX_CHUNK;
        if chunk_cache.as_ref().map(|c| c.0) != Some(ci) {
            let ids = store
                .get(&index_chunk_name(ci))
                .0
                .filter(|b| !b.is_empty())
                .and_then(|b| bincode::deserialize(&b).ok())
                .unwrap_or_default();
            chunk_cache = Some((ci, ids));
        }
        let ids = &chunk_cache.as_ref().expect("set above").1;
        if let Some(lineage) = ids.get(pos as usize % INDEX_CHUNK).filter(|s| !s.is_empty()) {
            let rec: Option<UsageRecord> = store
                .get(&record_name(lineage))
                .0
                .filter(|b| !b.is_empty())
                .and_then(|b| bincode::deserialize(&b).ok());
            if let Some(r) = rec.filter(|r| consumer.is_none_or(|c| r.consumer == c)) {
                out.push((pos, r));
            }
        }
        pos += 1;
    }
    (out, (pos < n).then_some(pos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::MemStore;

    fn subj(l: &str, c: &str) -> Subject {
        Subject {
            lineage: l.into(),
            key_id: l.into(),
            consumer: c.into(),
            plan: "p".into(),
        }
    }

    #[test]
    fn record_and_add() {
        let mut c = Counters::default();
        c.record(Outcome::Admitted, 200, 10, 100, 3);
        c.record(Outcome::RateLimited, 429, 5, 50, 3);
        c.record(Outcome::Admitted, 503, 1, 1, 1);
        assert_eq!(c.requests, [2, 0, 0, 1, 0]);
        assert_eq!(c.responses, [0, 1, 0, 1, 1]);
        assert_eq!((c.request_bytes, c.response_bytes, c.cost_units), (16, 151, 4));
        let mut d = c;
        d.add(&c);
        assert_eq!(d.requests[0], 4);
        assert_eq!(c.to_json()["requests"]["rate_limited"], 1);
    }

    #[test]
    fn merge_accumulates_and_indexes_once() {
        let s = MemStore::default();
        let mut c = Counters::default();
        c.record(Outcome::Admitted, 200, 1, 2, 1);
        assert!(merge(&s, &subj("aaaaaaaaaaa1", "acme"), &c, 0).unwrap());
        assert!(!merge(&s, &subj("aaaaaaaaaaa1", "acme"), &c, 0).unwrap());
        merge(&s, &subj("aaaaaaaaaaa2", "zeta"), &c, 0).unwrap();
        let (all, next) = page(&s, None, 0, 10);
        assert_eq!(next, None);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].counters.requests[0], 2);
        let (acme, _) = page(&s, Some("acme"), 0, 10);
        assert_eq!(acme.len(), 1);
    }

    #[test]
    fn paging_across_chunks() {
        let s = MemStore::default();
        let c = Counters {
            request_bytes: 1,
            ..Default::default()
        };
        for i in 0..(INDEX_CHUNK + 10) {
            merge(&s, &subj(&format!("k{i:011}"), "c"), &c, 0).unwrap();
        }
        let mut cursor = 0;
        let mut seen = 0;
        loop {
            let (rows, next) = page(&s, None, cursor, 300);
            seen += rows.len();
            match next {
                Some(n) => cursor = n,
                None => break,
            }
        }
        assert_eq!(seen, INDEX_CHUNK + 10);
    }

    #[test]
    fn aggregator_drain_and_restore() {
        let mut a = Aggregator::default();
        a.counters("x", "x", "c", "p").record(Outcome::Forbidden, 403, 0, 0, 0);
        let rows = a.drain();
        assert!(a.is_empty());
        for (s, c) in rows {
            a.restore(s, c);
        }
        assert_eq!(a.drain()[0].1.requests[2], 1);
    }

    fn flush(agg: &mut Aggregator, s: &MemStore, now: u64) {
        agg.flush(s, now);
    }

    /// Issue 10.10: the index write fails after the record's counts were written. The
    /// counts must not be merged again (double count), and the lineage must still end
    /// up indexed (visible to /v1/usage and the export).
    #[test]
    fn a_failed_index_write_neither_double_counts_nor_hides_the_lineage() {
        let s = MemStore::default();
        let mut agg = Aggregator::default();
        agg.counters("aaaaaaaaaaa1", "aaaaaaaaaaa1", "acme", "p")
            .record(Outcome::Admitted, 200, 1, 1, 1);
        let fails = std::rc::Rc::new(std::cell::Cell::new(0));
        let f2 = fails.clone();
        *s.fail_set.borrow_mut() = Some(Box::new(move |key: &str| {
            (key.starts_with("km/uidx/") && f2.get() < 3).then(|| {
                f2.set(f2.get() + 1);
                StoreError::Host
            })
        }));
        flush(&mut agg, &s, 0);
        assert!(fails.get() > 0, "the index write was attempted and failed");
        *s.fail_set.borrow_mut() = None;
        for _ in 0..3 {
            flush(&mut agg, &s, 0);
        }
        let rec: UsageRecord = bincode::deserialize(&s.get("km/u/aaaaaaaaaaa1").0.unwrap()).unwrap();
        assert_eq!(rec.counters.requests[0], 1, "counted exactly once");
        let (rows, _) = page(&s, None, 0, 10);
        assert_eq!(rows.len(), 1, "indexed exactly once");
    }

    /// Issue 10.10: the chunk-write loop is bounded: a chunk that always loses its CAS
    /// race gives up (and is retried at the next flush) instead of spinning forever.
    #[test]
    fn the_index_chunk_write_is_bounded() {
        let s = std::rc::Rc::new(MemStore::default());
        let weak = std::rc::Rc::downgrade(&s);
        let writes = std::rc::Rc::new(std::cell::Cell::new(0u32));
        let w2 = writes.clone();
        *s.before_set.borrow_mut() = Some(Box::new(move |key: &str| {
            if key.starts_with("km/uidx/") && key != INDEX_LEN {
                w2.set(w2.get() + 1);
                assert!(w2.get() < 1000, "unbounded chunk-write loop");
                // a rival writes the chunk every time: our CAS always loses
                weak.upgrade()
                    .unwrap()
                    .map_set_raw(key, &bincode::serialize(&Vec::<String>::new()).unwrap());
            }
        }));
        let mut agg = Aggregator::default();
        agg.counters("aaaaaaaaaaa1", "aaaaaaaaaaa1", "acme", "p")
            .record(Outcome::Admitted, 200, 1, 1, 1);
        flush(&mut agg, &s, 0);
        *s.before_set.borrow_mut() = None;
        assert!(writes.get() > 0);
        flush(&mut agg, &s, 0);
        let rec: UsageRecord = bincode::deserialize(&s.get("km/u/aaaaaaaaaaa1").0.unwrap()).unwrap();
        assert_eq!(rec.counters.requests[0], 1);
    }
}
