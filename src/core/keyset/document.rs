//! The key-set document: what ops write, push and pull (JSON), its complete validation,
//! and its compiled form.
//!
//! Validation is all-or-nothing and happens before anything is applied, so a bad push
//! never leaves a half-updated set; every error names the entry and the field.

use crate::core::auth::api_key::is_valid_id;
use crate::core::auth::cidr::Cidr;
use crate::core::auth::key_record::{stored_hash, KeyRecord};
use crate::core::auth::scope::Scope;
use crate::core::limits::plan::{is_valid_name, LimitsDoc, Plan, PlanDoc};
use crate::core::time::parse_rfc3339;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeDoc {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    pub path_prefix: String,
}

fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}

/// One key as written in a key set. Holds the hash, never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDoc {
    pub id: String,
    /// Lowercase hex sha256 of the full key.
    pub hash: String,
    pub consumer: String,
    pub plan: String,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<ScopeDoc>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsDoc>,
}

/// A full key set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySetDoc {
    /// Monotonic; a push older than the running version is refused unless forced.
    pub version: u64,
    #[serde(default)]
    pub plans: BTreeMap<String, PlanDoc>,
    #[serde(default)]
    pub keys: Vec<KeyDoc>,
}

/// One day-to-day change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeltaOp {
    /// Create or replace a key.
    Upsert {
        key: KeyDoc,
    },
    /// Remove a key: it stops working at once.
    Revoke {
        id: String,
    },
    Disable {
        id: String,
    },
    Enable {
        id: String,
    },
    /// Create or replace a plan.
    SetPlan {
        name: String,
        plan: PlanDoc,
    },
}

/// A batch of changes applied together on top of the running set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaDoc {
    pub version: u64,
    pub ops: Vec<DeltaOp>,
}

/// A validated, compiled key set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySet {
    pub version: u64,
    pub plans: BTreeMap<String, Plan>,
    pub keys: Vec<KeyRecord>,
}

/// Where validation failed: `at` is a path like `keys[3] (id "AbC…")` plus the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocError {
    pub at: String,
    pub message: String,
}

impl DocError {
    /// A size cap was exceeded (HTTP 422), rather than the document being invalid (400).
    pub fn is_over_limit(&self) -> bool {
        crate::core::caps::is_over_limit(&self.message)
    }
}

impl std::fmt::Display for DocError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.at.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.at, self.message)
        }
    }
}

fn err(at: impl Into<String>, message: impl Into<String>) -> DocError {
    DocError {
        at: at.into(),
        message: message.into(),
    }
}

/// Parses JSON, reporting serde's line/column on syntax or shape errors.
pub fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, DocError> {
    serde_json::from_slice(body).map_err(|e| err("", format!("invalid document: {e}")))
}

fn valid_metadata_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// Metadata values go into request headers: printable ASCII only, so no header injection.
fn valid_metadata_value(s: &str) -> bool {
    s.len() <= 512 && s.bytes().all(|c| (0x20..0x7f).contains(&c))
}

fn time_field(at: &str, field: &str, v: &Option<String>) -> Result<Option<i64>, DocError> {
    v.as_deref()
        .map(|t| parse_rfc3339(t).map_err(|e| err(format!("{at}.{field}"), e.to_string())))
        .transpose()
}

