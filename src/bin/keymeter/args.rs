//! Parsers for argument values (`--scope`, `--meta`, times, durations, key ids).
//!
//! Shape errors are usage errors (exit 2); whether a well-formed value is acceptable in
//! the key set (consumer names, plan names, metadata names...) is decided by the core's
//! `KeySetDoc::compile`, so the CLI and the filter never disagree.

use crate::error::{usage, Fail};
use keymeter::core::auth::api_key::{is_valid_id, ApiKey};
use keymeter::core::auth::cidr::Cidr;
use keymeter::core::auth::scope::Scope;
use keymeter::core::keyset::document::ScopeDoc;
use keymeter::core::limits::plan::is_valid_name;
use keymeter::core::time::{parse_duration, parse_rfc3339};

/// `--scope`: `METHODS:PREFIX` (`GET,HEAD:/v1/reports`) or just `PREFIX` (`/v1`, all methods).
pub fn scope(s: &str) -> Result<ScopeDoc, String> {
    let (methods, prefix) = if s.starts_with('/') {
        (Vec::new(), s)
    } else {
        let (m, p) = s
            .split_once(':')
            .ok_or("expected METHODS:PREFIX (e.g. GET,HEAD:/v1/reports) or a path prefix (e.g. /v1)")?;
        let methods: Vec<String> = m.split(',').map(|m| m.trim().to_string()).collect();
        if methods.iter().any(String::is_empty) {
            return Err("empty method name in the method list".into());
        }
        (methods, p)
    };
    Scope::new(&methods, prefix)?;
    Ok(ScopeDoc {
        methods,
        path_prefix: prefix.to_string(),
    })
}

/// `--meta name=value`.
pub fn meta(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err("expected name=value".into()),
    }
}

/// `--cidr`: checked with the core's parser.
pub fn cidr(s: &str) -> Result<String, String> {
    Cidr::parse(s).map(|_| s.to_string())
}

/// An RFC 3339 timestamp, as unix seconds.
pub fn timestamp(s: &str) -> Result<i64, String> {
    parse_rfc3339(s).map_err(|e| e.to_string())
}

/// A duration (`30d`, `24h`, ...) in whole seconds, rounded up.
pub fn duration_secs(s: &str) -> Result<i64, String> {
    let ms = parse_duration(s).map_err(|e| e.to_string())?;
    i64::try_from(ms.div_ceil(1000)).map_err(|_| "duration too large".to_string())
}

/// A plan name for `keyset init`.
pub fn plan_name(s: &str) -> Result<String, String> {
    if is_valid_name(s) {
        Ok(s.to_string())
    } else {
        Err("plan names are 1-64 characters of A-Z a-z 0-9 _ -".into())
    }
}

/// A key id argument. Checked here rather than by clap so that a full key pasted by
/// mistake is never echoed back.
pub fn key_id(s: &str) -> Result<String, Fail> {
    if is_valid_id(s) {
        return Ok(s.to_string());
    }
    if let Ok(k) = ApiKey::parse(s) {
        return Err(usage(format!(
            "expected a key id, got a full key (its id is {}); pass only the id, never the key",
            k.id()
        )));
    }
    if s.starts_with("km_") {
        return Err(usage("expected a key id (12 characters of A-Z a-z 0-9), not a key"));
    }
    Err(usage(format!("'{s}' is not a key id (12 characters of A-Z a-z 0-9)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        assert_eq!(
            scope("GET,HEAD:/v1/reports").unwrap(),
            ScopeDoc {
                methods: vec!["GET".into(), "HEAD".into()],
                path_prefix: "/v1/reports".into()
            }
        );
        assert_eq!(
            scope("/v1").unwrap(),
            ScopeDoc {
                methods: vec![],
                path_prefix: "/v1".into()
            }
        );
        assert_eq!(scope("/v1/items:batch").unwrap().path_prefix, "/v1/items:batch");
        assert_eq!(scope("POST:/a:b").unwrap().path_prefix, "/a:b");
        assert!(scope("v1").unwrap_err().contains("METHODS:PREFIX"));
        assert!(scope("GET:v1").unwrap_err().contains("must start with '/'"));
        assert!(scope("get:/v1").unwrap_err().contains("unknown HTTP method 'get'"));
        assert!(scope("GET,:/v1").unwrap_err().contains("empty method"));
        assert!(scope(":/v1").is_err());
    }

    #[test]
    fn metas() {
        assert_eq!(meta("tier=gold").unwrap(), ("tier".into(), "gold".into()));
        assert_eq!(meta("note=a=b").unwrap(), ("note".into(), "a=b".into()));
        assert_eq!(meta("empty=").unwrap(), ("empty".into(), String::new()));
        assert!(meta("novalue").is_err());
        assert!(meta("=x").is_err());
    }

    #[test]
    fn times_and_ids() {
        assert_eq!(timestamp("2030-01-01T00:00:00Z"), Ok(1_893_456_000));
        assert!(timestamp("2030-01-01").is_err());
        assert_eq!(duration_secs("30d"), Ok(30 * 86_400));
        assert_eq!(duration_secs("1500ms"), Ok(2));
        assert!(duration_secs("1w").is_err());
        assert!(cidr("10.0.0.0/8").is_ok() && cidr("10.0.0.1/8").is_err());
        assert!(plan_name("pro-2").is_ok() && plan_name("a b").is_err());
        assert_eq!(key_id("AbCdEf012345").unwrap(), "AbCdEf012345");
        let k = keymeter::core::auth::api_key::assemble("AbCdEf012345", "0123456789abcdefghijABCDEFGHIJkl");
        let e = key_id(&k).unwrap_err();
        assert_eq!(e.code(), 2);
        assert!(e.to_string().contains("AbCdEf012345") && !e.to_string().contains(&k));
        assert!(!key_id(&k[..40]).unwrap_err().to_string().contains(&k[..40]));
        assert!(key_id("short").unwrap_err().to_string().contains("'short'"));
    }
}
