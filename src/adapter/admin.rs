//! keymeter's admin API, served by the filter on an internal listener with the same
//! `vm_id` as the public filter, so both see one key set.
//!
//! Every call needs `Authorization: Bearer <admin token>` (checked before routing, so
//! unknown paths cannot be told from known ones without it); the config holds only the
//! token's sha256. Every answer carries `cache-control: no-store`. Update bodies are
//! buffered by Envoy (the admin listener's buffer limit bounds them); full pushes are
//! parsed from that buffer in slices and written key by key (large sets arrive as staged
//! uploads, one chunk per call), and the bodies read whole into the heap (delta, commit)
//! have byte caps (413).
//!
//! An answer that reports a key-set change as live (200 to a push, a delta or a staged
//! commit; a status read near an update) is held until every worker's copy of
//! `km/meta` shows it (see `core::admin_hold`): the request stays paused and the root's
//! tick sends the answer, so nothing blocks.

use super::host::{self, HostBuffer, HostStore};
use super::root::PluginState;
use crate::core::admin_hold::status_needs_hold;
use crate::core::admin_route::{self, Route};
use crate::core::auth::api_key::hashes_equal;
use crate::core::auth::problem::admin_body;
use crate::core::caps;
use crate::core::keyset::apply::{ApplyError, ApplyOptions, ApplyReport};
use crate::core::keyset::delta::apply_delta;
use crate::core::keyset::document::{parse_json, DeltaDoc, DocError};
use crate::core::keyset::meta::read_meta;
use crate::core::keyset::names::STATUS;
use crate::core::keyset::plans::read_plans;
use crate::core::keyset::stream::{push_stream, PushError};
use crate::core::keyset::upload::{upload_abort, upload_begin, upload_commit, upload_keys, UploadError};
use crate::core::redact;
use crate::core::store::Store;
use crate::core::time::{format_rfc3339, Clock};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use proxy_wasm::types::BufferType;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::rc::Rc;

pub struct AdminRequest {
    shared: Rc<PluginState>,
    /// This request's context id: a held answer is sent to it from the root's tick.
    context_id: u32,
    route: Option<Route>,
    force: bool,
    upload_id: String,
}

/// An answer waiting in `PluginState::held` (only 2xx answers are held; they carry no
/// extra headers).
#[derive(Debug)]
pub struct HeldReply {
    status: u32,
    body: String,
}

/// Every admin answer's headers: `cache-control: no-store` on all of them (status,
/// usage and errors must not sit in a shared cache).
fn reply_headers<'a>(status: u32, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let ctype = if status >= 400 {
        "application/problem+json"
    } else {
        "application/json"
    };
    let mut headers = vec![("content-type", ctype), ("cache-control", "no-store")];
    headers.extend_from_slice(extra);
    headers
}

/// The admin root's tick: sends the held answers whose time has come (`now_ms`), and
/// puts the tick back to its slow pace when none is left.
pub fn send_due(state: &PluginState, now_ms: u64) {
    if now_ms == 0 {
        return; // a failed clock read: not a time to compare with
    }
    let due = state.held.borrow_mut().take_due(now_ms);
    for (ctx, reply) in due {
        // The request may be gone (client reset): then there is no context to answer.
        let sent = proxy_wasm::hostcalls::set_effective_context(ctx).and_then(|()| {
            proxy_wasm::hostcalls::send_http_response(
                reply.status,
                reply_headers(reply.status, &[]),
                Some(reply.body.as_bytes()),
            )
        });
        if let Err(e) = sent {
            log::warn!("keymeter: held admin answer for context {ctx} not sent: {e:?}");
        }
    }
    if state.fast_tick.get() && state.held.borrow().is_empty() {
        state.fast_tick.set(false);
        let _ = proxy_wasm::hostcalls::set_tick_period(super::root::CLEANUP_TICK);
    }
}

impl AdminRequest {
    pub fn new(shared: Rc<PluginState>, context_id: u32) -> Self {
        AdminRequest {
            shared,
            context_id,
            route: None,
            force: false,
            upload_id: String::new(),
        }
    }

    fn reply(&self, status: u32, body: &str) -> Action {
        self.reply_with(status, body, &[])
    }

    /// Every admin answer goes through here or through `hold`.
    fn reply_with(&self, status: u32, body: &str, extra: &[(&str, &str)]) -> Action {
        self.send_http_response(status, reply_headers(status, extra), Some(body.as_bytes()));
        Action::Pause
    }

