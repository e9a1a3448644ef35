//! Plugin configuration (the JSON string in Envoy's `configuration` field).
//!
//! Parsed strictly (unknown fields are errors) and validated completely in
//! `on_configure`, so Envoy refuses a bad config with a message naming the field instead
//! of running half-configured.

use crate::core::auth::credential::CredentialSources;
use crate::core::auth::jwt::config::{JwtConfig, JwtDoc};
use serde::Deserialize;

/// What one plugin instance does. All roles share one `vm_id`, hence one key set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The public filter: authenticate, limit, meter.
    Filter,
    /// keymeter's admin API on an internal listener.
    Admin,
    /// The key-set pull service: an Envoy bootstrap singleton (`envoy.bootstrap.wasm`)
    /// that polls `source` and applies what it serves. Has no HTTP contexts.
    Service,
}

/// What to do while no key set has been loaded (fresh start, source not reached yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoKeySet {
    /// 503: nobody gets in without a checked key (the default).
    #[default]
    Deny,
    /// Let requests through unauthenticated, logging each: for migrations only.
    Allow,
}

fn d_header() -> Option<String> {
    Some("x-api-key".into())
}
fn d_true() -> bool {
    true
}
fn d_realm() -> String {
    "keymeter".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsDoc {
    #[serde(default = "d_header")]
    header: Option<String>,
    #[serde(default = "d_true")]
    bearer: bool,
    #[serde(default = "d_true")]
    basic: bool,
    #[serde(default)]
    query_param: Option<String>,
}

impl Default for CredentialsDoc {
    fn default() -> Self {
        CredentialsDoc {
            header: d_header(),
            bearer: true,
            basic: true,
            query_param: None,
        }
    }
}

/// Names of the identity headers sent to the backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeaders {
    pub key_id: String,
    pub consumer: String,
    pub plan: String,
    /// How the request was authenticated: `api-key`, `jwt` or `anonymous`.
    pub auth: String,
    /// Prefix for forwarded metadata: `x-keymeter-meta-<name>`.
    pub metadata_prefix: String,
    /// Which of `key_id`, `consumer`, `plan`, `auth` keymeter writes (all by default). Each
    /// write is a host call and clears Envoy's route cache; a header left out is
    /// neither set nor removed, so strip it in the HCM if anything could trust it.
    pub forward: Vec<IdentityField>,
}

/// One of the identity headers keymeter can forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityField {
    KeyId,
    Consumer,
    Plan,
    /// `x-keymeter-auth`: how the request was authenticated.
    Auth,
}

