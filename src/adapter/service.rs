//! The key-set pull service (role `service`): an Envoy bootstrap singleton
//! (`envoy.bootstrap.wasm` with `singleton: true`, same `vm_id` as the filters, so it
//! writes the shared data they read). One per Envoy process, on the main thread.
//!
//! Every tick it asks `core::pull::Poller` whether a poll is due, fetches the key-set
//! document through an Envoy cluster, and applies what the poller accepts with the same
//! atomic full-snapshot update as an admin push. The poll health goes to `km/source` for
//! the admin status. All decisions are in `core::pull`; this file only talks to the host.

use super::host::{self, HostBuffer, HostStore};
use crate::core::auth::problem::admin_body;
use crate::core::config::SourceConfig;
use crate::core::keyset::meta::read_meta;
use crate::core::keyset::stream::{push_stream, PushError};
use crate::core::remote::pull::{Body, PollResult, Poller, Response, State, SOURCE};
use crate::core::store::Store;
use crate::core::time::Clock;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType};
use std::time::Duration;

/// How often the service checks whether a poll is due. Well below the minimum interval
/// (1s): Envoy's timer is not phase-locked to our clock, so with a 1s tick a poll due a
/// few ms after a tick would wait for the next one and a 1s interval would become 2s.
pub(super) const TICK: Duration = Duration::from_millis(200);

/// One HTTP call of the singleton to `cluster`: `:method`, `:path`, `:authority`, then
/// `headers`, then the configured `extra` headers. Returns the call token, or the status
/// message for a call the host refused.
#[allow(clippy::too_many_arguments)]
pub(super) fn dispatch(
    cluster: &str,
    method: &str,
    path: &str,
    authority: &str,
    headers: &[(&str, &str)],
    extra: &[(String, String)],
    body: Option<&[u8]>,
    timeout_ms: u64,
) -> Result<u32, String> {
    let mut all: Vec<(&str, &str)> = vec![(":method", method), (":path", path), (":authority", authority)];
    all.extend_from_slice(headers);
    all.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    hostcalls::dispatch_http_call(cluster, all, body, vec![], Duration::from_millis(timeout_ms))
        .map_err(|status| format!("cannot call cluster \"{cluster}\": {status:?} (is it defined in the bootstrap?)"))
}

/// Writes a health record (JSON) to shared data `key` for the admin status.
pub(super) fn publish(key: &str, health: &impl serde::Serialize, who: &str) {
    let bytes = serde_json::to_vec(health).unwrap_or_default();
    if HostStore.set(key, &bytes, None).is_err() {
        log::warn!("keymeter {who}: cannot write {key}");
    }
}

