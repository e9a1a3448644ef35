//! The public filter: fetches what `core::request::decide` asks for, applies its
//! decision, and counts the request's bytes for metering.

use super::host::{self, HostStore};
use super::metering::Who;
use super::root::PluginState;
use crate::core::keyset::meta::Meta;
use crate::core::keyset::names::key_entry_name;
use crate::core::keyset::names::META;
use crate::core::limits::fleet::Subject as FleetSubject;
use crate::core::limits::plan::Plan;
use crate::core::metering::credential::ANONYMOUS_LINEAGE;
use crate::core::request::{self, Caller, Decision, Fetch, FleetLimits, Unauthenticated};
use crate::core::store::{read_value, Store};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::rc::Rc;

pub struct FilterRequest {
    state: Rc<PluginState>,
    decision: Option<Decision>,
    /// Response status and body bytes, seen in callbacks Envoy makes anyway, so
    /// metering needs no host call of its own. `request_bytes` only grows for an
    /// admitted request: after a refusal Envoy never hands the body to the filter.
    status: u32,
    request_bytes: u64,
    response_bytes: u64,
    /// Fleet mode: the take call this request is paused for (token, take id), and the
    /// limits it decides.
    pending_take: Option<(u32, u64, FleetLimits)>,
}

/// `core::request::Fetch` over proxy-wasm: one host call per method.
struct HostFetch<'a> {
    state: &'a PluginState,
}

impl Fetch for HostFetch<'_> {
    fn api_key_header(&mut self, name: &str) -> Option<String> {
        host::request_header(name)
    }
    fn authorization(&mut self) -> Option<String> {
        host::request_header("authorization")
    }
    fn path(&mut self) -> Option<String> {
        host::request_header(":path")
    }
    fn method(&mut self) -> Option<String> {
        host::request_header(":method")
    }
    fn peer_ip(&mut self) -> Option<IpAddr> {
        host::peer_ip()
    }
    fn now_ms(&mut self) -> Option<u64> {
        host::try_now_ms()
    }
    fn meta(&mut self) -> Option<(Meta, u32)> {
        read_meta_and_cas()
    }
    fn key_entry(&mut self, id: &str) -> Option<Vec<u8>> {
        let mut name_buf = [0u8; 32];
        HostStore.get(key_entry_name(id, &mut name_buf)).0
    }
    fn plans(&mut self, meta: &Meta) -> Rc<BTreeMap<String, Plan>> {
        self.state.plans.borrow_mut().get(&HostStore, meta)
    }
    fn dynamic_metadata(&mut self) -> Option<Vec<u8>> {
        host::dynamic_metadata()
    }
}

/// `km/meta` and its CAS token (one shared-data read): for a request whose worker's copy
/// is stale, and for the worker's tick that refreshes the copy.
pub(super) fn read_meta_and_cas() -> Option<(Meta, u32)> {
    let (bytes, cas) = read_value(&HostStore, META);
    Some((Meta::decode(&bytes?)?, cas))
}

impl FilterRequest {
    pub fn new(state: Rc<PluginState>) -> Self {
        FilterRequest {
            state,
            decision: None,
            status: 0,
            request_bytes: 0,
            response_bytes: 0,
            pending_take: None,
        }
    }

    fn apply(&mut self, d: &Decision) -> Action {
        let state = &*self.state;
        if d.contended && state.meter.borrow_mut().contention() {
            log::warn!("keymeter: limit state contended (logged once per flush)");
        }
        if d.unauthenticated == Some(Unauthenticated::FailOpen) && !state.warned_fail_open.replace(true) {
            log::warn!("keymeter: no key set loaded, letting requests through unauthenticated");
        }
        if let Some(r) = &d.refused {
            let body = state.bodies.get(&r.problem).map(String::as_bytes);
            let mut retry_after = String::new();
            let headers = d.refusal_headers(&state.challenges, &mut retry_after);
            // Only the status: Envoy passes this local reply's body through
            // `on_http_response_body` like any other, and it is counted there, once.
            self.status = r.problem.status();
            self.send_http_response(r.problem.status(), headers, body);
            return Action::Pause;
        }
        d.for_each_request_header(&state.config, |name, value| self.set_http_request_header(name, value));
        Action::Continue
    }
}

