//! The root context: parses the plugin configuration once and hands each request a
//! context of the configured role.

use super::export::ExportService;
use super::metering::Meter;
use super::service::{Misplaced, Service};
use super::{admin::AdminRequest, filter::FilterRequest};
use crate::core::auth::problem::Problem;
use crate::core::config::{Config, Role};
use crate::core::keyset::meta::Meta;
use crate::core::keyset::plans::read_plans;
use crate::core::limits::plan::Plan;
use crate::core::store::Store;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

/// This worker's decoded copy of the active plans, re-read only when `km/meta` says
/// they changed, so a request does not copy and decode the plans blob.
#[derive(Default)]
pub struct PlansCache {
    key: Option<(u64, u64)>,
    plans: Rc<BTreeMap<String, Plan>>,
}

impl PlansCache {
    pub fn get(&mut self, store: &dyn Store, meta: &Meta) -> Rc<BTreeMap<String, Plan>> {
        let key = (meta.gen, meta.plans_rev);
        if self.key != Some(key) {
            self.plans = Rc::new(read_plans(store, meta));
            self.key = Some(key);
        }
        self.plans.clone()
    }
}

/// Everything a request context needs that is computed once per configuration.
pub struct Shared {
    pub config: Config,
    /// Problem bodies rendered at start-up so a refusal formats nothing.
    pub bodies: HashMap<Problem, String>,
    pub challenges: Vec<String>,
    pub plans: RefCell<PlansCache>,
    /// This worker's usage counts (role filter).
    pub meter: RefCell<Meter>,
    /// Fail-open passes are logged once per worker, not once per request.
    pub warned_fail_open: std::cell::Cell<bool>,
}

/// How often an admin-role worker advances pending key-set cleanup.
const CLEANUP_TICK: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
    /// Role service only: the key-set pull (a root-only context, no HTTP contexts).
    service: Option<Service>,
    /// Role service with `export`: the usage export (independent of the pull).
    export: Option<ExportService>,
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        // A plugin reload or shutdown: hand this worker's counts over before the VM goes.
        self.flush_usage();
        true
    }

    fn on_http_call_response(&mut self, token: u32, num_headers: usize, body_size: usize, _trailers: usize) {
        if let Some(e) = self.export.as_mut().filter(|e| e.owns(token)) {
            e.on_http_call_response(token, num_headers, body_size);
        } else if let Some(s) = &mut self.service {
            s.on_http_call_response(token, num_headers, body_size);
        }
    }
}

impl Root {
    fn flush_usage(&self) {
        if let Some(shared) = &self.shared {
            if shared.config.role == Role::Filter {
                shared.meter.borrow_mut().flush();
            }
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&raw) {
            Ok(config) => {
                let bodies = Problem::ALL.iter().map(|p| (*p, p.body())).collect();
                let challenges = config.challenges();
                let metering = config.metering;
                crate::core::store::init_create_lock(&super::host::HostStore);
                if config.role == Role::Filter && metering.enabled {
                    super::host::ensure_instance();
                    let _ = proxy_wasm::hostcalls::set_tick_period(std::time::Duration::from_millis(
                        metering.flush_interval_ms,
                    ));
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
                self.shared = Some(Rc::new(Shared {
                    config,
                    bodies,
                    challenges,
                    plans: RefCell::default(),
                    meter: RefCell::new(Meter::new(metering)),
                    warned_fail_open: Default::default(),
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

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(match shared.config.role {
            Role::Filter => Box::new(FilterRequest::new(shared)),
            Role::Admin => Box::new(AdminRequest::new(shared)),
            Role::Service => Box::new(Misplaced),
        })
    }

    fn on_tick(&mut self) {
        if self.shared.as_ref().is_some_and(|s| s.config.role == Role::Admin) {
            let store = super::host::HostStore;
            if let Err(e) = crate::core::keyset::sweep::cleanup_step(
                &store,
                super::host::now_ms(),
                crate::core::keyset::sweep::CLEANUP_STEP_CHUNKS,
            ) {
                log::warn!("keymeter: key-set cleanup step failed: {e}");
            }
        }
        if let Some(s) = &mut self.service {
            s.on_tick();
        }
        if let Some(e) = &mut self.export {
            e.on_tick();
        }
        self.flush_usage();
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
