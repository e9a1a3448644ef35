//! The root context: parses the plugin configuration once and hands each request a
//! context of the configured role.

use super::export::ExportService;
use super::metering::Meter;
use super::service::{Misplaced, Service};
use super::{admin::AdminRequest, filter::FilterRequest};
use crate::core::admin_hold::HeldReplies;
use crate::core::auth::problem::Problem;
use crate::core::config::{Config, Role};
use crate::core::limits::worker_lease::{self, WorkerLeases};
use crate::core::request::meta_copy::POLL_MS;
use crate::core::request::{KeyCache, PlansCache};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// The plugin's per-worker state for one configuration: the parsed config, what is
/// rendered from it once, and this worker's caches and usage counts. (Not shared data:
/// each worker VM has its own.)
pub struct PluginState {
    pub config: Config,
    /// Problem bodies rendered at start-up so a refusal formats nothing.
    pub bodies: HashMap<Problem, String>,
    pub challenges: Vec<String>,
    pub plans: RefCell<PlansCache>,
    /// This worker's copy of `km/meta` (re-read on the tick) and the key records
    /// decoded under it.
    pub keys: RefCell<KeyCache>,
    /// This worker's token leases on busy subjects (single-node limits).
    pub leases: RefCell<WorkerLeases>,
    /// This worker's usage counts (role filter).
    pub meter: RefCell<Meter>,
    /// Fail-open passes are logged once per worker, not once per request.
    pub warned_fail_open: std::cell::Cell<bool>,
    /// Fleet mode (role filter with `fleet`): this worker's lease refills and breaker.
    pub fleet: Option<super::fleet::FleetNode>,
    /// Role admin: answers held until every worker uses the write they report, and
    /// whether the tick runs at the short period that sends them.
    pub held: RefCell<HeldReplies<super::admin::HeldReply>>,
    pub fast_tick: std::cell::Cell<bool>,
}

/// How often an admin-role worker advances pending key-set cleanup.
pub const CLEANUP_TICK: std::time::Duration = std::time::Duration::from_millis(200);
/// The admin tick while answers are held (see `core::admin_hold`): they go out within
/// this much of their time.
pub const HELD_TICK: std::time::Duration = std::time::Duration::from_millis(2);
/// Idle limit states are looked for once a second per admin worker, a page of the usage
/// index at a time: 1M lineages are walked in about an hour.
const RECLAIM_EVERY_MS: u64 = 1000;
const RECLAIM_STEP: u64 = 256;

#[derive(Default)]
pub struct Root {
    state: Option<Rc<PluginState>>,
    /// Role service only: the key-set pull (a root-only context, no HTTP contexts).
    service: Option<Service>,
    /// Role service with `export`: the usage export (independent of the pull).
    export: Option<ExportService>,
    /// When usage was last flushed: in fleet mode the tick is the (faster) refill tick.
    last_flush_ms: u64,
    /// When this (admin) worker last walked a page for idle limit state.
    last_reclaim_ms: u64,
    /// When this (admin) worker last advanced the key-set cleanup.
    last_cleanup_ms: u64,
    /// When this (filter) worker last returned expired leases / ran the fleet tick
    /// (the tick itself runs every `POLL_MS` for the `km/meta` copy).
    last_lease_sweep_ms: u64,
    last_fleet_tick_ms: u64,
    /// Unloading: waiting for the lease returns to be answered before `done()`.
    closing: bool,
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        // A plugin reload or shutdown: hand this worker's counts over before the VM goes.
        self.flush_usage();
        // Its leased units too: what it did not spend goes back to the shared limits.
        if let Some(s) = &self.state {
            s.leases
                .borrow_mut()
                .release_all(&super::host::HostStore, super::host::now_ms());
        }
        // Fleet mode: give the leases back (what is unspent returns to the fleet now,
        // not after the lease TTL); wait for the answers, bounded by the call timeout.
        let sent = self.state.as_ref().map_or(0, |s| {
            s.fleet.as_ref().map_or(0, |f| {
                f.retire();
                f.release_all(&mut s.leases.borrow_mut())
            })
        });
        if sent > 0 {
            log::info!("keymeter fleet: unloading, returning {sent} lease(s)");
        }
        self.closing = sent > 0;
        !self.closing
    }

    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        if let Some(fleet) = self.state.as_ref().and_then(|s| s.fleet.as_ref()) {
            if fleet.on_lease_response(token, num_headers, body_size) {
                if self.closing && fleet.pending_calls() == 0 {
                    let _ = proxy_wasm::hostcalls::done();
                }
                return;
            }
        }
        if let Some(e) = self.export.as_mut().filter(|e| e.owns(token)) {
            e.on_http_call_response(token, num_headers, body_size);
        } else if let Some(s) = &mut self.service {
            s.on_http_call_response(token, num_headers, body_size);
        }
    }
}

