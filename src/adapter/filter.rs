//! The public filter: authenticate, authorize, forward identity.

use super::host::{self, HostStore};
use super::root::Shared;
use crate::core::api_key::hashes_equal;
use crate::core::config::NoKeySet;
use crate::core::credential::{self, CredentialError, Field, Source};
use crate::core::key_record::{KeyRecord, Refusal};
use crate::core::problem::Problem;
use crate::core::shared_layout::{key_entry_name, read_meta, KeyEntry};
use crate::core::store::Store;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use std::rc::Rc;

pub struct FilterRequest {
    shared: Rc<Shared>,
}

impl FilterRequest {
    pub fn new(shared: Rc<Shared>) -> Self {
        FilterRequest { shared }
    }

    fn refuse(&self, problem: Problem) -> Action {
        let body = self.shared.bodies.get(&problem).map(String::as_bytes);
        let mut headers = vec![
            ("content-type", "application/problem+json"),
            ("cache-control", "no-store"),
        ];
        if problem.status() == 401 {
            for c in &self.shared.challenges {
                headers.push(("www-authenticate", c.as_str()));
            }
        }
        self.send_http_response(problem.status(), headers, body);
        Action::Pause
    }

    /// Identity headers are always set or removed (never passed through from the
    /// client), so a backend can trust them.
    fn forward_identity(&self, rec: Option<&KeyRecord>) {
        let h = &self.shared.config.headers;
        self.set_http_request_header(&h.key_id, rec.map(|r| r.id.as_str()));
        self.set_http_request_header(&h.consumer, rec.map(|r| r.consumer.as_str()));
        self.set_http_request_header(&h.plan, rec.map(|r| r.plan.as_str()));
        for (name, header) in &self.shared.config.forward_metadata {
            self.set_http_request_header(header, rec.and_then(|r| r.metadata(name)));
        }
    }

    fn strip_credential(&self, source: Source, path: Option<&str>) {
        let cfg = &self.shared.config;
        if cfg.keep_credential {
            return;
        }
        match source {
            Source::Header => self.set_http_request_header(
                cfg.sources.header.as_deref().unwrap_or("x-api-key"),
                None,
            ),
            Source::Bearer | Source::Basic => self.set_http_request_header("authorization", None),
            Source::Query => {
                if let (Some(p), Some(name)) = (path, &cfg.sources.query_param) {
                    self.set_http_request_header(
                        ":path",
                        Some(&credential::strip_query_param(p, name)),
                    );
                }
            }
        }
    }

    fn authenticate(&mut self) -> Action {
        let store = HostStore;
        let Some(meta) = read_meta(&store) else {
            return match self.shared.config.when_no_keyset {
                NoKeySet::Deny => self.refuse(Problem::KeySetUnavailable),
                NoKeySet::Allow => {
                    log::warn!(
                        "keymeter: no key set loaded, letting a request through unauthenticated"
                    );
                    self.forward_identity(None);
                    Action::Continue
                }
            };
        };
        let cfg = &self.shared.config;
        let mut path: Option<String> = None;
        let found = credential::find(&cfg.sources, |f| match f {
            Field::ApiKeyHeader => self.get_http_request_header(cfg.sources.header.as_deref()?),
            Field::Authorization => self.get_http_request_header("authorization"),
            Field::Path => {
                path = self.get_http_request_header(":path");
                path.clone()
            }
        });
        let cred = match found {
            Ok(c) => c,
            Err(CredentialError::Missing) => return self.refuse(Problem::MissingCredential),
            Err(CredentialError::Malformed(_) | CredentialError::BadChecksum(_)) => {
                return self.refuse(Problem::MalformedCredential)
            }
        };
        let key = cred.key();
        let mut name_buf = [0u8; 32];
        let (bytes, _) = store.get(key_entry_name(key.id(), &mut name_buf));
        let entry = bytes
            .filter(|b| !b.is_empty())
            .and_then(|b| KeyEntry::decode(&b));
        let Some(rec) = entry.as_ref().and_then(|e| e.active(&meta)) else {
            return self.refuse(Problem::InvalidCredential);
        };
        if !hashes_equal(&key.hash(), &rec.hash) {
            return self.refuse(Problem::InvalidCredential);
        }
        let method = self.get_http_request_header(":method").unwrap_or_default();
        if path.is_none() {
            path = self.get_http_request_header(":path");
        }
        let peer = if rec.cidrs.is_empty() {
            None
        } else {
            host::peer_ip()
        };
        let now_secs = (host::now_ms() / 1000) as i64;
        if let Err(r) = rec.admit(now_secs, &method, path.as_deref().unwrap_or("/"), peer) {
            return self.refuse(match r {
                Refusal::Disabled => Problem::KeyDisabled,
                Refusal::NotYetValid => Problem::KeyNotYetValid,
                Refusal::Expired => Problem::KeyExpired,
                Refusal::OutOfScope => Problem::OutOfScope,
                Refusal::AddressNotAllowed => Problem::AddressNotAllowed,
            });
        }
        self.forward_identity(Some(rec));
        self.strip_credential(cred.source, path.as_deref());
        Action::Continue
    }
}

impl Context for FilterRequest {}

impl HttpContext for FilterRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.authenticate()
    }
}
