//! Plugin configuration (the JSON string in Envoy's `configuration` field).
//!
//! Parsed strictly (unknown fields are errors) and validated completely in
//! `on_configure`, so Envoy refuses a bad config with a message naming the field instead
//! of running half-configured.

use super::credential::CredentialSources;
use serde::Deserialize;

/// What one plugin instance does. All roles share one `vm_id`, hence one key set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The public filter: authenticate, limit, meter.
    Filter,
    /// keymeter's admin API on an internal listener.
    Admin,
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
    /// Prefix for forwarded metadata: `x-keymeter-meta-<name>`.
    pub metadata_prefix: String,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders {
            key_id: "x-keymeter-key-id".into(),
            consumer: "x-keymeter-consumer".into(),
            plan: "x-keymeter-plan".into(),
            metadata_prefix: "x-keymeter-meta-".into(),
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
}

fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_')
}

impl Config {
    pub fn parse(json: &[u8]) -> Result<Config, String> {
        let doc: ConfigDoc = serde_json::from_slice(json)
            .map_err(|e| format!("invalid plugin configuration: {e}"))?;
        let field = |f: &str, m: &str| Err(format!("invalid plugin configuration: {f}: {m}"));
        if let Some(h) = &doc.credentials.header {
            if !is_header_name(h) {
                return field("credentials.header", "must be a lowercase header name");
            }
        }
        if let Some(q) = &doc.credentials.query_param {
            if q.is_empty()
                || !q
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
            {
                return field("credentials.query_param", "must be a plain parameter name");
            }
        }
        let c = &doc.credentials;
        if doc.role == Role::Filter
            && c.header.is_none()
            && !c.bearer
            && !c.basic
            && c.query_param.is_none()
        {
            return field(
                "credentials",
                "at least one credential source must be enabled",
            );
        }
        if doc.realm.is_empty()
            || !doc
                .realm
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            return field(
                "realm",
                "must be printable ASCII without quotes or backslashes",
            );
        }
        let h = &doc.headers;
        for (name, v) in [
            ("headers.key_id", &h.key_id),
            ("headers.consumer", &h.consumer),
            ("headers.plan", &h.plan),
            ("headers.metadata_prefix", &h.metadata_prefix),
        ] {
            if !is_header_name(v) {
                return field(name, "must be a lowercase header name");
            }
        }
        let mut forward = Vec::new();
        for (i, m) in doc.forward_metadata.iter().enumerate() {
            if !is_header_name(m) || m.contains('_') {
                return field(
                    &format!("forward_metadata[{i}]"),
                    "must be a metadata name (a-z 0-9 -)",
                );
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
            (None, Role::Admin) => {
                return field("admin_token_sha256", "is required for role admin")
            }
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
        assert!(
            e(r#"{"role":"filter","credentials":{"header":"X-Api-Key"}}"#)
                .contains("credentials.header")
        );
        assert!(e(
            r#"{"role":"filter","credentials":{"header":null,"bearer":false,"basic":false}}"#
        )
        .contains("credentials:"));
        assert!(e(r#"{"role":"admin"}"#).contains("admin_token_sha256: is required"));
        assert!(e(r#"{"role":"admin","admin_token_sha256":"abc"}"#).contains("admin_token_sha256"));
        assert!(
            e(r#"{"role":"filter","forward_metadata":["Tier"]}"#).contains("forward_metadata[0]")
        );
        assert!(e(r#"{"role":"filter","realm":"a\"b"}"#).contains("realm"));
        assert!(e("not json").contains("invalid plugin configuration"));
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