impl KeyDoc {
    /// Validates one key against the names of the plans it may refer to. `at` locates it
    /// in the document for error messages (`keys[3]`, `ops[1].key`).
    pub fn compile(&self, at: &str, plan_exists: impl Fn(&str) -> bool) -> Result<KeyRecord, DocError> {
        if !is_valid_id(&self.id) {
            return Err(err(format!("{at}.id"), "must be 12 characters of A-Z a-z 0-9"));
        }
        let at = format!("{at} (id \"{}\")", self.id);
        let field = |f: &str| format!("{at}.{f}");
        let mut hash = [0u8; 32];
        if self.hash.len() != 64
            || self.hash.bytes().any(|c| c.is_ascii_uppercase())
            || hex::decode_to_slice(&self.hash, &mut hash).is_err()
        {
            return Err(err(
                field("hash"),
                "must be 64 lowercase hex characters (sha256 of the key)",
            ));
        }
        if !is_valid_name(&self.consumer) {
            return Err(err(field("consumer"), "must be 1-64 characters of A-Z a-z 0-9 _ -"));
        }
        if !plan_exists(&self.plan) {
            return Err(err(field("plan"), format!("unknown plan '{}'", self.plan)));
        }
        let not_before = time_field(&at, "not_before", &self.not_before)?;
        let expires_at = time_field(&at, "expires_at", &self.expires_at)?;
        if let (Some(a), Some(b)) = (not_before, expires_at) {
            if a >= b {
                return Err(err(field("expires_at"), "must be after not_before"));
            }
        }
        use crate::core::caps::{check, MAX_CIDRS, MAX_METADATA, MAX_SCOPES};
        check(self.scopes.len(), MAX_SCOPES, "scopes", "key").map_err(|e| err(field("scopes"), e))?;
        check(self.cidrs.len(), MAX_CIDRS, "CIDRs", "key").map_err(|e| err(field("cidrs"), e))?;
        check(self.metadata.len(), MAX_METADATA, "metadata entries", "key").map_err(|e| err(field("metadata"), e))?;
        let mut scopes = Vec::with_capacity(self.scopes.len());
        for (i, s) in self.scopes.iter().enumerate() {
            scopes.push(Scope::new(&s.methods, &s.path_prefix).map_err(|e| err(field(&format!("scopes[{i}]")), e))?);
        }
        let mut cidrs = Vec::with_capacity(self.cidrs.len());
        for (i, c) in self.cidrs.iter().enumerate() {
            cidrs.push(Cidr::parse(c).map_err(|e| err(field(&format!("cidrs[{i}]")), e))?);
        }
        for (k, v) in &self.metadata {
            if !valid_metadata_name(k) {
                return Err(err(
                    field("metadata"),
                    format!("name '{k}' must be 1-64 characters of a-z 0-9 -"),
                ));
            }
            if !valid_metadata_value(v) {
                return Err(err(
                    field(&format!("metadata.{k}")),
                    "must be at most 512 printable ASCII characters",
                ));
            }
        }
        if let Some(l) = &self.lineage {
            if !is_valid_id(l) {
                return Err(err(field("lineage"), "must be a key id (12 characters of A-Z a-z 0-9)"));
            }
        }
        let limits = match &self.limits {
            None => None,
            Some(l) => Some(l.compile().map_err(|e| err(field("limits"), e))?),
        };
        Ok(KeyRecord {
            id: self.id.clone(),
            hash: stored_hash(&hash),
            consumer: self.consumer.clone(),
            plan: self.plan.clone(),
            enabled: self.enabled,
            not_before,
            expires_at,
            scopes,
            cidrs,
            metadata: self.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            lineage: self.lineage.clone(),
            limits,
        })
    }
}

pub fn compile_plan(name: &str, doc: &PlanDoc, at: &str) -> Result<Plan, DocError> {
    if !is_valid_name(name) {
        return Err(err(
            at,
            format!("plan name '{name}' must be 1-64 characters of A-Z a-z 0-9 _ -"),
        ));
    }
    doc.compile().map_err(|e| err(format!("{at}.{name}"), e))
}

impl KeySetDoc {
    /// Validates everything and compiles; the first error is returned.
    pub fn compile(&self) -> Result<KeySet, DocError> {
        if self.version == 0 {
            return Err(err("version", "must be >= 1"));
        }
        let mut plans = BTreeMap::new();
        for (name, p) in &self.plans {
            plans.insert(name.clone(), compile_plan(name, p, "plans")?);
        }
        let mut seen = HashSet::with_capacity(self.keys.len());
        let mut keys = Vec::with_capacity(self.keys.len());
        for (i, k) in self.keys.iter().enumerate() {
            let rec = k.compile(&format!("keys[{i}]"), |p| plans.contains_key(p))?;
            if !seen.insert(k.id.as_str()) {
                return Err(err(format!("keys[{i}].id"), format!("duplicate key id \"{}\"", k.id)));
            }
            keys.push(rec);
        }
        Ok(KeySet {
            version: self.version,
            plans,
            keys,
        })
    }
}

/// A validated delta, ready to apply (serialisable: an interrupted delta is kept in
/// `km/delta` until finished).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CompiledOp {
    Upsert(KeyRecord),
    Revoke(String),
    SetEnabled(String, bool),
    SetPlan(String, Plan),
}

