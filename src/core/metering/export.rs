//! The usage export: pushes usage deltas as CloudEvents 1.0 batches, host-independent.
//!
//! The export service (role `service` with `export`, one per Envoy process) asks this
//! module whether a batch is due and what to send, performs the POST itself, and reports
//! the answer here. Every call takes the current time, so the logic is tested with an
//! injected clock and a `MemStore`.
//!
//! Exactly-once towards a collector that deduplicates by event id:
//! - The usage records (`km/u/<lineage>`) are cumulative. The exporter keeps, per
//!   lineage, the cumulative counters the collector last acknowledged (`km/exp/a/<lineage>`,
//!   in shared data so the value survives the singleton's VM). An event carries
//!   `current - acked` of one lineage.
//! - A batch is frozen once built: retries resend the same bytes until a 2xx; only then
//!   `acked := the batch's "to" totals` (absolute, so applying it twice is harmless).
//!   New usage meanwhile stays in the cumulative records: nothing is buffered but the one
//!   frozen batch, and nothing can overflow or be lost while the collector is down.
//! - Event id = sha256(instance id, lineage, from totals, to totals): a resent event has
//!   the same id, and a different delta never does. A new Envoy process has a new
//!   instance id (its counters restart at zero).
//! - At most `max_events` lineages per batch; the next batch resumes the index scan
//!   after the last lineage included (round robin, so no lineage starves) and is due at
//!   once. After a failure the batch is retried after 1s, 2s, 4s, ... capped at the
//!   interval; a call the host never answers is given up after timeout + 5s.
//! - The frozen batch is also written to shared data (`km/exp/batch`) before it is
//!   sent, so a singleton VM that restarts between delivery and acknowledgement resends
//!   the very same events (same ids) instead of rebuilding them with new ids over the
//!   usage that arrived since (the collector would count that part twice).
//! - Unreachable collectors, 5xx, 408 and 429 are retried forever: nothing is dropped
//!   and the health shows the error until the collector is back. A batch the collector
//!   rejects with another 4xx `PARK_AFTER_REJECTIONS` times in a row will not get
//!   better by resending: it is parked (kept in `km/exp/parked`, counted in the health
//!   and the `keymeter_export_parked_events_total` metric, its totals marked handled)
//!   and the export moves on, instead of blocking forever.

use crate::core::config::ExportConfig;
use crate::core::metering::usage::{entries, Counters, UsageRecord};
use crate::core::remote::outbound::{
    answered, is_envoy_upstream_failure, snippet, ts, CallError, LinkHealth, Outbound,
};
pub use crate::core::remote::outbound::{State, LOST_CALL_GRACE_MS, MIN_BACKOFF_MS};
use crate::core::store::Store;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Shared-data key holding the export health (JSON of `Health`) for the admin status.
pub const HEALTH: &str = "km/export";
/// CloudEvents `type` of a usage event.
pub const EVENT_TYPE: &str = "keymeter.usage.v1";
/// Content type of a batch (CloudEvents batched JSON mode).
pub const CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// The frozen batch in flight (see `Batch`), so a restarted singleton resends it.
pub const BATCH: &str = "km/exp/batch";
/// The last batch parked after persistent rejections, kept for inspection.
pub const PARKED: &str = "km/exp/parked";
/// Consecutive 4xx answers (other than 408 and 429) after which a batch is parked.
pub const PARK_AFTER_REJECTIONS: u32 = 5;
/// Index positions read per shared-data page while building a batch.
const SCAN_PAGE: usize = 256;

fn acked_name(lineage: &str) -> String {
    format!("km/exp/a/{lineage}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The call could not be made (unknown cluster, host refused it).
    Dispatch,
    /// No response: timeout, connection failure, reset.
    Unreachable,
    /// A non-2xx answer of the collector.
    Http,
    /// Shared data could not be written (the acknowledged totals); retried before the
    /// next batch is built, so a lost write cannot cause a double count.
    Store,
}

/// `{kind, message, at}` of a failed attempt.
pub type ExportError = CallError<ErrorKind>;

/// What the admin status shows under `export` (stored in `km/export`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Cluster, URL, state of the last attempt, failures and the last error.
    #[serde(flatten)]
    pub link: LinkHealth<ErrorKind>,
    pub max_events: usize,
    pub last_attempt_at: Option<String>,
    pub next_attempt_at: Option<String>,
    /// Events and batches acknowledged by the collector.
    pub events_sent: u64,
    pub batches_sent: u64,
    /// Resends of a frozen batch after a failure.
    pub retries: u64,
    /// Events of the frozen batch not acknowledged yet (0: none waiting).
    pub pending_events: usize,
    /// Batches that were full (`max_events`): the remaining lineages went in the next one.
    pub full_batches: u64,
    /// Failed writes of acknowledged totals (each retried; see `ErrorKind::Store`).
    pub store_errors: u64,
    /// Batches (and their events) parked after `PARK_AFTER_REJECTIONS` 4xx answers:
    /// their usage is not sent; the last one is kept in `km/exp/parked`.
    pub parked_batches: u64,
    pub parked_events: u64,
    pub last_parked_at: Option<String>,
}

