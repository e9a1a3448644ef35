//! The usage export service (role `service` with `export`): on the singleton's tick it
//! asks `core::export::Exporter` whether a batch is due, POSTs it as a CloudEvents batch
//! to the collector cluster and reports the answer. Independent of the key-set pull
//! (same root context, own call token). All decisions are in `core::export`.

use super::host::{self, HostStore};
use crate::core::config::ExportConfig;
use crate::core::export::{Decision, Exporter, CONTENT_TYPE, HEALTH};
use crate::core::store::Store;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType};
use std::time::Duration;

pub struct ExportService {
    config: ExportConfig,
    exporter: Exporter,
    events_metric: Option<u32>,
    failures_metric: Option<u32>,
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
        }
    }

    /// Called from `on_configure` (the caller sets the tick period).
    pub fn start(&mut self) {
        host::ensure_instance();
        self.events_metric = hostcalls::define_metric(MetricType::Counter, "keymeter_export_events_total").ok();
        self.failures_metric = hostcalls::define_metric(MetricType::Counter, "keymeter_export_failures_total").ok();
        log::info!(
            "keymeter export: usage to {} via cluster {} every {}ms, at most {} events per batch",
            self.exporter.health.url,
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
        let failures = self.exporter.health.failures;
        let due = self.exporter.due(now);
        if due {
            if let Some(body) = self.exporter.begin(now, &HostStore, &instance_id()) {
                self.send(now, body);
            }
        }
        if self.exporter.health.failures != failures {
            Self::count(self.failures_metric, self.exporter.health.failures - failures);
            self.log_failure();
        }
        if due || self.exporter.health.failures != failures {
            self.publish();
        }
    }

    fn send(&mut self, now: u64, body: Vec<u8>) {
        let c = &self.config;
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", "POST"),
            (":path", &c.path),
            (":authority", &c.authority),
            ("content-type", CONTENT_TYPE),
        ];
        headers.extend(c.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let timeout = Duration::from_millis(c.timeout_ms);
        match hostcalls::dispatch_http_call(&c.cluster, headers, Some(&body), vec![], timeout) {
            Ok(token) => self.exporter.dispatched(token),
            Err(status) => {
                let message = format!(
                    "cannot call cluster \"{}\": {status:?} (is it defined in the bootstrap?)",
                    c.cluster
                );
                self.exporter.dispatch_failed(now, message);
            }
        }
    }

    pub fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize) {
        let now = host::now_ms();
        let status = if num_headers > 0 {
            hostcalls::get_map(MapType::HttpCallResponseHeaders)
                .unwrap_or_default()
                .into_iter()
                .find(|(k, _)| k == ":status")
                .and_then(|(_, v)| v.parse().ok())
        } else {
            None
        };
        let body = if body_size > 0 {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size.min(4096))
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        match self.exporter.on_response(now, &HostStore, token, status, &body) {
            Decision::Ignored => return,
            Decision::Acked(n) => Self::count(self.events_metric, n as u64),
            Decision::Failed => {
                Self::count(self.failures_metric, 1);
                self.log_failure();
            }
        }
        self.publish();
    }

    fn log_failure(&self) {
        let h = &self.exporter.health;
        if let Some(e) = &h.last_error {
            log::warn!(
                "keymeter export: {} failed ({} in a row), batch of {} events kept for retry: {}",
                h.url,
                h.consecutive_failures,
                h.pending_events,
                e.message
            );
        }
    }

    /// Writes the export health to `km/export` for the admin status.
    fn publish(&self) {
        let bytes = serde_json::to_vec(&self.exporter.health).unwrap_or_default();
        if HostStore.set(HEALTH, &bytes, None).is_err() {
            log::warn!("keymeter export: cannot write {HEALTH}");
        }
    }
}