impl IdentityHeaders {
    /// Whether keymeter writes the identity header `f`.
    pub fn forwards(&self, f: IdentityField) -> bool {
        self.forward.contains(&f)
    }
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders {
            key_id: "x-keymeter-key-id".into(),
            consumer: "x-keymeter-consumer".into(),
            plan: "x-keymeter-plan".into(),
            auth: "x-keymeter-auth".into(),
            metadata_prefix: "x-keymeter-meta-".into(),
            forward: vec![
                IdentityField::KeyId,
                IdentityField::Consumer,
                IdentityField::Plan,
                IdentityField::Auth,
            ],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigDoc {
    role: Role,
    #[serde(default)]
    credentials: CredentialsDoc,
    #[serde(default = "d_realm")]
    realm: String,
    #[serde(default)]
    headers: IdentityHeaders,
    #[serde(default)]
    forward_metadata: Vec<String>,
    #[serde(default)]
    keep_credential: bool,
    #[serde(default)]
    when_no_keyset: NoKeySet,
    #[serde(default = "d_true")]
    rate_limit_headers: bool,
    #[serde(default)]
    admin_token_sha256: Option<String>,
    #[serde(default)]
    source: Option<SourceDoc>,
    #[serde(default)]
    export: Option<ExportDoc>,
    #[serde(default)]
    on_contention: OnContention,
    #[serde(default)]
    anonymous: Option<AnonymousDoc>,
    #[serde(default)]
    metering: MeteringDoc,
    #[serde(default)]
    fleet: Option<crate::core::limits::fleet::FleetDoc>,
    jwt: Option<JwtDoc>,
}

/// What to do when a limit's shared state keeps changing under our CAS retries (many
/// workers hammering one key). Either way it is counted, never silent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnContention {
    /// 429, as if the limit were reached (the default: never fail open silently).
    #[default]
    Deny,
    /// Let the request through without consuming.
    Allow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeteringDoc {
    #[serde(default = "d_true")]
    enabled: bool,
    #[serde(default = "d_flush")]
    flush_interval: String,
    #[serde(default = "d_series")]
    max_key_series: u64,
}

fn d_flush() -> String {
    "1s".into()
}
fn d_series() -> u64 {
    1000
}

impl Default for MeteringDoc {
    fn default() -> Self {
        MeteringDoc {
            enabled: true,
            flush_interval: d_flush(),
            max_key_series: d_series(),
        }
    }
}

/// Usage counting: per-worker aggregation flushed on a timer (see `core::usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metering {
    pub enabled: bool,
    pub flush_interval_ms: u64,
    /// Keys (lineages) that get their own labelled Prometheus series, process-wide;
    /// beyond it only per-plan totals grow.
    pub max_key_series: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnonymousDoc {
    plan: String,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub role: Role,
    pub sources: CredentialSources,
    pub realm: String,
    pub headers: IdentityHeaders,
    /// (metadata name, full header name), resolved once here rather than per request.
    pub forward_metadata: Vec<(String, String)>,
    pub keep_credential: bool,
    pub when_no_keyset: NoKeySet,
    pub rate_limit_headers: bool,
    pub admin_token_sha256: Option<[u8; 32]>,
    /// Where role `service` pulls the key set from (role service has `source`, `export`
    /// or both).
    pub source: Option<SourceConfig>,
    /// Where role `service` pushes usage as CloudEvents (see `core::export`).
    pub export: Option<ExportConfig>,
    pub on_contention: OnContention,
    /// Plan (from the key set) for requests without a key, limited per client IP;
    /// `None`: such requests get 401.
    pub anonymous_plan: Option<String>,
    pub metering: Metering,
    /// Fleet mode (role filter): limits shared across Envoys through keymeter-limitd;
    /// `None`: single-node limits in shared data (the default).
    pub fleet: Option<crate::core::limits::fleet::FleetConfig>,
    /// JWT users (claims verified by Envoy's jwt_authn); `None`: off.
    pub jwt: Option<JwtConfig>,
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
}

impl Config {
    pub fn parse(json: &[u8]) -> Result<Config, String> {
        let doc: ConfigDoc = serde_json::from_slice(json).map_err(|e| format!("invalid plugin configuration: {e}"))?;
        let field = |f: &str, m: &str| Err(format!("invalid plugin configuration: {f}: {m}"));
        if let Some(h) = &doc.credentials.header {
            if !is_header_name(h) {
                return field("credentials.header", "must be a lowercase header name");
            }
        }
        if let Some(q) = &doc.credentials.query_param {
            if q.is_empty() || !q.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-') {
                return field("credentials.query_param", "must be a plain parameter name");
            }
        }
        let c = &doc.credentials;
        if doc.role == Role::Filter && c.header.is_none() && !c.bearer && !c.basic && c.query_param.is_none() {
            return field("credentials", "at least one credential source must be enabled");
        }
        if doc.realm.is_empty()
            || !doc
                .realm
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            return field("realm", "must be printable ASCII without quotes or backslashes");
        }
        let h = &doc.headers;
        for (name, v) in [
            ("headers.key_id", &h.key_id),
            ("headers.consumer", &h.consumer),
            ("headers.plan", &h.plan),
            ("headers.auth", &h.auth),
            ("headers.metadata_prefix", &h.metadata_prefix),
        ] {
            if !is_header_name(v) {
                return field(name, "must be a lowercase header name");
            }
        }
        if let Some(a) = &doc.anonymous {
            if !crate::core::limits::plan::is_valid_name(&a.plan) {
                return field("anonymous.plan", "must be a plan name (A-Z a-z 0-9 _ -)");
            }
        }
        let flush_ms = match crate::core::time::parse_duration(&doc.metering.flush_interval) {
            Ok(ms) if (100..=60_000).contains(&ms) => ms,
            Ok(_) => return field("metering.flush_interval", "must be between 100ms and 60s"),
            Err(e) => return field("metering.flush_interval", &e.to_string()),
        };
        let mut forward = Vec::new();
        for (i, m) in doc.forward_metadata.iter().enumerate() {
            if !is_header_name(m) || m.contains('_') {
                return field(&format!("forward_metadata[{i}]"), "must be a metadata name (a-z 0-9 -)");
            }
            forward.push((m.clone(), format!("{}{m}", h.metadata_prefix)));
        }
        let admin_token_sha256 = match (&doc.admin_token_sha256, doc.role) {
            (Some(t), _) => {
                let mut out = [0u8; 32];
                if t.len() != 64 || hex::decode_to_slice(t, &mut out).is_err() {
                    return field(
                        "admin_token_sha256",
                        "must be 64 hex characters (sha256 of the admin token)",
                    );
                }
                Some(out)
            }
            (None, Role::Admin) => return field("admin_token_sha256", "is required for role admin"),
            (None, _) => None,
        };
        let source = match (&doc.source, doc.role) {
            (Some(s), Role::Service) => Some(s.validate()?),
            (None, Role::Service) if doc.export.is_none() => {
                return field(
                    "source",
                    "is required for role service (or export, or both: key-set pull and usage export)",
                )
            }
            (Some(_), _) => return field("source", "is only valid for role service"),
            (None, _) => None,
        };
        let export = match (&doc.export, doc.role) {
            (Some(e), Role::Service) => Some(e.validate()?),
            (Some(_), _) => return field("export", "is only valid for role service"),
            (None, _) => None,
        };
        let fleet = match (&doc.fleet, doc.role) {
            (Some(f), Role::Filter) => Some(f.validate()?),
            (Some(_), _) => return field("fleet", "is only valid for role filter"),
            (None, _) => None,
        };
        let jwt = match (&doc.jwt, doc.role) {
            (Some(j), Role::Filter) => Some(j.validate()?),
            (Some(_), _) => return field("jwt", "is only valid for role filter"),
            (None, _) => None,
        };
        Ok(Config {
            role: doc.role,
            sources: CredentialSources {
                header: c.header.clone(),
                bearer: c.bearer,
                basic: c.basic,
                query_param: c.query_param.clone(),
            },
            realm: doc.realm,
            headers: doc.headers,
            forward_metadata: forward,
            keep_credential: doc.keep_credential,
            when_no_keyset: doc.when_no_keyset,
            rate_limit_headers: doc.rate_limit_headers,
            admin_token_sha256,
            source,
            export,
            on_contention: doc.on_contention,
            anonymous_plan: doc.anonymous.map(|a| a.plan),
            metering: Metering {
                enabled: doc.metering.enabled,
                flush_interval_ms: flush_ms,
                max_key_series: doc.metering.max_key_series,
            },
            fleet,
            jwt,
        })
    }