/// One frozen batch: the exact bytes to (re)send and what to acknowledge on success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub body: Vec<u8>,
    pub ids: Vec<String>,
    /// lineage -> cumulative totals this batch brings the collector to.
    to: Vec<(String, Counters)>,
    /// Index position the next batch starts its scan at.
    resume: u64,
    full: bool,
}

/// What the caller must do with an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Acknowledged: this many events were delivered.
    Acked(usize),
    Failed,
    /// Rejected once too often: this many events were parked, not delivered.
    Parked(usize),
    /// Not the call in flight.
    Ignored,
}

pub struct Exporter {
    interval_ms: u64,
    max_events: usize,
    call: Outbound,
    cursor: u64,
    batch: Option<Batch>,
    /// Acknowledged totals not yet written to shared data.
    commit: Vec<(String, Counters)>,
    /// `km/exp/batch` still holds a batch that was acknowledged (or parked).
    clear_batch: bool,
    /// Consecutive rejections (4xx but 408/429) of the current batch.
    rejections: u32,
    pub health: Health,
}

fn sub(a: &Counters, b: &Counters) -> Counters {
    let mut d = Counters::default();
    for i in 0..5 {
        d.requests[i] = a.requests[i].saturating_sub(b.requests[i]);
        d.responses[i] = a.responses[i].saturating_sub(b.responses[i]);
    }
    d.request_bytes = a.request_bytes.saturating_sub(b.request_bytes);
    d.response_bytes = a.response_bytes.saturating_sub(b.response_bytes);
    d.cost_units = a.cost_units.saturating_sub(b.cost_units);
    d
}

fn counters_bytes(c: &Counters) -> Vec<u8> {
    bincode::serialize(c).expect("counters encode")
}

/// The deterministic event id: same instance, lineage and totals -> same id.
pub fn event_id(instance_id: &str, lineage: &str, from: &Counters, to: &Counters) -> String {
    let mut h = Sha256::new();
    for part in [instance_id.as_bytes(), b"\0", lineage.as_bytes(), b"\0"] {
        h.update(part);
    }
    h.update(counters_bytes(from));
    h.update(counters_bytes(to));
    hex::encode(&h.finalize()[..16])
}

/// Reads the acknowledged totals of a lineage (zero if never acknowledged).
pub fn acked(store: &dyn Store, lineage: &str) -> Counters {
    store
        .get(&acked_name(lineage))
        .0
        .filter(|b| !b.is_empty())
        .and_then(|b| bincode::deserialize(&b).ok())
        .unwrap_or_default()
}

/// The batch recorded in `km/exp/batch`, unless it was already acknowledged (the
/// acknowledged totals are written before the record is cleared).
fn adopt(store: &dyn Store) -> Option<Batch> {
    let b: Batch = store
        .get(BATCH)
        .0
        .filter(|v| !v.is_empty())
        .and_then(|v| bincode::deserialize(&v).ok())?;
    if b.to.iter().all(|(lineage, c)| acked(store, lineage) == *c) {
        let _ = store.set(BATCH, &[], None);
        return None;
    }
    Some(b)
}

