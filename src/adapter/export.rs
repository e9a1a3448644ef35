//! The usage export service (role `service` with `export`): on the singleton's tick it
//! asks `core::export::Exporter` whether a batch is due, POSTs it as a CloudEvents batch
//! to the collector cluster and reports the answer. Independent of the key-set pull
//! (same root context, own call token). All decisions are in `core::export`.

use super::host::{self, HostStore};
use super::service::{dispatch, publish, CallResponse};
use crate::core::config::ExportConfig;
use crate::core::metering::export::{Decision, Exporter, CONTENT_TYPE, HEALTH};
use crate::core::store::Store;
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

pub struct ExportService {
    config: ExportConfig,
    exporter: Exporter,
    events_metric: Option<u32>,
    failures_metric: Option<u32>,
    parked_metric: Option<u32>,
}

fn instance_id() -> String {
    HostStore
        .get(host::INSTANCE)
        .0
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["instance_id"].as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

impl ExportService {
    pub fn new(config: ExportConfig) -> Self {
        let exporter = Exporter::new(&config);
        ExportService {
            config,
            exporter,
            events_metric: None,
            failures_metric: None,
            parked_metric: None,
        }
    }

    /// Called from `on_configure` (the caller sets the tick period).
    pub fn start(&mut self) {
        host::ensure_instance();
        self.events_metric = hostcalls::define_metric(MetricType::Counter, "keymeter_export_events_total").ok();
        self.failures_metric = hostcalls::define_metric(MetricType::Counter, "keymeter_export_failures_total").ok();
        self.parked_metric = hostcalls::define_metric(MetricType::Counter, "keymeter_export_parked_events_total").ok();
        log::info!(
            "keymeter export: usage to {} via cluster {} every {}ms, at most {} events per batch",
            self.exporter.health.link.url,
            self.config.cluster,
            self.config.interval_ms,
            self.config.max_events
        );
        self.publish();
    }

    pub fn owns(&self, token: u32) -> bool {
        self.exporter.owns(token)
    }

    fn count(metric: Option<u32>, n: u64) {
        if let (Some(id), true) = (metric, n > 0) {
            let _ = hostcalls::increment_metric(id, n as i64);
        }
    }

    pub fn on_tick(&mut self) {
        let now = host::now_ms();
        let failures = self.exporter.health.link.failures;
        let due = self.exporter.due(now);
        if due {
            if let Some(body) = self.exporter.begin(now, &HostStore, &instance_id()) {
                self.send(now, body);
            }
        }
        if self.exporter.health.link.failures != failures {
            Self::count(self.failures_metric, self.exporter.health.link.failures - failures);
            self.log_failure();
        }
        if due || self.exporter.health.link.failures != failures {
            self.publish();
        }
    }

    fn send(&mut self, now: u64, body: Vec<u8>) {
        let c = &self.config;
        let headers = [("content-type", CONTENT_TYPE)];
        match dispatch(
            &c.cluster,
            "POST",
            &c.path,
            &c.authority,
            &headers,
            &c.headers,
            Some(&body),
            c.timeout_ms,
        ) {
            Ok(token) => self.exporter.dispatched(token),
            Err(message) => self.exporter.dispatch_failed(now, message),
        }
    }

    pub fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize) {
        let now = host::now_ms();
        // Only the start of an error body goes into the status message.
        let r = CallResponse::read(num_headers, body_size, 4096);
        match self.exporter.on_response(now, &HostStore, token, r.status(), &r.body) {
            Decision::Ignored => return,
            Decision::Acked(n) => Self::count(self.events_metric, n as u64),
            Decision::Failed => {
                Self::count(self.failures_metric, 1);
                self.log_failure();
            }
            Decision::Parked(n) => {
                Self::count(self.failures_metric, 1);
                Self::count(self.parked_metric, n as u64);
            }
        }
        self.publish();
    }

    fn log_failure(&self) {
        let h = &self.exporter.health;
        if let Some(e) = &h.link.last_error {
            log::warn!(
                "keymeter export: {} failed ({} in a row), batch of {} events kept for retry: {}",
                h.link.url,
                h.link.consecutive_failures,
                h.pending_events,
                e.message
            );
        }
    }

    /// Writes the export health to `km/export` for the admin status.
    fn publish(&self) {
        publish(HEALTH, &self.exporter.health, "export");
    }
}