impl DeltaDoc {
    /// Validates against the plans of the running set (plus plans the delta itself sets).
    pub fn compile(&self, running_plan: impl Fn(&str) -> bool) -> Result<Vec<CompiledOp>, DocError> {
        if self.version == 0 {
            return Err(err("version", "must be >= 1"));
        }
        let new_plans: HashSet<&str> = self
            .ops
            .iter()
            .filter_map(|o| match o {
                DeltaOp::SetPlan { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        let plan_exists = |p: &str| new_plans.contains(p) || running_plan(p);
        let mut out = Vec::with_capacity(self.ops.len());
        for (i, op) in self.ops.iter().enumerate() {
            let at = format!("ops[{i}]");
            let id_ok = |id: &String| {
                if is_valid_id(id) {
                    Ok(id.clone())
                } else {
                    Err(err(format!("{at}.id"), "must be 12 characters of A-Z a-z 0-9"))
                }
            };
            out.push(match op {
                DeltaOp::Upsert { key } => CompiledOp::Upsert(key.compile(&format!("{at}.key"), plan_exists)?),
                DeltaOp::Revoke { id } => CompiledOp::Revoke(id_ok(id)?),
                DeltaOp::Disable { id } => CompiledOp::SetEnabled(id_ok(id)?, false),
                DeltaOp::Enable { id } => CompiledOp::SetEnabled(id_ok(id)?, true),
                DeltaOp::SetPlan { name, plan } => CompiledOp::SetPlan(name.clone(), compile_plan(name, plan, &at)?),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> KeySetDoc {
        parse_json(
            br#"{"version": 3,
                "plans": {"free": {"rate_limits": [{"name":"rps","rate":5,"per":"1s"}]}},
                "keys": [{"id":"AbCdEf012345","hash":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                          "consumer":"acme","plan":"free","expires_at":"2030-01-01T00:00:00Z",
                          "scopes":[{"methods":["GET"],"path_prefix":"/v1"}],"cidrs":["10.0.0.0/8"],
                          "metadata":{"tier":"gold"}}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn compiles_a_good_document() {
        let ks = doc().compile().unwrap();
        assert_eq!(ks.version, 3);
        let k = &ks.keys[0];
        assert_eq!(k.expires_at, Some(1893456000));
        assert!(k.enabled);
        assert_eq!(k.metadata, vec![("tier".to_string(), "gold".to_string())]);
    }

    fn error_of(f: impl FnOnce(&mut KeySetDoc)) -> String {
        let mut d = doc();
        f(&mut d);
        d.compile().unwrap_err().to_string()
    }

    #[test]
    fn every_error_names_entry_and_field() {
        assert_eq!(error_of(|d| d.version = 0), "version: must be >= 1");
        assert!(error_of(|d| d.keys[0].id = "short".into()).starts_with("keys[0].id:"));
        assert!(error_of(|d| d.keys[0].hash = "AB".into()).starts_with("keys[0] (id \"AbCdEf012345\").hash:"));
        assert!(error_of(|d| d.keys[0].hash = d.keys[0].hash.to_uppercase()).contains(".hash:"));
        assert!(error_of(|d| d.keys[0].plan = "gold".into()).contains(".plan: unknown plan 'gold'"));
        assert!(error_of(|d| d.keys[0].consumer = "a b".into()).contains(".consumer:"));
        assert!(error_of(|d| d.keys[0].expires_at = Some("2030-02-30T00:00:00Z".into())).contains(".expires_at:"));
        assert!(error_of(|d| d.keys[0].not_before = Some("2031-01-01T00:00:00Z".into())).contains("after not_before"));
        assert!(error_of(|d| d.keys[0].cidrs.push("10.0.0.1/8".into())).contains(".cidrs[1]:"));
        assert!(error_of(|d| d.keys[0].scopes[0].methods.push("get".into())).contains(".scopes[0]:"));
        assert!(error_of(|d| {
            d.keys[0].metadata.insert("x".into(), "a\r\nb".into());
        })
        .contains(".metadata.x:"));
        assert!(error_of(|d| {
            d.keys[0].metadata.insert("X_Y".into(), "v".into());
        })
        .contains(".metadata: name 'X_Y'"));
        assert!(error_of(|d| d.keys.push(d.keys[0].clone())).starts_with("keys[1].id: duplicate"));
        assert!(error_of(|d| d.plans.get_mut("free").unwrap().rate_limits[0].rate = 0).starts_with("plans.free:"));
        assert!(error_of(|d| d.keys[0].lineage = Some("x".into())).contains(".lineage:"));
    }

    #[test]
    fn caps_are_errors_of_their_own_naming_key_and_field() {
        use crate::core::caps::*;
        let at_cap = |d: &mut KeySetDoc| {
            let k = &mut d.keys[0];
            k.scopes = (0..MAX_SCOPES)
                .map(|i| ScopeDoc {
                    methods: vec![],
                    path_prefix: format!("/p{i}"),
                })
                .collect();
            k.cidrs = (0..MAX_CIDRS).map(|i| format!("10.0.{i}.0/24")).collect();
            k.metadata = (0..MAX_METADATA).map(|i| (format!("m{i}"), "v".into())).collect();
        };
        let mut d = doc();
        at_cap(&mut d);
        d.compile().unwrap();
        let over = |f: fn(&mut KeyDoc)| {
            let mut d = doc();
            at_cap(&mut d);
            f(&mut d.keys[0]);
            d.compile().unwrap_err()
        };
        let e = over(|k| k.scopes.push(k.scopes[0].clone()));
        assert!(e.is_over_limit());
        assert_eq!(
            e.to_string(),
            "keys[0] (id \"AbCdEf012345\").scopes: over the limit: 65 scopes, at most 64 per key"
        );
        assert!(over(|k| k.cidrs.push("10.1.0.0/16".into()))
            .to_string()
            .contains(".cidrs: over the limit: 257 CIDRs"));
        assert!(over(|k| {
            k.metadata.insert("zz".into(), "v".into());
        })
        .to_string()
        .contains(".metadata: over the limit: 33 metadata entries"));
        let e = over(|k| {
            k.limits = Some(parse_json(br#"{"quotas":[
                {"name":"a","period":"day","limit":1},{"name":"b","period":"day","limit":1},{"name":"c","period":"day","limit":1},
                {"name":"d","period":"day","limit":1},{"name":"e","period":"day","limit":1},{"name":"f","period":"day","limit":1},
                {"name":"g","period":"day","limit":1},{"name":"h","period":"day","limit":1},{"name":"i","period":"day","limit":1},
                {"name":"j","period":"day","limit":1},{"name":"k","period":"day","limit":1},{"name":"l","period":"day","limit":1},
                {"name":"m","period":"day","limit":1},{"name":"n","period":"day","limit":1},{"name":"o","period":"day","limit":1},
                {"name":"p","period":"day","limit":1},{"name":"q","period":"day","limit":1}]}"#).unwrap())
        });
        assert!(
            e.is_over_limit() && e.to_string().contains(".limits: over the limit: 17 quotas"),
            "{e}"
        );
        let mut d = doc();
        d.plans.get_mut("free").unwrap().rate_limits = (0..17)
            .map(|i| parse_json(format!(r#"{{"name":"r{i}","rate":1,"per":"1s"}}"#).as_bytes()).unwrap())
            .collect();
        let e = d.compile().unwrap_err();
        assert!(
            e.is_over_limit() && e.to_string().starts_with("plans.free: over the limit: 17 rate_limits"),
            "{e}"
        );
        // an ordinary validation error is not a cap
        assert!(!error_of(|d| d.version = 0).starts_with("over"));
        assert!(!doc().keys[0].compile("k", |_| false).unwrap_err().is_over_limit());
    }

    #[test]
    fn unknown_fields_and_bad_json_are_rejected() {
        assert!(parse_json::<KeySetDoc>(br#"{"version":1,"kyes":[]}"#)
            .unwrap_err()
            .message
            .contains("unknown field"));
        assert!(parse_json::<KeySetDoc>(b"{").is_err());
        assert!(parse_json::<KeySetDoc>(b"\xff\xfe").is_err());
    }

    #[test]
    fn deltas() {
        let d: DeltaDoc = parse_json(
            br#"{"version": 4, "ops": [
                {"op":"set_plan","name":"pro","plan":{}},
                {"op":"upsert","key":{"id":"Zz0000000001","hash":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","consumer":"b","plan":"pro"}},
                {"op":"revoke","id":"AbCdEf012345"},
                {"op":"disable","id":"AbCdEf012345"}]}"#,
        )
        .unwrap();
        let ops = d.compile(|_| false).unwrap();
        assert_eq!(ops.len(), 4);
        assert!(matches!(&ops[2], CompiledOp::Revoke(id) if id == "AbCdEf012345"));
        let bad: DeltaDoc = parse_json(br#"{"version": 4, "ops": [{"op":"revoke","id":"nope"}]}"#).unwrap();
        assert_eq!(
            bad.compile(|_| true).unwrap_err().to_string(),
            "ops[0].id: must be 12 characters of A-Z a-z 0-9"
        );
        assert!(parse_json::<DeltaDoc>(br#"{"version":4,"ops":[{"op":"explode"}]}"#).is_err());
    }
}