    /// Answers once every worker uses the `km/meta` write this answer reports:
    /// `written_ms` is a clock reading taken after that write (or after a read that saw
    /// it). The request stays paused until the root's tick sends the answer.
    fn hold(&self, status: u32, body: String, written_ms: u64) -> Action {
        if written_ms == 0 {
            // No clock: nothing to time the hold with. Answer now rather than never.
            log::warn!("keymeter: the host clock failed; answering without the visibility hold");
            return self.reply(status, &body);
        }
        self.shared
            .held
            .borrow_mut()
            .hold(self.context_id, written_ms, HeldReply { status, body });
        if !self.shared.fast_tick.replace(true) {
            // Only on the change: setting the period re-arms the timer.
            let _ = proxy_wasm::hostcalls::set_tick_period(super::root::HELD_TICK);
        }
        Action::Pause
    }

    fn problem(&self, status: u32, slug: &str, title: &str, detail: &str) -> Action {
        self.reply(status, &admin_body(status, slug, title, detail))
    }

    /// A document that failed validation: 422 when it is over a size cap, else 400 with
    /// `slug`. The detail names entry and field but never quotes a value from the
    /// document (serde quotes offending strings; those may be secrets).
    fn doc_problem(&self, slug: &str, title: &str, e: &DocError, suffix: &str) -> Action {
        let detail = format!("{}{suffix}", redact::serde_values(&e.to_string()));
        if e.is_over_limit() {
            self.problem(422, "over-limit", "Key-set document over a size limit", &detail)
        } else {
            self.problem(400, slug, title, &detail)
        }
    }

    fn authorized(&self) -> bool {
        let Some(want) = self.shared.config.admin_token_sha256 else {
            return false;
        };
        let Some(auth) = host::request_header("authorization") else {
            return false;
        };
        let Some(token) = bearer_token(&auth) else {
            return false;
        };
        hashes_equal(&Sha256::digest(token.as_bytes()).into(), &want)
    }

    /// 413 for a body over `cap` bytes (`seen`: its size, or what is buffered so far);
    /// the request is then finished, later body callbacks are ignored.
    fn too_large(&mut self, seen: usize, cap: usize) -> Action {
        self.route = None;
        self.problem(
            413,
            "body-too-large",
            "Request body too large",
            &format!(
                "the body is {seen} bytes or more; this call takes at most {cap} bytes (split a delta into several batches)"
            ),
        )
    }

    fn status(&self) -> Action {
        let store = HostStore;
        let json_at = |key: &str| -> serde_json::Value {
            store
                .get(key)
                .0
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(serde_json::Value::Null)
        };
        let last = json_at(STATUS);
        // The pull service's health (null when no pull service runs in this Envoy).
        let source = json_at(crate::core::remote::pull::SOURCE);
        // The usage export's health (null when no export runs in this Envoy).
        let export = json_at(crate::core::metering::export::HEALTH);
        // Fleet mode's health (null when this Envoy's filters run single-node).
        let fleet = json_at(super::fleet::HEALTH);
        let reclaim = crate::core::limits::reclaim::status(&store);
        let meta = read_meta(&store);
        let body = match meta {
            None => {
                json!({"loaded": false, "last_update": last, "source": source, "export": export, "fleet": fleet, "reclaim": reclaim})
            }
            Some(m) => json!({
                "loaded": true,
                "version": m.version,
                "keys": m.keys,
                "plans": read_plans(&store, &m).keys().collect::<Vec<_>>(),
                "generation": m.gen,
                "memory_estimate_bytes": m.memory_estimate_bytes(),
                "updated_at": format_rfc3339(m.updated_at),
                "last_update": last,
                "source": source,
                "export": export,
                "fleet": fleet,
                "reclaim": reclaim,
            }),
        };
        // A version written moments ago may not be in every worker's copy of `km/meta`
        // yet: a status near an update answers once it is (`core::admin_hold`).
        let now = host::now_ms();
        match meta {
            Some(m) if status_needs_hold(m.updated_at, now) => self.hold(200, body.to_string(), now),
            _ => self.reply(200, &body.to_string()),
        }
    }