fn event(instance_id: &str, now_ms: u64, rec: &UsageRecord, from: &Counters) -> (String, serde_json::Value) {
    let id = event_id(instance_id, &rec.lineage, from, &rec.counters);
    let mut data = sub(&rec.counters, from).to_json();
    let obj = data.as_object_mut().expect("counters are an object");
    obj.insert("lineage".into(), rec.lineage.clone().into());
    obj.insert("key_id".into(), rec.key_id.clone().into());
    obj.insert("plan".into(), rec.plan.clone().into());
    // api-key, jwt or anonymous (derived from the lineage, see core::metering::credential).
    obj.insert(
        "credential".into(),
        crate::core::metering::credential::of_lineage(&rec.lineage).into(),
    );
    let mut ev = serde_json::json!({
        "specversion": "1.0",
        "id": id,
        "source": format!("keymeter/{instance_id}"),
        "type": EVENT_TYPE,
        "time": ts(now_ms),
        "datacontenttype": "application/json",
        "data": data,
    });
    // CloudEvents: `subject`, when present, must be non-empty.
    if !rec.consumer.is_empty() {
        ev["subject"] = rec.consumer.clone().into();
    }
    (id, ev)
}

impl Exporter {
    pub fn new(c: &ExportConfig) -> Self {
        Exporter {
            interval_ms: c.interval_ms,
            max_events: c.max_events,
            call: Outbound::new(c.interval_ms, c.timeout_ms),
            cursor: 0,
            batch: None,
            commit: Vec::new(),
            clear_batch: false,
            rejections: 0,
            health: Health {
                link: LinkHealth::new(&c.cluster, &c.authority, &c.path, c.interval_ms),
                max_events: c.max_events,
                ..Health::default()
            },
        }
    }

    /// Whether an attempt should start now. Gives up a call in flight for too long.
    pub fn due(&mut self, now_ms: u64) -> bool {
        if self.call.give_up_lost(now_ms) {
            self.fail(
                now_ms,
                ErrorKind::Unreachable,
                "no answer from the collector (call lost)".into(),
            );
        }
        self.call.due(now_ms)
    }

    pub fn owns(&self, token: u32) -> bool {
        self.call.owns(token)
    }

    pub fn in_flight(&self) -> bool {
        self.call.in_flight()
    }

    /// Starts an attempt: the body to POST, or `None` (nothing new to send, or the
    /// acknowledged totals of the previous batch could not be written yet).
    pub fn begin(&mut self, now_ms: u64, store: &dyn Store, instance_id: &str) -> Option<Vec<u8>> {
        if !self.flush_commit(store) {
            self.health.store_errors += 1;
            self.fail(
                now_ms,
                ErrorKind::Store,
                "cannot write the acknowledged usage totals to shared data".into(),
            );
            return None;
        }
        if self.batch.is_some() {
            self.health.retries += 1;
        } else if let Some(b) = adopt(store) {
            // A batch a previous VM of this singleton froze (and maybe delivered).
            self.health.retries += 1;
            self.batch = Some(b);
        } else {
            match self.build(now_ms, store, instance_id) {
                Some(b) => {
                    let bytes = bincode::serialize(&b).expect("batch encodes");
                    if store.set(BATCH, &bytes, None).is_err() {
                        // Not sent unless recorded: a restart would rebuild it with new ids.
                        self.health.store_errors += 1;
                        self.fail(
                            now_ms,
                            ErrorKind::Store,
                            "cannot record the batch in shared data".into(),
                        );
                        return None;
                    }
                    self.batch = Some(b)
                }
                None => {
                    // Nothing new: the collector is not called; try again next interval.
                    let next = self.call.set_next(now_ms + self.interval_ms);
                    self.health.next_attempt_at = Some(ts(next));
                    return None;
                }
            }
        }
        let b = self.batch.as_ref().expect("set above");
        self.health.pending_events = b.ids.len();
        self.health.last_attempt_at = Some(ts(now_ms));
        self.call.begin(now_ms);
        Some(b.body.clone())
    }

