//! Per-worker usage aggregation and its flush into shared data and Envoy metrics.
//!
//! Requests only touch this worker's `Meter` (no host call, no lock). A timer flushes
//! it: usage records in shared data (CAS-merged, see `core::usage`) and Envoy counters.
//! Metrics are defined at flush time, never per request, and per-key series are capped
//! process-wide through a shared counter.

use super::host::HostStore;
use crate::core::cas::{add_u64_capped, Create};
use crate::core::config::Metering;
use crate::core::metering::label_cache::LabelCache;
use crate::core::metering::usage::{Aggregator, Counters, Outcome, Subject, STATUS_CLASSES};
use crate::core::request::Unauthenticated;
use crate::core::store::Store;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::collections::HashMap;

const SERIES_COUNT: &str = "km/mseries";
/// Cached "no own series" decisions per worker before they are dropped (re-read from
/// the lineage's marker when needed again).
const UNLABELLED_CACHE: usize = 4096;

/// Borrowed identity of a counted request.
pub struct Who<'a> {
    pub lineage: &'a str,
    pub key_id: &'a str,
    pub consumer: &'a str,
    pub plan: &'a str,
}

pub struct Meter {
    config: Metering,
    agg: Aggregator,
    unauthenticated: [u64; Unauthenticated::ALL.len()],
    contention: u64,
    metric_ids: HashMap<String, u32>,
    /// lineage -> whether it has its own labelled series (decided once per worker).
    labelled: LabelCache,
}

impl Meter {
    pub fn new(config: Metering) -> Self {
        Meter {
            config,
            agg: Aggregator::default(),
            unauthenticated: [0; Unauthenticated::ALL.len()],
            contention: 0,
            metric_ids: HashMap::new(),
            labelled: LabelCache::new(UNLABELLED_CACHE),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Counts one finished request of an authentic key (or the anonymous plan).
    pub fn record(&mut self, who: &Who<'_>, outcome: Outcome, status: u32, req: u64, resp: u64, cost: u64) {
        self.agg
            .counters(who.lineage, who.key_id, who.consumer, who.plan)
            .record(outcome, status, req, resp, cost);
    }

    pub fn unauthenticated(&mut self, why: Unauthenticated) {
        let i = Unauthenticated::ALL.iter().position(|u| *u == why).unwrap_or(0);
        self.unauthenticated[i] += 1;
    }

    /// Counts a contended request; true for the first one since the last flush, so the
    /// caller logs once per interval instead of once per request.
    pub fn contention(&mut self) -> bool {
        self.contention += 1;
        self.contention == 1
    }

    fn counter(&mut self, name: String, delta: u64) {
        if delta == 0 {
            return;
        }
        let id = match self.metric_ids.get(&name) {
            Some(id) => *id,
            None => match hostcalls::define_metric(MetricType::Counter, &name) {
                Ok(id) => {
                    self.metric_ids.insert(name, id);
                    id
                }
                Err(_) => return,
            },
        };
        let _ = hostcalls::increment_metric(id, delta as i64);
    }

    /// Whether `lineage` gets per-key series: the first `max_key_series` lineages of
    /// the process do (claimed through a shared CAS counter and a per-lineage marker).
    fn is_labelled(&mut self, store: &HostStore, lineage: &str) -> bool {
        if let Some(b) = self.labelled.get(lineage) {
            return b;
        }
        let marker = format!("km/ms/{lineage}");
        let decided = match store.get(&marker).0.as_deref() {
            Some([1]) => true,
            Some([0]) => false,
            _ => {
                // Another worker may decide for the same lineage at the same time: the
                // marker it creates first is the decision everyone uses.
                let won = claim_series(store, self.config.max_key_series);
                match crate::core::store::ensure_exists(store, &marker, &[won as u8], super::host::now_ms()) {
                    Ok(true) => won,
                    _ => store.get(&marker).0.as_deref() == Some(&[1]),
                }
            }
        };
        self.labelled.insert(lineage, decided);
        decided
    }

    /// Moves this worker's counts into shared data and Envoy counters. Rows whose
    /// shared-data merge fails stay in the aggregator for the next flush.
    pub fn flush(&mut self) {
        let store = HostStore;
        for (subject, c) in self.agg.flush(&store, super::host::now_ms()) {
            self.metrics_for(&store, &subject, &c);
        }
        for (i, why) in Unauthenticated::ALL.iter().enumerate() {
            let n = std::mem::take(&mut self.unauthenticated[i]);
            self.counter(format!("keymeter_unauthenticated_total.reason.{}", why.label()), n);
        }
        let n = std::mem::take(&mut self.contention);
        self.counter("keymeter_limit_contention_total".into(), n);
    }

    fn metrics_for(&mut self, store: &HostStore, s: &Subject, c: &Counters) {
        let plan = &s.plan;
        for (o, n) in Outcome::ALL.iter().zip(c.requests) {
            self.counter(
                format!("keymeter_plan_requests_total.plan.{plan}.outcome.{}", o.label()),
                n,
            );
        }
        self.counter(format!("keymeter_plan_cost_units_total.plan.{plan}"), c.cost_units);
        if !self.is_labelled(store, &s.lineage) {
            return;
        }
        // Positional: the harness's stats_tags walk consumer, plan, key_id, credential.
        let labels = format!(
            "consumer.{}.plan.{plan}.key_id.{}.credential.{}",
            s.consumer,
            s.lineage,
            crate::core::metering::credential::of_lineage(&s.lineage)
        );
        for (o, n) in Outcome::ALL.iter().zip(c.requests) {
            self.counter(format!("keymeter_requests_total.{labels}.outcome.{}", o.label()), n);
        }
        for (class, n) in STATUS_CLASSES.iter().zip(c.responses) {
            self.counter(format!("keymeter_responses_total.{labels}.status_class.{class}"), n);
        }
        self.counter(format!("keymeter_request_bytes_total.{labels}"), c.request_bytes);
        self.counter(format!("keymeter_response_bytes_total.{labels}"), c.response_bytes);
        self.counter(format!("keymeter_cost_units_total.{labels}"), c.cost_units);
    }
}

fn claim_series(store: &HostStore, max: u64) -> bool {
    let create = Create::ViaLock {
        now_ms: super::host::now_ms(),
    };
    matches!(add_u64_capped(store, SERIES_COUNT, 1, max, 32, create), Ok(Some(_)))
}