    /// `GET /v1/usage?consumer=C&cursor=N&limit=L`: cumulative per-lineage usage since
    /// this Envoy process started, paged through the usage index.
    fn usage(&self, query: &str) -> Action {
        let q = match admin_route::usage_query(query) {
            Ok(q) => q,
            Err(what) => return self.problem(400, "invalid-query", "Invalid query parameter", what),
        };
        let store = HostStore;
        let (rows, next) = crate::core::metering::usage::page(&store, q.consumer.as_deref(), q.cursor, q.limit);
        let instance: serde_json::Value = store
            .get(super::host::INSTANCE)
            .0
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null);
        let items: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let mut v = r.counters.to_json();
                v["lineage"] = r.lineage.clone().into();
                v["key_id"] = r.key_id.clone().into();
                v["consumer"] = r.consumer.clone().into();
                v["plan"] = r.plan.clone().into();
                v["credential"] = crate::core::metering::credential::of_lineage(&r.lineage).into();
                v
            })
            .collect();
        let body = json!({
            "instance_id": instance.get("instance_id"),
            "started_at": instance.get("started_at"),
            "items": items,
            "next_cursor": next,
        });
        self.reply(200, &body.to_string())
    }

    fn apply(&self, route: Route, body_size: usize) -> Action {
        let store = HostStore;
        let opts = ApplyOptions {
            force: self.force,
            now_ms: host::now_ms(),
        };
        let result: Result<ApplyReport, Action> = match route {
            Route::PutKeySet => {
                // Parsed straight from Envoy's buffer and applied key by key: the
                // document is never held whole in the wasm heap (which cannot shrink).
                let reader = HostBuffer::reader(BufferType::HttpRequestBody, body_size);
                match push_stream(&store, reader, Clock::Live(&host::now_ms), opts.force) {
                    Ok(report) => Ok(report),
                    Err(PushError::Doc(e)) => Err(self.doc_problem("invalid-keyset", "Invalid key set", &e, "")),
                    Err(PushError::Apply(e)) => Err(self.apply_error(e)),
                }
            }
            Route::PostDelta => {
                let body = self.get_http_request_body(0, body_size).unwrap_or_default();
                let body = &body[..];
                let running = read_meta(&store).map(|m| read_plans(&store, &m)).unwrap_or_default();
                match parse_json::<DeltaDoc>(body)
                    .and_then(|d| Ok((d.version, d.compile(|p| running.contains_key(p))?)))
                {
                    Err(e) => Err(self.doc_problem("invalid-delta", "Invalid key-set delta", &e, "")),
                    Ok((version, ops)) => apply_delta(&store, version, &ops, opts).map_err(|e| self.apply_error(e)),
                }
            }
            Route::UploadBegin => {
                let id = new_upload_id(opts.now_ms);
                return match upload_begin(&store, &id, opts.now_ms) {
                    Ok(()) => {
                        log::info!("keymeter: key set upload {id} begun");
                        self.reply(201, &json!({"upload_id": id}).to_string())
                    }
                    Err(e) => self.upload_error(e),
                };
            }
            Route::UploadKeys => {
                let reader = HostBuffer::reader(BufferType::HttpRequestBody, body_size);
                return match upload_keys(&store, &self.upload_id, reader, opts.now_ms) {
                    Ok(n) => self.reply(200, &json!({"keys_so_far": n}).to_string()),
                    Err(e) => self.upload_error(e),
                };
            }
            Route::UploadCommit => {
                let body = self.get_http_request_body(0, body_size).unwrap_or_default();
                upload_commit(&store, &self.upload_id, &body, opts.now_ms, opts.force).map_err(|e| self.upload_error(e))
            }
            Route::UploadAbort => {
                return match upload_abort(&store, &self.upload_id, opts.now_ms) {
                    Ok(()) => self.reply(200, &json!({"upload_id": self.upload_id, "aborted": true}).to_string()),
                    Err(e) => self.upload_error(e),
                };
            }
            Route::Status | Route::Usage => return self.status(),
        };
        match result {
            Err(action) => action,
            Ok(report) => {
                let source = match route {
                    Route::PutKeySet => "push",
                    Route::UploadCommit => "upload",
                    _ => "delta",
                };
                host::record_update(source, opts.now_ms, &report);
                // Read after the write: the answer goes once every worker sees it.
                let written = host::now_ms();
                self.hold(200, serde_json::to_string(&report).unwrap_or_default(), written)
            }
        }
    }

    fn upload_error(&self, e: UploadError) -> Action {
        match e {
            UploadError::NotFound => self.problem(
                404,
                "upload-not-found",
                "No such key-set upload",
                &format!(
                    "no upload {:?} is in progress (committed, aborted, failed or expired)",
                    self.upload_id
                ),
            ),
            UploadError::Expired => self.problem(
                409,
                "upload-expired",
                "Key-set upload expired",
                &format!(
                    "upload {:?} sent nothing for too long and was aborted; start a new one",
                    self.upload_id
                ),
            ),
            UploadError::Push(PushError::Doc(e)) => {
                self.doc_problem("invalid-keyset", "Invalid key set", &e, " (upload aborted)")
            }
            UploadError::Push(PushError::Apply(e)) => self.apply_error(e),
        }
    }

    fn apply_error(&self, e: ApplyError) -> Action {
        let (status, slug, title) = match e {
            ApplyError::Stale { .. } => (
                409,
                "stale-version",
                "Key-set version is not newer than the running one",
            ),
            ApplyError::NoKeySet => (409, "no-keyset", "No key set loaded"),
            ApplyError::Busy => (409, "update-in-progress", "Another key-set update is in progress"),
            ApplyError::UnknownKey { .. } => (400, "unknown-key", "Delta refers to an unknown key"),
            ApplyError::UnknownPlan { .. } => (400, "unknown-plan", "Delta key refers to an unknown plan"),
            ApplyError::Host => (500, "store-failure", "Shared-data write failed"),
        };
        if e == ApplyError::Busy {
            // The other writer's lease or the bounded sweep ends within seconds: say when
            // to come back, so clients (the CLI does) wait instead of failing.
            let body = admin_body(status, slug, title, &e.to_string());
            return self.reply_with(status, &body, &[("retry-after", "1")]);
        }
        self.problem(status, slug, title, &e.to_string())
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is matched
/// case-insensitively (RFC 9110 section 11.1: `bearer` and `BEARER` are the same).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Bodies read whole into the wasm heap have a byte cap; the streamed ones (full push,
/// upload chunks) are bounded by the listener's buffer limit only.
fn body_cap(route: Route) -> Option<usize> {
    match route {
        Route::PostDelta => Some(caps::MAX_DELTA_BODY),
        Route::UploadCommit => Some(caps::MAX_COMMIT_BODY),
        _ => None,
    }
}

/// A fresh upload id: unguessable enough to not collide with a previous upload's.
fn new_upload_id(now_ms: u64) -> String {
    let gen = HostStore.get(crate::core::keyset::names::GEN).0.unwrap_or_default();
    let seed = format!("{now_ms}:{gen:?}:{:p}", &gen);
    hex::encode(&Sha256::digest(seed.as_bytes())[..12])
}

impl Context for AdminRequest {}

impl Drop for AdminRequest {
    /// A request that goes away while its answer is held takes the answer with it.
    fn drop(&mut self) {
        self.shared.held.borrow_mut().forget(self.context_id);
    }
}

impl HttpContext for AdminRequest {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        // Authenticate before looking at the path or method: without the token every
        // request gets the same 401, so paths cannot be probed (404 vs 401).
        if !self.authorized() {
            return self.reply_with(
                401,
                &admin_body(
                    401,
                    "admin-unauthorized",
                    "Admin token required",
                    "Send Authorization: Bearer <admin token>.",
                ),
                &[("www-authenticate", "Bearer realm=\"keymeter-admin\"")],
            );
        }
        let method = host::request_header(":method").unwrap_or_default();
        let full_path = host::request_header(":path").unwrap_or_default();
        let Some(routed) = admin_route::route(&full_path) else {
            return self.problem(404, "not-found", "Not found", "Unknown admin API path.");
        };
        let (route, allow, query) = (routed.route, routed.allow, routed.query);
        self.force = routed.force;
        self.upload_id = routed.upload_id.to_string();
        if method != allow {
            return self.reply_with(
                405,
                &admin_body(
                    405,
                    "method-not-allowed",
                    "Method not allowed",
                    &format!("Use {allow}."),
                ),
                &[("allow", allow)],
            );
        }
        if route == Route::Usage {
            return self.usage(query);
        }
        if route == Route::Status {
            return self.status();
        }
        if let Some(cap) = body_cap(route) {
            let declared = host::request_header("content-length").and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(n) = declared.filter(|n| *n > cap) {
                return self.too_large(n, cap);
            }
        }
        self.route = Some(route);
        if end_of_stream {
            return self.apply(route, 0);
        }
        Action::Pause
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(route) = self.route else {
            return Action::Continue;
        };
        if let Some(cap) = body_cap(route).filter(|cap| body_size > *cap) {
            // Refused as soon as the buffered body passes the cap (chunked bodies
            // have no Content-Length to check up front).
            return self.too_large(body_size, cap);
        }
        if !end_of_stream {
            return Action::Pause; // let Envoy buffer the whole document
        }
        self.apply(route, body_size)
    }
}