    /// The `WWW-Authenticate` challenges for a 401, one per enabled HTTP auth scheme.
    pub fn challenges(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.sources.basic {
            v.push(format!("Basic realm=\"{}\", charset=\"UTF-8\"", self.realm));
        }
        if self.sources.bearer {
            v.push(format!("Bearer realm=\"{}\"", self.realm));
        }
        if v.is_empty() {
            v.push(format!("ApiKey realm=\"{}\"", self.realm));
        }
        v
    }
}

fn d_interval() -> String {
    "10s".into()
}
fn d_timeout() -> String {
    "5s".into()
}

/// `source` as written: where the pull service fetches the key-set document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceDoc {
    cluster: String,
    path: String,
    authority: String,
    #[serde(default = "d_interval")]
    interval: String,
    #[serde(default = "d_timeout")]
    timeout: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
}

/// The validated `source` of role service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    /// An Envoy cluster that must exist in the bootstrap.
    pub cluster: String,
    pub path: String,
    pub authority: String,
    /// Time between two polls of a healthy source (also the cap of the retry backoff).
    pub interval_ms: u64,
    /// Per-request timeout of a poll.
    pub timeout_ms: u64,
    /// Extra request headers (e.g. `authorization`); values are secrets, never logged.
    pub headers: Vec<(String, String)>,
}

