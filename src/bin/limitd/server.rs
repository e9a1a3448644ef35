//! HTTP API (JSON): `POST /v1/lease`, `POST /v1/take`, `POST /v1/peek`, `GET /healthz`,
//! `GET /metrics`.
//!
//! Errors are RFC 9457 problem bodies like the filter's: 400 for a request that will
//! never succeed (the detail names the field), 503 when Redis did not answer within the
//! configured timeout (the node's circuit breaker counts these), 500 for a script answer
//! of the wrong shape.

use crate::metrics::Metrics;
use crate::scripts::{lease_call, lease_response, quota_key_at, take_call, take_response};
use crate::store::{Store, StoreError};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use keymeter::core::remote::fleet_protocol::{LeaseRequest, PeekQuota, PeekRequest, TakeRequest};
use redis::Script;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub struct App {
    pub store: Store,
    pub lease_script: Script,
    pub take_script: Script,
    pub metrics: Metrics,
    pub forget_ms: u64,
    /// How long takes are remembered by id (`--take-record-ms`).
    pub take_record_ms: u64,
    /// Unix second of the last Redis error logged: at most one line a second.
    last_error_log: AtomicU64,
}

impl App {
    pub fn new(store: Store, forget_ms: u64, take_record_ms: u64) -> App {
        App {
            store,
            lease_script: crate::scripts::script(crate::scripts::LEASE_LUA),
            take_script: crate::scripts::script(crate::scripts::TAKE_LUA),
            metrics: Metrics::default(),
            forget_ms,
            take_record_ms,
            last_error_log: AtomicU64::new(0),
        }
    }

    fn store_failed(&self, e: &StoreError) -> Response {
        match e {
            StoreError::Timeout => Metrics::add(&self.metrics.redis_timeouts, 1),
            StoreError::Redis(_) => Metrics::add(&self.metrics.redis_errors, 1),
        }
        let now = now_secs() as u64;
        if self.last_error_log.swap(now, Relaxed) != now {
            eprintln!("keymeter-limitd: {e}");
        }
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "store-unavailable",
            "Fleet store unavailable",
            "Redis did not answer in time; the node keeps deciding from its leases.",
        )
    }

    fn bad_request(&self, detail: &str) -> Response {
        Metrics::add(&self.metrics.bad_requests, 1);
        problem(StatusCode::BAD_REQUEST, "invalid-request", "Invalid request", detail)
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn problem(status: StatusCode, slug: &str, title: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": format!("urn:keymeter:problem:{slug}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/lease", post(lease))
        .route("/v1/take", post(take))
        .route("/v1/peek", post(peek))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .with_state(app)
}

async fn lease(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let req: LeaseRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return app.bad_request(&format!("invalid lease request: {e}")),
    };
    if let Err(e) = req.validate() {
        return app.bad_request(&e);
    }
    let (keys, args, periods) = lease_call(&req, now_secs(), app.forget_ms, app.take_record_ms);
    let t0 = Instant::now();
    let result = app.store.eval(&app.lease_script, &keys, &args).await;
    Metrics::add(&app.metrics.redis_micros, t0.elapsed().as_micros() as u64);
    let r = match result {
        Ok(r) => r,
        Err(e) => return app.store_failed(&e),
    };
    Metrics::add(&app.metrics.lease_calls, 1);
    match lease_response(&req, &periods, &r) {
        Some(resp) => {
            if !resp.applied {
                Metrics::add(&app.metrics.lease_replays, 1);
            }
            Metrics::add(&app.metrics.units_granted, resp.granted);
            Json(resp).into_response()
        }
        None => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Unexpected script answer",
            "The lease script answered in an unexpected shape.",
        ),
    }
}

async fn take(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let req: TakeRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return app.bad_request(&format!("invalid take request: {e}")),
    };
    if let Err(e) = req.validate() {
        return app.bad_request(&e);
    }
    let (keys, args, periods) = take_call(&req, now_secs(), app.take_record_ms);
    let t0 = Instant::now();
    let result = app.store.eval(&app.take_script, &keys, &args).await;
    Metrics::add(&app.metrics.redis_micros, t0.elapsed().as_micros() as u64);
    let r = match result {
        Ok(r) => r,
        Err(e) => return app.store_failed(&e),
    };
    Metrics::add(&app.metrics.take_calls, 1);
    match take_response(&req, &periods, &r) {
        Some(resp) => Json(resp).into_response(),
        None => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Unexpected script answer",
            "The take script answered in an unexpected shape.",
        ),
    }
}

async fn peek(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let req: PeekRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return app.bad_request(&format!("invalid peek request: {e}")),
    };
    if let Err(e) = req.validate() {
        return app.bad_request(&e);
    }
    let now = now_secs();
    let mut out = Vec::with_capacity(req.quotas.len());
    for q in &req.quotas {
        let (key, start, _) = quota_key_at(&req.subject, q, now);
        let fields = match app.store.hgetall(&key).await {
            Ok(f) => f,
            Err(e) => return app.store_failed(&e),
        };
        let mut view = PeekQuota {
            name: q.name.clone(),
            period_start: start,
            consumed: 0,
            holders: Default::default(),
        };
        for (f, v) in fields {
            let v: u64 = v.parse().unwrap_or(0);
            if f == "c" {
                view.consumed = v;
            } else if let Some(node) = f.strip_prefix("o:") {
                view.holders.insert(node.to_string(), v);
            }
        }
        out.push(view);
    }
    Json(serde_json::json!({ "quotas": out })).into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.store.ping().await {
        Ok(()) => (StatusCode::OK, Json(serde_json::json!({"redis": "ok"}))).into_response(),
        Err(e) => app.store_failed(&e),
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}