/// The answer to a `dispatch`ed call, read in `on_http_call_response`: the response
/// headers and at most `max_body` bytes of the body.
pub(super) struct CallResponse {
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl CallResponse {
    pub fn read(num_headers: usize, body_size: usize, max_body: usize) -> Self {
        let headers = if num_headers > 0 {
            host::call_response_headers()
        } else {
            Vec::new()
        };
        let body = if body_size > 0 && max_body > 0 {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size.min(max_body))
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        CallResponse { headers, body }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `None`: no response at all (timeout, connection failure, reset).
    pub fn status(&self) -> Option<u32> {
        self.header(":status").and_then(|s| s.parse().ok())
    }
}

pub struct Service {
    source: SourceConfig,
    poller: Poller,
}

fn running_version() -> Option<u64> {
    read_meta(&HostStore).map(|m| m.version)
}

impl Service {
    pub fn new(source: SourceConfig) -> Self {
        let poller = Poller::new(&source);
        Service { source, poller }
    }

    /// Called from `on_configure`: start ticking; the first tick (200ms on) polls.
    ///
    /// Not polling from `on_configure` itself: Envoy configures a singleton twice on the
    /// main thread, first in a base VM it then destroys, and a call made there is wasted.
    pub fn start(&mut self) {
        if let Err(s) = hostcalls::set_tick_period(TICK) {
            log::error!("keymeter pull: cannot set the tick period: {s:?}");
        }
        log::info!(
            "keymeter pull: polling {} via cluster {} every {}ms",
            self.poller.health.link.url,
            self.source.cluster,
            self.source.interval_ms
        );
        self.publish();
    }

    pub fn on_tick(&mut self) {
        let now = host::now_ms();
        let failures = self.poller.health.link.failures;
        let due = self.poller.due(now);
        if self.poller.health.link.failures != failures {
            // a call in flight was given up
            self.log_failure();
            self.publish();
        }
        if due {
            self.poll(now);
        }
    }

    fn poll(&mut self, now: u64) {
        let etag = self.poller.begin(now, running_version());
        let s = &self.source;
        let mut headers = vec![("accept", "application/json")];
        if let Some(e) = &etag {
            headers.push(("if-none-match", e));
        }
        match dispatch(
            &s.cluster,
            "GET",
            &s.path,
            &s.authority,
            &headers,
            &s.headers,
            None,
            s.timeout_ms,
        ) {
            Ok(token) => self.poller.dispatched(token),
            Err(message) => {
                self.poller.dispatch_failed(now, message);
                self.log_failure();
                self.publish();
            }
        }
    }

    pub fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize) {
        let now = host::now_ms();
        // Headers only: the body is read from Envoy's buffer on demand, in slices.
        let r = CallResponse::read(num_headers, body_size, 0);
        let open_body =
            || -> Box<dyn std::io::Read> { Box::new(HostBuffer::reader(BufferType::HttpCallResponseBody, body_size)) };
        let resp = Response {
            status: r.status(),
            etag: r.header("etag"),
            body: Body::Reader(&open_body),
        };
        let was = self.poller.health.link.state;
        match self.poller.on_response(now, token, resp, running_version()) {
            PollResult::Ignored => return,
            PollResult::Unchanged => {
                if was == State::Error {
                    log::info!("keymeter pull: source reachable again, key set unchanged");
                }
            }
            PollResult::Failed => self.log_failure(),
            PollResult::Apply(_) => {
                // Validated and applied while parsed, like an admin push: the pulled
                // document is never turned into an in-memory key set.
                match push_stream(&HostStore, open_body(), Clock::Live(&host::now_ms), false) {
                    Ok(report) => {
                        self.poller.applied(now, &report);
                        host::record_update("pull", now, &report);
                    }
                    Err(PushError::Doc(e)) => {
                        self.poller.invalid(now, &e);
                        self.log_failure();
                    }
                    Err(PushError::Apply(e)) => {
                        self.poller.apply_failed(now, &e);
                        self.log_failure();
                    }
                }
            }
        }
        self.publish();
    }

    fn log_failure(&self) {
        let h = &self.poller.health;
        if let Some(e) = &h.link.last_error {
            log::warn!(
                "keymeter pull: {} failed ({} in a row), keeping the running key set: {}",
                h.link.url,
                h.link.consecutive_failures,
                e.message
            );
        }
    }

    /// Writes the poll health to `km/source` for the admin status.
    fn publish(&self) {
        publish(SOURCE, &self.poller.health, "pull");
    }
}

/// What an HTTP filter configured with role `service` does: refuse, loudly. The pull
/// service belongs in `bootstrap_extensions`, not in a filter chain.
pub struct Misplaced;

impl Context for Misplaced {}

impl HttpContext for Misplaced {
    fn on_http_request_headers(&mut self, _n: usize, _end_of_stream: bool) -> Action {
        log::error!("keymeter: role service is a bootstrap extension (envoy.bootstrap.wasm), not an HTTP filter");
        let body = admin_body(
            500,
            "misconfigured",
            "keymeter is misconfigured",
            "Role service runs as an Envoy bootstrap extension, not as an HTTP filter.",
        );
        self.send_http_response(
            500,
            vec![("content-type", "application/problem+json")],
            Some(body.as_bytes()),
        );
        Action::Pause
    }
}