/// Headers keymeter sets itself, or that would break the request framing.
const RESERVED_SOURCE_HEADERS: &[&str] = &[
    "host",
    "if-none-match",
    "connection",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

/// The validated parts common to `source` and `export`.
struct Endpoint {
    cluster: String,
    path: String,
    authority: String,
    interval_ms: u64,
    timeout_ms: u64,
    headers: Vec<(String, String)>,
}

#[allow(clippy::too_many_arguments)]
fn endpoint(
    prefix: &str,
    cluster: &str,
    path: &str,
    authority: &str,
    interval: &str,
    timeout: &str,
    raw_headers: &std::collections::BTreeMap<String, String>,
    reserved: &[&str],
) -> Result<Endpoint, String> {
    let field = |f: &str, m: &str| format!("invalid plugin configuration: {prefix}.{f}: {m}");
    let printable = |s: &str| s.bytes().all(|b| (0x21..0x7f).contains(&b));
    if cluster.is_empty() || cluster.len() > 255 || !printable(cluster) {
        return Err(field(
            "cluster",
            "must be an Envoy cluster name (printable ASCII, no spaces)",
        ));
    }
    if !path.starts_with('/') || path.len() > 2048 || !printable(path) || path.contains('#') {
        return Err(field(
            "path",
            "must be a request path starting with '/' (printable ASCII, no spaces or '#')",
        ));
    }
    if authority.is_empty()
        || authority.len() > 255
        || !authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b))
    {
        return Err(field(
            "authority",
            "must be a host name with an optional port, e.g. keys.internal:8080",
        ));
    }
    let duration = |f: &str, v: &str, min: u64, max: u64, range: &str| {
        let ms = crate::core::time::parse_duration(v).map_err(|e| field(f, &e.to_string()))?;
        if !(min..=max).contains(&ms) {
            return Err(field(f, &format!("must be between {range}")));
        }
        Ok(ms)
    };
    let interval_ms = duration("interval", interval, 1_000, 86_400_000, "1s and 24h")?;
    let timeout_ms = duration("timeout", timeout, 100, 60_000, "100ms and 60s")?;
    let mut headers = Vec::with_capacity(raw_headers.len());
    for (name, value) in raw_headers {
        let f = format!("headers.{name}");
        if !is_header_name(name) {
            return Err(field(&f, "must be a lowercase header name"));
        }
        if RESERVED_SOURCE_HEADERS.contains(&name.as_str()) || reserved.contains(&name.as_str()) {
            return Err(field(&f, "is set by keymeter or not allowed"));
        }
        // The value is likely a secret: the message never repeats it.
        if value.is_empty() || value.len() > 8192 || !value.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t') {
            return Err(field(&f, "value must be 1-8192 characters of printable ASCII"));
        }
        headers.push((name.clone(), value.clone()));
    }
    Ok(Endpoint {
        cluster: cluster.to_string(),
        path: path.to_string(),
        authority: authority.to_string(),
        interval_ms,
        timeout_ms,
        headers,
    })
}

