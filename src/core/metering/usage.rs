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

use crate::core::store::{ensure_exists, Store, StoreError};
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

fn read_u64(store: &dyn Store, key: &str) -> (u64, u32) {
    let (v, cas) = store.get(key);
    (v.and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes), cas)
}

/// Adds `delta` to the lineage's shared record. Returns whether the record was new
/// (and so appended to the index).
pub fn merge(store: &dyn Store, subject: &Subject, delta: &Counters, now_ms: u64) -> Result<bool, StoreError> {
    let name = record_name(&subject.lineage);
    let mut created = false;
    for _ in 0..CAS_RETRIES {
        let (bytes, cas) = store.get(&name);
        if cas == 0 {
            // CAS is not checked on a missing key: create it safely, then compete by CAS.
            created |= ensure_exists(store, &name, &[], now_ms)?;
            continue;
        }
        let mut rec: UsageRecord = bytes
            .filter(|b| !b.is_empty())
            .and_then(|b| bincode::deserialize(&b).ok())
            .unwrap_or_default();
        rec.lineage.clone_from(&subject.lineage);
        rec.key_id.clone_from(&subject.key_id);
        rec.consumer.clone_from(&subject.consumer);
        rec.plan.clone_from(&subject.plan);
        rec.counters.add(delta);
        match store.set(&name, &bincode::serialize(&rec).expect("usage encodes"), Some(cas)) {
            Ok(()) => {
                if created {
                    append_index(store, &subject.lineage, now_ms)?;
                }
                return Ok(created);
            }
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
}

fn append_index(store: &dyn Store, lineage: &str, now_ms: u64) -> Result<(), StoreError> {
    for _ in 0..CAS_RETRIES {
        let (n, cas) = read_u64(store, INDEX_LEN);
        if cas == 0 {
            ensure_exists(store, INDEX_LEN, &0u64.to_le_bytes(), now_ms)?;
            continue;
        }
        // Claim slot n by bumping the count first; only the winner writes the slot.
        match store.set(INDEX_LEN, &(n + 1).to_le_bytes(), Some(cas)) {
            Ok(()) => {}
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
        let chunk = index_chunk_name(n as usize / INDEX_CHUNK);
        let slot = n as usize % INDEX_CHUNK;
        loop {
            if store.get(&chunk).1 == 0 {
                ensure_exists(store, &chunk, &[], now_ms)?;
            }
            let (v, ccas) = store.get(&chunk);
            let mut ids: Vec<String> = v
                .filter(|b| !b.is_empty())
                .and_then(|b| bincode::deserialize(&b).ok())
                .unwrap_or_default();
            if ids.len() <= slot {
                ids.resize(slot + 1, String::new());
            }
            ids[slot] = lineage.to_string();
            let bytes = bincode::serialize(&ids).expect("index encodes");
            match store.set(&chunk, &bytes, Some(ccas)) {
                Ok(()) => return Ok(()),
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
    }
    Err(StoreError::CasMismatch)
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
    let (n, _) = read_u64(store, INDEX_LEN);
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
}