    fn build(&mut self, now_ms: u64, store: &dyn Store, instance_id: &str) -> Option<Batch> {
        let mut events = Vec::new();
        let mut ids = Vec::new();
        let mut to = Vec::new();
        entries(store, None, 0, 0).1?; // empty index: nothing to scan
        let start = self.cursor;
        let mut resume = start;
        let mut full = false;
        // Scan [start, end) then [0, start): every lineage once, starting after the
        // last one the previous full batch included.
        'scan: for (mut pos, stop) in [(start, None), (0, Some(start))] {
            loop {
                let (rows, next) = entries(store, None, pos, SCAN_PAGE);
                for (p, rec) in rows {
                    if stop.is_some_and(|s| p >= s) {
                        break 'scan;
                    }
                    let from = acked(store, &rec.lineage);
                    if sub(&rec.counters, &from).is_zero() {
                        continue;
                    }
                    let (id, ev) = event(instance_id, now_ms, &rec, &from);
                    ids.push(id);
                    events.push(ev);
                    to.push((rec.lineage.clone(), rec.counters));
                    if events.len() >= self.max_events {
                        resume = p + 1;
                        full = true;
                        break 'scan;
                    }
                }
                match next {
                    Some(n) if stop.is_none_or(|s| n < s) => pos = n,
                    _ => break,
                }
            }
        }
        if events.is_empty() {
            return None;
        }
        Some(Batch {
            body: serde_json::to_vec(&events).expect("events encode"),
            ids,
            to,
            resume,
            full,
        })
    }

    pub fn dispatched(&mut self, token: u32) {
        self.call.dispatched(token);
    }

    pub fn dispatch_failed(&mut self, now_ms: u64, message: String) {
        self.call.end();
        self.fail(now_ms, ErrorKind::Dispatch, message);
    }

    /// Interprets the collector's answer to call `token` (`status` `None`: no response).
    pub fn on_response(
        &mut self,
        now_ms: u64,
        store: &dyn Store,
        token: u32,
        status: Option<u32>,
        body: &[u8],
    ) -> Decision {
        if !self.owns(token) {
            return Decision::Ignored;
        }
        self.call.end();
        match status {
            Some(s) if (200..300).contains(&s) => {
                let (n, full) = self.retire_batch(store);
                self.health.events_sent += n as u64;
                self.health.batches_sent += 1;
                if full {
                    self.health.full_batches += 1;
                }
                self.health.link.succeeded(now_ms);
                // A full batch left lineages behind: continue at once.
                let next = self
                    .call
                    .set_next(if full { now_ms } else { now_ms + self.interval_ms });
                self.health.next_attempt_at = Some(ts(next));
                Decision::Acked(n)
            }
            None => {
                self.rejections = 0;
                self.fail(
                    now_ms,
                    ErrorKind::Unreachable,
                    "no response from the collector (timeout or connection failure)".into(),
                );
                Decision::Failed
            }
            Some(s) => {
                let text = snippet(body);
                let kind = if is_envoy_upstream_failure(s, &text) {
                    ErrorKind::Unreachable
                } else {
                    ErrorKind::Http
                };
                let rejected = kind == ErrorKind::Http && (400..500).contains(&s) && s != 408 && s != 429;
                self.rejections = if rejected { self.rejections + 1 } else { 0 };
                if self.rejections >= PARK_AFTER_REJECTIONS {
                    return self.park(now_ms, store, answered("collector", s, &text));
                }
                self.fail(now_ms, kind, answered("collector", s, &text));
                Decision::Failed
            }
        }
    }

    /// Sets the current batch aside after persistent rejections: kept in `km/exp/parked`
    /// for an operator, its totals marked handled so newer usage flows again.
    fn park(&mut self, now_ms: u64, store: &dyn Store, why: String) -> Decision {
        let b = self.batch.as_ref().expect("a call in flight has a batch");
        if store.set(PARKED, &b.body, None).is_err() {
            self.health.store_errors += 1;
        }
        log::warn!(
            "keymeter export: parking a batch of {} events rejected {} times: {why}",
            b.ids.len(),
            self.rejections
        );
        let (n, _) = self.retire_batch(store);
        self.health.parked_batches += 1;
        self.health.parked_events += n as u64;
        self.health.last_parked_at = Some(ts(now_ms));
        // Shown as a failure, but the next batch goes out at once: no back-off.
        self.health.link.failed_without_backoff(
            now_ms,
            ErrorKind::Http,
            format!("{why} ({} times): batch of {n} events parked", PARK_AFTER_REJECTIONS),
        );
        let next = self.call.set_next(now_ms);
        self.health.next_attempt_at = Some(ts(next));
        Decision::Parked(n)
    }

    /// Done with the batch in flight (acknowledged or parked): its totals become the
    /// acknowledged ones and the scan moves past it. Returns its events and whether it
    /// was full.
    fn retire_batch(&mut self, store: &dyn Store) -> (usize, bool) {
        let b = self.batch.take().expect("a call in flight has a batch");
        self.rejections = 0;
        self.commit = b.to;
        self.clear_batch = true;
        if !self.flush_commit(store) {
            // Retried by the next `begin` before anything new is built.
            self.health.store_errors += 1;
        }
        self.cursor = if b.full { b.resume } else { 0 };
        self.health.pending_events = 0;
        (b.ids.len(), b.full)
    }

    /// Writes pending acknowledged totals, then forgets the recorded batch; true when
    /// nothing is left to write.
    fn flush_commit(&mut self, store: &dyn Store) -> bool {
        self.commit
            .retain(|(lineage, c)| store.set(&acked_name(lineage), &counters_bytes(c), None).is_err());
        if self.commit.is_empty() && self.clear_batch && store.set(BATCH, &[], None).is_ok() {
            self.clear_batch = false;
        }
        self.commit.is_empty() && !self.clear_batch
    }

    /// Delay before the next attempt after `failures` consecutive failures.
    pub fn delay_ms(&self, failures: u32) -> u64 {
        self.call.delay_ms(failures)
    }

    pub fn next_ms(&self) -> u64 {
        self.call.next_ms()
    }

    fn fail(&mut self, now_ms: u64, kind: ErrorKind, message: String) {
        self.health.link.failed(now_ms, kind, message);
        let next = self.call.schedule(now_ms, self.health.link.consecutive_failures);
        self.health.next_attempt_at = Some(ts(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::metering::usage::{merge, Outcome, Subject};
    use crate::core::store::{MemStore, StoreError};
    use std::collections::{HashMap, HashSet};

    const T0: u64 = 1_700_000_000_000;
    const INST: &str = "00112233aabbccdd";

    fn conf(max_events: usize) -> ExportConfig {
        ExportConfig {
            cluster: "usage_collector".into(),
            path: "/api/v1/events".into(),
            authority: "collector.internal".into(),
            interval_ms: 10_000,
            timeout_ms: 2_000,
            max_events,
            headers: vec![],
        }
    }

    fn traffic(s: &MemStore, lineage: &str, consumer: &str, admitted: u64, limited: u64) {
        let mut c = Counters::default();
        for _ in 0..admitted {
            c.record(Outcome::Admitted, 200, 10, 100, 2);
        }
        for _ in 0..limited {
            c.record(Outcome::RateLimited, 429, 10, 50, 2);
        }
        let subj = Subject {
            lineage: lineage.into(),
            key_id: lineage.into(),
            consumer: consumer.into(),
            plan: "pro".into(),
        };
        merge(s, &subj, &c, 0).unwrap();
    }

    /// A collector that deduplicates by id and sums admitted requests per lineage.
    #[derive(Default)]
    struct Collector {
        seen: HashSet<String>,
        admitted: HashMap<String, u64>,
        limited: HashMap<String, u64>,
    }

    impl Collector {
        fn take(&mut self, body: &[u8]) -> Vec<serde_json::Value> {
            let evs: Vec<serde_json::Value> = serde_json::from_slice(body).unwrap();
            for e in &evs {
                assert_eq!(e["specversion"], "1.0");
                assert_eq!(e["type"], EVENT_TYPE);
                assert_eq!(e["source"], format!("keymeter/{INST}"));
                assert_eq!(e["datacontenttype"], "application/json");
                assert!(e["time"].as_str().unwrap().ends_with('Z'));
                if self.seen.insert(e["id"].as_str().unwrap().to_string()) {
                    let l = e["data"]["lineage"].as_str().unwrap().to_string();
                    *self.admitted.entry(l.clone()).or_default() += e["data"]["requests"]["admitted"].as_u64().unwrap();
                    *self.limited.entry(l).or_default() += e["data"]["requests"]["rate_limited"].as_u64().unwrap();
                }
            }
            evs
        }
    }

    /// Drives one attempt: begin, dispatch, answer `status`; returns the body sent.
    fn attempt(
        x: &mut Exporter,
        s: &MemStore,
        now: u64,
        token: u32,
        status: Option<u32>,
    ) -> Option<(Vec<u8>, Decision)> {
        assert!(x.due(now));
        let body = x.begin(now, s, INST)?;
        x.dispatched(token);
        let d = x.on_response(now, s, token, status, b"oops");
        Some((body, d))
    }

    #[test]
    fn deltas_are_exact_and_retries_resend_the_same_bytes() {
        let s = MemStore::default();
        let mut x = Exporter::new(&conf(500));
        let mut col = Collector::default();
        assert!(attempt(&mut x, &s, T0, 1, Some(200)).is_none(), "nothing to send yet");
        assert_eq!(x.next_ms(), T0 + 10_000);
        traffic(&s, "aaaaaaaaaaa1", "acme", 3, 1);
        traffic(&s, "aaaaaaaaaaa2", "zeta", 2, 0);
        let mut now = T0 + 10_000;
        let (b1, d) = attempt(&mut x, &s, now, 2, Some(500)).unwrap();
        assert_eq!(d, Decision::Failed);
        col.take(&b1); // the collector saw it but failed: a resend must not double count
        assert_eq!(x.health.link.consecutive_failures, 1);
        assert_eq!(x.next_ms(), now + 1_000);
        // more traffic while the batch is frozen: not in the retried batch
        traffic(&s, "aaaaaaaaaaa1", "acme", 4, 0);
        now += 1_000;
        let (b2, d) = attempt(&mut x, &s, now, 3, None).unwrap();
        assert_eq!((d, &b2), (Decision::Failed, &b1));
        assert_eq!(x.next_ms(), now + 2_000);
        now += 2_000;
        let (b3, d) = attempt(&mut x, &s, now, 4, Some(202)).unwrap();
        assert_eq!((d, &b3), (Decision::Acked(2), &b1));
        let evs = col.take(&b3);
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0]["subject"], "acme");
        assert_eq!(evs[0]["data"]["key_id"], "aaaaaaaaaaa1");
        assert_eq!(evs[0]["data"]["plan"], "pro");
        assert_eq!(evs[0]["data"]["cost_units"], 6);
        assert_eq!(x.health.retries, 2);
        assert_eq!(x.health.link.state, State::Ok);
        assert_eq!((x.health.events_sent, x.health.batches_sent), (2, 1));
        assert_eq!(col.admitted["aaaaaaaaaaa1"], 3);
        now += 10_000;
        let (b4, d) = attempt(&mut x, &s, now, 5, Some(200)).unwrap();
        assert_eq!(d, Decision::Acked(1));
        let evs = col.take(&b4);
        assert_eq!(evs[0]["data"]["requests"]["admitted"], 4);
        assert_eq!(col.admitted["aaaaaaaaaaa1"], 7);
        assert_eq!((col.admitted["aaaaaaaaaaa2"], col.limited["aaaaaaaaaaa1"]), (2, 1));
        // up to date: nothing to send
        now += 10_000;
        assert!(attempt(&mut x, &s, now, 6, Some(200)).is_none());
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = Counters::default();
        let mut b = a;
        b.record(Outcome::Admitted, 200, 1, 1, 1);
        assert_eq!(event_id(INST, "l", &a, &b), event_id(INST, "l", &a, &b));
        assert_ne!(event_id(INST, "l", &a, &b), event_id("other", "l", &a, &b));
        assert_ne!(event_id(INST, "l", &a, &b), event_id(INST, "m", &a, &b));
        assert_ne!(event_id(INST, "l", &a, &b), event_id(INST, "l", &b, &b));
        assert_eq!(event_id(INST, "l", &a, &b).len(), 32);
    }

    #[test]
    fn full_batches_continue_at_once_round_robin() {
        let s = MemStore::default();
        let mut x = Exporter::new(&conf(2));
        let mut col = Collector::default();
        for i in 0..5 {
            traffic(&s, &format!("k{i:011}"), "c", i + 1, 0);
        }
        let mut now = T0;
        let mut sizes = vec![];
        while let Some((b, d)) = attempt(&mut x, &s, now, 1, Some(200)) {
            assert!(matches!(d, Decision::Acked(_)));
            sizes.push(col.take(&b).len());
            if sizes.len() == 1 {
                // the lineage just exported gets new traffic: it must not starve the others
                traffic(&s, "k00000000000", "c", 10, 0);
            }
            now = x.next_ms();
        }
        assert_eq!(sizes, [2, 2, 2]);
        assert_eq!(x.health.full_batches, 3);
        for i in 0..5u64 {
            let extra = if i == 0 { 10 } else { 0 };
            assert_eq!(col.admitted[&format!("k{i:011}")], i + 1 + extra);
        }
    }

    #[test]
    fn backoff_caps_at_interval_and_lost_calls_fail() {
        let s = MemStore::default();
        let mut x = Exporter::new(&conf(10));
        traffic(&s, "aaaaaaaaaaa1", "acme", 1, 0);
        assert_eq!(
            [1, 2, 3, 4, 5, 6].map(|f| x.delay_ms(f)),
            [1_000, 2_000, 4_000, 8_000, 10_000, 10_000]
        );
        assert!(x.due(T0));
        assert!(x.begin(T0, &s, INST).is_some());
        x.dispatched(7);
        assert!(!x.due(T0 + 6_999));
        assert!(!x.due(T0 + 7_000), "given up, retried after backoff");
        assert_eq!(x.health.link.last_error.as_ref().unwrap().kind, ErrorKind::Unreachable);
        assert_eq!(x.on_response(T0 + 7_000, &s, 7, Some(200), b""), Decision::Ignored);
        assert!(x.due(T0 + 8_000));
        x.dispatch_failed(T0 + 8_000, "no cluster".into());
        assert_eq!(x.health.link.consecutive_failures, 2);
        let e = x.on_response(T0, &s, 99, Some(200), b"");
        assert_eq!(e, Decision::Ignored);
    }

    #[test]
    fn envoy_upstream_failures_are_unreachable() {
        let s = MemStore::default();
        let mut x = Exporter::new(&conf(10));
        traffic(&s, "aaaaaaaaaaa1", "acme", 1, 0);
        x.begin(T0, &s, INST).unwrap();
        x.dispatched(1);
        x.on_response(T0, &s, 1, Some(503), b"no healthy upstream");
        assert_eq!(x.health.link.last_error.as_ref().unwrap().kind, ErrorKind::Unreachable);
        x.begin(T0 + 1_000, &s, INST).unwrap();
        x.dispatched(2);
        x.on_response(T0 + 1_000, &s, 2, Some(400), b"bad\nevent");
        let e = x.health.link.last_error.clone().unwrap();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::Http, "collector answered HTTP 400: bad event")
        );
    }

    #[test]
    fn a_failed_ack_write_blocks_the_next_batch_until_written() {
        let s = MemStore::default();
        let mut x = Exporter::new(&conf(10));
        let mut col = Collector::default();
        traffic(&s, "aaaaaaaaaaa1", "acme", 2, 0);
        let fail = std::rc::Rc::new(std::cell::Cell::new(true));
        let f = fail.clone();
        // the hook cannot fail a set by itself: emulate by failing through a wrapper
        struct Flaky<'a>(&'a MemStore, std::rc::Rc<std::cell::Cell<bool>>);
        impl Store for Flaky<'_> {
            fn get(&self, k: &str) -> (Option<Vec<u8>>, u32) {
                self.0.get(k)
            }
            fn set(&self, k: &str, v: &[u8], c: Option<u32>) -> Result<(), StoreError> {
                if self.1.get() && k.starts_with("km/exp/a/") {
                    return Err(StoreError::Host);
                }
                self.0.set(k, v, c)
            }
        }
        let st = Flaky(&s, f);
        let body = x.begin(T0, &st, INST).unwrap();
        x.dispatched(1);
        assert_eq!(x.on_response(T0, &st, 1, Some(200), b""), Decision::Acked(1));
        col.take(&body);
        assert_eq!(x.health.store_errors, 1);
        traffic(&s, "aaaaaaaaaaa1", "acme", 1, 0);
        assert!(
            x.begin(T0 + 10_000, &st, INST).is_none(),
            "no batch on stale acked totals"
        );
        assert_eq!(x.health.link.last_error.as_ref().unwrap().kind, ErrorKind::Store);
        fail.set(false);
        let body = x.begin(T0 + 11_000, &st, INST).unwrap();
        x.dispatched(2);
        x.on_response(T0 + 11_000, &st, 2, Some(200), b"");
        col.take(&body);
        assert_eq!(col.admitted["aaaaaaaaaaa1"], 3);
    }

    /// Issue 10.16: the singleton restarts (its VM, hence the exporter, is replaced)
    /// after the collector received a batch but before the ack was processed. The new
    /// exporter must resend the same events (same ids), so the collector's dedup holds.
    #[test]
    fn a_restart_between_delivery_and_ack_resends_the_same_event_ids() {
        let s = MemStore::default();
        let mut col = Collector::default();
        traffic(&s, "aaaaaaaaaaa1", "acme", 3, 0);
        let mut x = Exporter::new(&conf(10));
        assert!(x.due(T0));
        let b1 = x.begin(T0, &s, INST).unwrap();
        x.dispatched(1);
        col.take(&b1); // delivered; the answer never reaches this VM
        drop(x);
        traffic(&s, "aaaaaaaaaaa1", "acme", 2, 0);
        let mut y = Exporter::new(&conf(10));
        let (b2, d) = attempt(&mut y, &s, T0 + 5_000, 7, Some(200)).unwrap();
        assert_eq!(d, Decision::Acked(1));
        col.take(&b2);
        let next = y.next_ms();
        if let Some((b3, _)) = attempt(&mut y, &s, next, 8, Some(200)) {
            col.take(&b3);
        }
        assert_eq!(col.admitted["aaaaaaaaaaa1"], 5, "collector total equals real usage");
    }

    /// Issue 10.16: a collector that keeps rejecting a batch with a 4xx (a malformed or
    /// refused batch will not get better by resending) must not block the export
    /// forever: after `PARK_AFTER_REJECTIONS` answers the batch is parked, counted in
    /// the health, and newer usage flows again. 5xx, 408 and 429 are retried forever.
    #[test]
    fn a_persistent_4xx_parks_the_batch_and_the_export_moves_on() {
        let s = MemStore::default();
        let mut col = Collector::default();
        let mut x = Exporter::new(&conf(10));
        traffic(&s, "aaaaaaaaaaa1", "acme", 3, 0);
        let mut now = T0;
        // 429 and 5xx never park
        for status in [429, 503, 408, 500, 429, 503] {
            let (_, d) = attempt(&mut x, &s, now, 1, Some(status)).unwrap();
            assert_eq!(d, Decision::Failed);
            now = x.next_ms();
        }
        let mut parked = None;
        for i in 0..10 {
            let (b, d) = attempt(&mut x, &s, now, 2, Some(422)).unwrap();
            now = x.next_ms();
            if d != Decision::Failed {
                parked = Some((i, b, d));
                break;
            }
        }
        let (i, b, d) = parked.expect("a batch rejected 10 times was never parked");
        assert_eq!(i + 1, PARK_AFTER_REJECTIONS as usize);
        assert_eq!(d, Decision::Parked(1));
        assert_eq!((x.health.parked_batches, x.health.parked_events), (1, 1));
        assert_eq!(s.get(PARKED).0.unwrap(), b, "the parked batch is kept for inspection");
        traffic(&s, "aaaaaaaaaaa1", "acme", 2, 0);
        let (b2, d) = attempt(&mut x, &s, now, 3, Some(200)).unwrap();
        assert_eq!(d, Decision::Acked(1));
        col.take(&b2);
        assert_eq!(col.admitted["aaaaaaaaaaa1"], 2, "only usage after the parked batch");
        assert_eq!(x.health.link.state, State::Ok);
    }

    /// A recorded batch whose ack was processed (acked totals written) but whose record
    /// could not be cleared is not resent after a restart: resending it would move the
    /// acknowledged totals back and make the next batch count that usage twice.
    #[test]
    fn an_already_acknowledged_recorded_batch_is_not_adopted() {
        let s = MemStore::default();
        let mut col = Collector::default();
        traffic(&s, "aaaaaaaaaaa1", "acme", 3, 0);
        let mut x = Exporter::new(&conf(10));
        let (b1, _) = attempt(&mut x, &s, T0, 1, Some(200)).unwrap();
        col.take(&b1);
        let stale = s.get(BATCH).0.unwrap();
        assert!(stale.is_empty(), "cleared after the ack");
        // as if the clear had failed: the acknowledged batch is still recorded
        let b = Batch {
            body: b1.clone(),
            ids: vec![],
            to: vec![("aaaaaaaaaaa1".into(), acked(&s, "aaaaaaaaaaa1"))],
            resume: 0,
            full: false,
        };
        s.set(BATCH, &bincode::serialize(&b).unwrap(), None).unwrap();
        traffic(&s, "aaaaaaaaaaa1", "acme", 2, 0);
        let mut z = Exporter::new(&conf(10));
        let (b2, _) = attempt(&mut z, &s, T0 + 20_000, 2, Some(200)).unwrap();
        assert_ne!(b2, b1, "the acknowledged batch was not resent");
        col.take(&b2);
        assert_eq!(col.admitted["aaaaaaaaaaa1"], 5);
    }
}