impl SourceDoc {
    fn validate(&self) -> Result<SourceConfig, String> {
        let e = endpoint(
            "source",
            &self.cluster,
            &self.path,
            &self.authority,
            &self.interval,
            &self.timeout,
            &self.headers,
            &[],
        )?;
        Ok(SourceConfig {
            cluster: e.cluster,
            path: e.path,
            authority: e.authority,
            interval_ms: e.interval_ms,
            timeout_ms: e.timeout_ms,
            headers: e.headers,
        })
    }
}

fn d_max_events() -> usize {
    500
}

/// `export` as written: where the service pushes usage CloudEvents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportDoc {
    cluster: String,
    path: String,
    authority: String,
    #[serde(default = "d_interval")]
    interval: String,
    #[serde(default = "d_timeout")]
    timeout: String,
    #[serde(default = "d_max_events")]
    max_events: usize,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
}

/// The validated `export` of role service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// An Envoy cluster that must exist in the bootstrap (the usage collector).
    pub cluster: String,
    pub path: String,
    pub authority: String,
    /// Time between two batches while the collector is healthy (also the backoff cap).
    pub interval_ms: u64,
    /// Per-request timeout of a POST.
    pub timeout_ms: u64,
    /// Events (one per lineage with new usage) per batch; the rest go in the next one.
    pub max_events: usize,
    /// Extra request headers (e.g. `authorization`); values are secrets, never logged.
    pub headers: Vec<(String, String)>,
}