impl Context for FilterRequest {
    /// Fleet mode: the take this request was paused for answered (or failed, or timed
    /// out): apply the verdict, then resume or refuse.
    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        let Some((_, take_id, limits)) = self.pending_take.take_if(|(t, _, _)| *t == token) else {
            return;
        };
        let state = self.state.clone();
        let (Some(fleet), Some(mut decision)) = (state.fleet.as_ref(), self.decision.take()) else {
            return;
        };
        let subject = FleetSubject {
            name: &limits.subject,
            buckets: &limits.buckets,
            quotas: &limits.quotas,
        };
        let (verdict, fields) = fleet.on_take_response(&subject, decision.cost, take_id, num_headers, body_size);
        decision.apply_fleet(&verdict);
        decision.ratelimit = fields;
        let action = self.apply(&decision);
        self.decision = Some(decision);
        if action == Action::Continue {
            self.resume_http_request();
        }
    }
}

impl HttpContext for FilterRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let state = self.state.clone();
        let mut cache = state.keys.borrow_mut();
        let mut leases = state.leases.borrow_mut();
        let mut decision = request::decide(
            &state.config,
            &mut cache,
            &mut leases,
            &mut HostFetch { state: &state },
            &HostStore,
        );
        drop((cache, leases));
        // Fleet mode: the node's lease decides the limits, or the request waits for one
        // take call (bounded by the fleet timeout).
        if let (Some(limits), Some(fleet)) = (decision.fleet.take(), state.fleet.as_ref()) {
            let subject = FleetSubject {
                name: &limits.subject,
                buckets: &limits.buckets,
                quotas: &limits.quotas,
            };
            let step = fleet.decide(&subject, limits.now_ms, decision.cost, &mut state.leases.borrow_mut());
            match step {
                super::fleet::RequestStep::Decided(v, fields) => {
                    decision.apply_fleet(&v);
                    decision.ratelimit = fields;
                }
                super::fleet::RequestStep::Paused(token, take_id) => {
                    self.pending_take = Some((token, take_id, limits));
                    self.decision = Some(decision);
                    return Action::Pause;
                }
            }
        }
        let action = self.apply(&decision);
        self.decision = Some(decision);
        action
    }

    fn on_log(&mut self) {
        let mut meter = self.state.meter.borrow_mut();
        let Some(d) = &self.decision else { return };
        if !meter.enabled() {
            return;
        }
        if let Some(why) = d.unauthenticated {
            meter.unauthenticated(why);
        }
        let who = match &d.caller {
            Caller::Key(r) => Who {
                lineage: r.lineage(),
                key_id: &r.id,
                consumer: &r.consumer,
                plan: &r.plan,
            },
            Caller::Anonymous(plan) => Who {
                lineage: ANONYMOUS_LINEAGE,
                key_id: ANONYMOUS_LINEAGE,
                consumer: "anonymous",
                plan,
            },
            Caller::Jwt { identity, lineage } => Who {
                lineage,
                key_id: lineage,
                consumer: &identity.consumer,
                plan: &identity.plan,
            },
            Caller::Nobody => return,
        };
        meter.record(
            &who,
            d.outcome,
            self.status,
            self.request_bytes,
            self.response_bytes,
            d.cost,
        );
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        // We always continue, so each call sees only the new chunk.
        self.request_bytes += body_size as u64;
        Action::Continue
    }

    /// Every response body byte the client gets passes here exactly once, whoever made
    /// it: the upstream, keymeter's refusal, or a local reply Envoy sends after keymeter
    /// admitted the request (`no healthy upstream`, a connect failure).
    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.response_bytes += body_size as u64;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(d) = &self.decision else {
            return Action::Continue;
        };
        if d.reads_response_status(self.state.meter.borrow().enabled()) {
            self.status = host::response_header(":status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
        }
        for (name, value) in d.response_headers() {
            self.set_http_response_header(name, Some(value));
        }
        Action::Continue
    }
}