impl Root {
    fn flush_usage(&self) {
        if let Some(state) = &self.state {
            if state.config.role == Role::Filter {
                state.meter.borrow_mut().flush();
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        // Test builds only: arm the faults named in the configuration, parse the rest.
        #[cfg(feature = "fault-injection")]
        let raw = match super::fault::configure(&raw) {
            Ok(raw) => raw,
            Err(e) => {
                log::error!("keymeter: {e}");
                return false;
            }
        };
        match Config::parse(&raw) {
            Ok(config) => {
                let bodies = Problem::ALL.iter().map(|p| (*p, p.body())).collect();
                let challenges = config.challenges();
                let metering = config.metering;
                crate::core::store::init_create_lock(&super::host::HostStore);
                let fleet = config.fleet.clone().map(|f| {
                    let mut node = super::fleet::FleetNode::new(f);
                    node.ratelimit_headers = config.rate_limit_headers;
                    node
                });
                if config.role == Role::Filter {
                    if metering.enabled || fleet.is_some() {
                        super::host::ensure_instance();
                    }
                    let mut tick = if metering.enabled {
                        metering.flush_interval_ms
                    } else {
                        u64::MAX
                    };
                    match &fleet {
                        Some(f) => tick = tick.min(f.cfg.refill_tick_ms),
                        // Single-node limits: expired worker leases go back promptly.
                        None => tick = tick.min(worker_lease::SWEEP_MS),
                    }
                    // This worker's copy of `km/meta` is re-read every `POLL_MS`.
                    tick = tick.min(POLL_MS);
                    let _ = proxy_wasm::hostcalls::set_tick_period(std::time::Duration::from_millis(tick));
                }
                log::info!("keymeter: configured as {:?}", config.role);
                if config.role == Role::Admin {
                    // Finishes the sweep a staged commit (or abort) left, in short steps.
                    let _ = proxy_wasm::hostcalls::set_tick_period(CLEANUP_TICK);
                }
                if let (Role::Service, Some(source)) = (config.role, &config.source) {
                    let service = self.service.insert(Service::new(source.clone()));
                    service.start();
                }
                if let (Role::Service, Some(export)) = (config.role, &config.export) {
                    let _ = proxy_wasm::hostcalls::set_tick_period(super::service::TICK);
                    self.export.insert(ExportService::new(export.clone())).start();
                }
                self.state = Some(Rc::new(PluginState {
                    config,
                    bodies,
                    challenges,
                    plans: RefCell::default(),
                    keys: RefCell::default(),
                    leases: RefCell::default(),
                    meter: RefCell::new(Meter::new(metering)),
                    warned_fail_open: Default::default(),
                    fleet,
                    held: RefCell::default(),
                    fast_tick: Default::default(),
                }));
                true
            }
            Err(e) => {
                // Returning false makes Envoy reject the plugin: never run half-configured.
                log::error!("keymeter: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        let state = self.state.clone()?;
        Some(match state.config.role {
            Role::Filter => Box::new(FilterRequest::new(state)),
            Role::Admin => Box::new(AdminRequest::new(state, context_id)),
            Role::Service => Box::new(Misplaced),
        })
    }

    fn on_tick(&mut self) {
        let now = super::host::now_ms();
        // First, while nothing else ran: this worker's copy of `km/meta` (the clock is
        // read before the shared-data read, as `MetaCopy` requires; not on a failed
        // clock read, the request path then reads inline).
        if let Some(s) = self.state.as_ref().filter(|s| s.config.role == Role::Filter && now > 0) {
            s.keys.borrow_mut().poll_meta(now, super::filter::read_meta_and_cas);
        }
        if self.state.as_ref().is_some_and(|s| s.config.role == Role::Admin) {
            let store = super::host::HostStore;
            // The tick runs every `HELD_TICK` while answers are held: the cleanup
            // keeps its own pace.
            if paced(&mut self.last_cleanup_ms, now, CLEANUP_TICK.as_millis() as u64, 0) {
                if let Err(e) = crate::core::keyset::sweep::cleanup_step(
                    &store,
                    now,
                    crate::core::keyset::sweep::CLEANUP_STEP_CHUNKS,
                ) {
                    log::warn!("keymeter: key-set cleanup step failed: {e}");
                }
            }
            if now.saturating_sub(self.last_reclaim_ms) >= RECLAIM_EVERY_MS {
                self.last_reclaim_ms = now;
                let r = crate::core::limits::reclaim::step(&store, now, RECLAIM_STEP);
                if r.reclaimed > 0 {
                    log::debug!("keymeter: reclaimed {} idle limit states", r.reclaimed);
                }
            }
        }
        if let Some(s) = &mut self.service {
            s.on_tick();
        }
        if let Some(e) = &mut self.export {
            e.on_tick();
        }
        if let Some(s) = &self.state {
            if let Some(fleet) = &s.fleet {
                // At its configured pace, not the `km/meta` poll's: up to half a tick early.
                let every = fleet.cfg.refill_tick_ms;
                if paced(&mut self.last_fleet_tick_ms, now, every, POLL_MS / 2) {
                    fleet.on_tick(&mut s.leases.borrow_mut());
                }
            }
        }
        // (Not on a failed clock read: expiry needs the time.)
        if let Some(s) = self.state.as_ref().filter(|s| s.config.role == Role::Filter && now > 0) {
            // At the pace the tick had before it ran for the `km/meta` copy.
            let every = s
                .fleet
                .as_ref()
                .map_or(worker_lease::SWEEP_MS, |f| f.cfg.refill_tick_ms);
            if paced(&mut self.last_lease_sweep_ms, now, every, POLL_MS / 2) {
                s.leases.borrow_mut().sweep(&super::host::HostStore, now);
            }
        }
        let interval = self.state.as_ref().map_or(0, |s| s.config.metering.flush_interval_ms);
        if now.saturating_sub(self.last_flush_ms) >= interval {
            self.last_flush_ms = now;
            self.flush_usage();
        }
        // Last: sending switches the effective context to each held request's.
        if let Some(s) = self.state.as_ref().filter(|s| s.config.role == Role::Admin) {
            super::admin::send_due(s, now);
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Whether a job run from the tick is due at `now`, `every_ms` after it last ran at
/// `*last` (at most `early_ms` early, so a tick of another period does not skip it by a
/// hair); if so, records `now` as its last run. The tick's period is the smallest any
/// job needs, so each job keeps its own pace this way.
fn paced(last: &mut u64, now: u64, every_ms: u64, early_ms: u64) -> bool {
    let due = now.saturating_add(early_ms) >= last.saturating_add(every_ms);
    if due {
        *last = now;
    }
    due
}