impl ExportDoc {
    fn validate(&self) -> Result<ExportConfig, String> {
        let e = endpoint(
            "export",
            &self.cluster,
            &self.path,
            &self.authority,
            &self.interval,
            &self.timeout,
            &self.headers,
            &["content-type"],
        )?;
        if !(1..=10_000).contains(&self.max_events) {
            return Err("invalid plugin configuration: export.max_events: must be between 1 and 10000".into());
        }
        Ok(ExportConfig {
            cluster: e.cluster,
            path: e.path,
            authority: e.authority,
            interval_ms: e.interval_ms,
            timeout_ms: e.timeout_ms,
            max_events: self.max_events,
            headers: e.headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::parse(br#"{"role":"filter"}"#).unwrap();
        assert_eq!(c.sources, CredentialSources::default());
        assert_eq!(c.headers, IdentityHeaders::default());
        assert_eq!(c.when_no_keyset, NoKeySet::Deny);
        assert!(!c.keep_credential);
        assert_eq!(
            c.challenges(),
            [
                "Basic realm=\"keymeter\", charset=\"UTF-8\"",
                "Bearer realm=\"keymeter\""
            ]
        );
    }

    #[test]
    fn errors_name_the_field() {
        let e = |j: &str| Config::parse(j.as_bytes()).unwrap_err();
        assert!(e(r#"{"role":"filter","credentails":{}}"#).contains("unknown field `credentails`"));
        assert!(e(r#"{"role":"proxy"}"#).contains("unknown variant `proxy`"));
        assert!(e(r#"{}"#).contains("missing field `role`"));
        assert!(e(r#"{"role":"filter","credentials":{"header":"X-Api-Key"}}"#).contains("credentials.header"));
        assert!(
            e(r#"{"role":"filter","credentials":{"header":null,"bearer":false,"basic":false}}"#)
                .contains("credentials:")
        );
        assert!(e(r#"{"role":"admin"}"#).contains("admin_token_sha256: is required"));
        assert!(e(r#"{"role":"admin","admin_token_sha256":"abc"}"#).contains("admin_token_sha256"));
        assert!(e(r#"{"role":"filter","forward_metadata":["Tier"]}"#).contains("forward_metadata[0]"));
        assert!(e(r#"{"role":"filter","realm":"a\"b"}"#).contains("realm"));
        assert!(e("not json").contains("invalid plugin configuration"));
        assert!(e(r#"{"role":"filter","anonymous":{"plan":"a b"}}"#).contains("anonymous.plan"));
        assert!(e(r#"{"role":"filter","on_contention":"maybe"}"#).contains("maybe"));
        assert!(e(r#"{"role":"filter","metering":{"flush_interval":"5m"}}"#).contains("metering.flush_interval"));
        assert!(e(r#"{"role":"filter","metering":{"flush_intervall":"1s"}}"#).contains("flush_intervall"));
    }

    #[test]
    fn forwarded_metadata_header_names_are_precomputed() {
        let c = Config::parse(br#"{"role":"filter","forward_metadata":["tier"],"credentials":{"header":null,"basic":false,"query_param":"api_key"}}"#).unwrap();
        assert_eq!(
            c.forward_metadata,
            [("tier".to_string(), "x-keymeter-meta-tier".to_string())]
        );
        assert_eq!(c.sources.header, None);
        assert_eq!(c.challenges(), ["Bearer realm=\"keymeter\""]);
    }
}

#[cfg(test)]
mod jwt_tests {
    use super::*;

    fn filter(jwt: &str) -> Result<Config, String> {
        Config::parse(format!(r#"{{"role":"filter","jwt":{jwt}}}"#).as_bytes())
    }

    #[test]
    fn jwt_is_off_by_default() {
        assert!(Config::parse(br#"{"role":"filter"}"#).unwrap().jwt.is_none());
        assert_eq!(
            Config::parse(br#"{"role":"filter"}"#).unwrap().headers.auth,
            "x-keymeter-auth"
        );
    }

    #[test]
    fn jwt_parses_with_defaults() {
        let c = filter(r#"{"payload_key":"jwt_payload","default_plan":"free"}"#).unwrap();
        assert_eq!(
            c.jwt.unwrap(),
            JwtConfig {
                metadata_namespace: "envoy.filters.http.jwt_authn".into(),
                payload_key: "jwt_payload".into(),
                consumer_claim: "sub".into(),
                plan_claim: None,
                default_plan: Some("free".into()),
                key_wins: true,
            }
        );
        let c = filter(
            r#"{"metadata_namespace":"my.ns","payload_key":"p","consumer_claim":"custom:tenant","plan_claim":"custom:plan","key_wins":false}"#,
        )
        .unwrap()
        .jwt
        .unwrap();
        assert_eq!(c.metadata_namespace, "my.ns");
        assert_eq!(c.consumer_claim, "custom:tenant");
        assert_eq!(c.plan_claim.as_deref(), Some("custom:plan"));
        assert_eq!(c.default_plan, None);
        assert!(!c.key_wins);
    }

    #[test]
    fn jwt_errors_name_the_field() {
        let e = |j: &str| filter(j).unwrap_err();
        assert!(e(r#"{"default_plan":"free"}"#).contains("missing field `payload_key`"));
        assert!(e(r#"{"payload_key":"p"}"#).contains("jwt.default_plan: is required when there is no plan_claim"));
        assert!(e(r#"{"payload_key":"","default_plan":"free"}"#).contains("jwt.payload_key"));
        assert!(e(r#"{"payload_key":"a b","default_plan":"free"}"#).contains("jwt.payload_key"));
        assert!(e(r#"{"payload_key":"p","default_plan":"a b"}"#).contains("jwt.default_plan: must be a plan name"));
        assert!(
            e(r#"{"payload_key":"p","default_plan":"f","metadata_namespace":""}"#).contains("jwt.metadata_namespace")
        );
        assert!(e(r#"{"payload_key":"p","default_plan":"f","consumer_claim":""}"#).contains("jwt.consumer_claim"));
        assert!(e(r#"{"payload_key":"p","plan_claim":"x y"}"#).contains("jwt.plan_claim"));
        assert!(e(r#"{"payload_key":"p","default_plan":"f","key_wins":"yes"}"#).contains("expected a boolean"));
        assert!(e(r#"{"payload_key":"p","default_plan":"f","keywins":true}"#).contains("unknown field `keywins`"));
        assert!(Config::parse(br#"{"role":"admin","admin_token_sha256":"0000000000000000000000000000000000000000000000000000000000000000","jwt":{"payload_key":"p","default_plan":"f"}}"#)
            .unwrap_err()
            .contains("jwt: is only valid for role filter"));
        assert!(Config::parse(br#"{"role":"filter","headers":{"auth":"X-Auth"}}"#)
            .unwrap_err()
            .contains("headers.auth"));
    }
}

#[cfg(test)]
mod source_tests {
    use super::*;

    fn service(source: &str) -> Result<Config, String> {
        Config::parse(format!(r#"{{"role":"service","source":{source}}}"#).as_bytes())
    }

    #[test]
    fn fleet_is_off_by_default_and_only_for_filters() {
        assert!(Config::parse(br#"{"role":"filter"}"#).unwrap().fleet.is_none());
        let c = Config::parse(br#"{"role":"filter","fleet":{"cluster":"limitd","fleet_size":3}}"#).unwrap();
        assert_eq!(c.fleet.unwrap().fleet_size, 3);
        let admin = format!(
            r#"{{"role":"admin","admin_token_sha256":"{}","fleet":{{"cluster":"l","fleet_size":1}}}}"#,
            "0".repeat(64)
        );
        let e = Config::parse(admin.as_bytes()).unwrap_err();
        assert!(e.contains("fleet: is only valid for role filter"), "{e}");
        let e = Config::parse(br#"{"role":"filter","fleet":{"cluster":"l","fleet_size":0}}"#).unwrap_err();
        assert!(e.contains("fleet.fleet_size"), "{e}");
    }

    #[test]
    fn service_source_parses_with_defaults() {
        let c = service(r#"{"cluster":"keyset_source","path":"/keyset.json","authority":"keys.internal"}"#).unwrap();
        assert_eq!(c.role, Role::Service);
        assert_eq!(
            c.source.unwrap(),
            SourceConfig {
                cluster: "keyset_source".into(),
                path: "/keyset.json".into(),
                authority: "keys.internal".into(),
                interval_ms: 10_000,
                timeout_ms: 5_000,
                headers: vec![],
            }
        );
        let c = service(
            r#"{"cluster":"c","path":"/k?x=1","authority":"keys.internal:8443","interval":"1m","timeout":"500ms","headers":{"authorization":"Bearer abc","x-fleet":"eu"}}"#,
        )
        .unwrap();
        let s = c.source.unwrap();
        assert_eq!((s.interval_ms, s.timeout_ms), (60_000, 500));
        assert_eq!(
            s.headers,
            [
                ("authorization".to_string(), "Bearer abc".to_string()),
                ("x-fleet".to_string(), "eu".to_string())
            ]
        );
        assert!(Config::parse(br#"{"role":"filter"}"#).unwrap().source.is_none());
    }

    #[test]
    fn source_errors_name_the_field() {
        let ok = r#""cluster":"c","path":"/k","authority":"a""#;
        let e = |extra: &str| service(&format!("{{{ok}{extra}}}")).unwrap_err();
        assert!(Config::parse(br#"{"role":"service"}"#)
            .unwrap_err()
            .contains("source: is required for role service (or export"));
        assert!(
            Config::parse(br#"{"role":"filter","source":{"cluster":"c","path":"/k","authority":"a"}}"#)
                .unwrap_err()
                .contains("source: is only valid for role service")
        );
        assert!(service(r#"{"path":"/k","authority":"a"}"#)
            .unwrap_err()
            .contains("missing field `cluster`"));
        assert!(e(r#","intervall":"1s""#).contains("unknown field `intervall`"));
        assert!(service(r#"{"cluster":"a b","path":"/k","authority":"a"}"#)
            .unwrap_err()
            .contains("source.cluster"));
        assert!(service(r#"{"cluster":"c","path":"k","authority":"a"}"#)
            .unwrap_err()
            .contains("source.path"));
        assert!(service(r#"{"cluster":"c","path":"/k","authority":"a/b"}"#)
            .unwrap_err()
            .contains("source.authority"));
        assert!(e(r#","interval":"10""#).contains("source.interval: "));
        assert!(e(r#","interval":"10x""#).contains("source.interval"));
        assert!(e(r#","interval":"500ms""#).contains("source.interval: must be between 1s and 24h"));
        assert!(e(r#","timeout":"2m""#).contains("source.timeout: must be between"));
        assert!(e(r#","timeout":"0s""#).contains("source.timeout"));
        assert!(e(r#","headers":{"Authorization":"x"}"#).contains("source.headers.Authorization"));
        assert!(e(r#","headers":{"if-none-match":"x"}"#).contains("source.headers.if-none-match"));
        let secret = e(r#","headers":{"authorization":"Bearer s3cr3t\n"}"#);
        assert!(secret.contains("source.headers.authorization"), "{secret}");
        assert!(!secret.contains("s3cr3t"), "the message repeats a secret: {secret}");
    }
}

#[cfg(test)]
mod export_tests {
    use super::*;

    fn service(body: &str) -> Result<Config, String> {
        Config::parse(format!(r#"{{"role":"service",{body}}}"#).as_bytes())
    }
    const OK: &str = r#""cluster":"usage_collector","path":"/api/v1/events","authority":"collector.internal""#;

    #[test]
    fn export_parses_alone_or_with_source() {
        let c = service(&format!(r#""export":{{{OK}}}"#)).unwrap();
        assert!(c.source.is_none());
        assert_eq!(
            c.export.unwrap(),
            ExportConfig {
                cluster: "usage_collector".into(),
                path: "/api/v1/events".into(),
                authority: "collector.internal".into(),
                interval_ms: 10_000,
                timeout_ms: 5_000,
                max_events: 500,
                headers: vec![],
            }
        );
        let c = service(&format!(
            r#""source":{{"cluster":"k","path":"/k","authority":"k"}},"export":{{{OK},"interval":"1s","timeout":"300ms","max_events":2,"headers":{{"authorization":"Bearer t"}}}}"#
        ))
        .unwrap();
        assert!(c.source.is_some());
        let e = c.export.unwrap();
        assert_eq!((e.interval_ms, e.timeout_ms, e.max_events), (1_000, 300, 2));
        assert_eq!(e.headers, [("authorization".to_string(), "Bearer t".to_string())]);
    }

    #[test]
    fn export_errors_name_the_field() {
        let e = |extra: &str| service(&format!(r#""export":{{{OK}{extra}}}"#)).unwrap_err();
        assert!(e(r#","max_events":0"#).contains("export.max_events"));
        assert!(e(r#","max_events":10001"#).contains("export.max_events"));
        assert!(e(r#","interval":"100ms""#).contains("export.interval: must be between 1s and 24h"));
        assert!(e(r#","timeout":"2m""#).contains("export.timeout"));
        assert!(e(r#","headers":{"content-type":"x"}"#).contains("export.headers.content-type"));
        assert!(e(r#","headers":{"Authorization":"x"}"#).contains("export.headers.Authorization"));
        assert!(e(r#","batch":1"#).contains("unknown field `batch`"));
        let secret = e(r#","headers":{"authorization":"s3cr3t\n"}"#);
        assert!(secret.contains("export.headers.authorization") && !secret.contains("s3cr3t"));
        assert!(service(r#""export":{"cluster":"c b","path":"/e","authority":"a"}"#)
            .unwrap_err()
            .contains("export.cluster"));
        assert!(service(r#""export":{"cluster":"c","path":"e","authority":"a"}"#)
            .unwrap_err()
            .contains("export.path"));
        assert!(
            Config::parse(format!(r#"{{"role":"filter","export":{{{OK}}}}}"#).as_bytes())
                .unwrap_err()
                .contains("export: is only valid for role service")
        );
    }
}
