//! Which admin API call a request path names, and the usage query it carries.
//!
//! Pure so that it is unit-tested and fuzzed on the host (`fuzz/`, target
//! `admin_route`): the adapter only fetches `:method`/`:path`, checks the token and
//! the method against `Routed::allow`, and dispatches.

/// An admin API call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Usage,
    Status,
    PutKeySet,
    PostDelta,
    /// Staged upload: begin, add keys, commit, abort.
    UploadBegin,
    UploadKeys,
    UploadCommit,
    UploadAbort,
}

/// A routed request: the call, the one method it allows, and what the path carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed<'a> {
    pub route: Route,
    pub allow: &'static str,
    /// The upload id of `/v1/keyset/uploads/<id>...` (empty otherwise): 1-64 of
    /// `A-Z a-z 0-9 -`, so it is safe to echo in bodies and logs.
    pub upload_id: &'a str,
    /// Everything after the first `?` (empty if none).
    pub query: &'a str,
    /// `force=true` or `force=1` in the query.
    pub force: bool,
}

/// Routes `:path` (with its query); `None` is a 404.
pub fn route(full_path: &str) -> Option<Routed<'_>> {
    let (path, query) = full_path.split_once('?').unwrap_or((full_path, ""));
    let force = query.split('&').any(|p| p == "force=true" || p == "force=1");
    let (route, allow, upload_id) = match path {
        "/v1/status" => (Route::Status, "GET", ""),
        "/v1/usage" => (Route::Usage, "GET", ""),
        "/v1/keyset" => (Route::PutKeySet, "PUT", ""),
        "/v1/keyset/delta" => (Route::PostDelta, "POST", ""),
        "/v1/keyset/uploads" => (Route::UploadBegin, "POST", ""),
        _ => {
            let (id, route, allow) = upload_path(path)?;
            (route, allow, id)
        }
    };
    Some(Routed {
        route,
        allow,
        upload_id,
        query,
        force,
    })
}

/// `/v1/keyset/uploads/<id>[/keys|/commit]`: the id, route and allowed method.
fn upload_path(path: &str) -> Option<(&str, Route, &'static str)> {
    let rest = path.strip_prefix("/v1/keyset/uploads/")?;
    let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
        return None;
    }
    match tail {
        "" => Some((id, Route::UploadAbort, "DELETE")),
        "keys" => Some((id, Route::UploadKeys, "PUT")),
        "commit" => Some((id, Route::UploadCommit, "POST")),
        _ => None,
    }
}

/// `GET /v1/usage?consumer=C&cursor=N&limit=L`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub consumer: Option<String>,
    pub cursor: u64,
    pub limit: usize,
}

pub const USAGE_LIMIT_DEFAULT: usize = 1000;
pub const USAGE_LIMIT_MAX: usize = 10_000;

/// Parses the usage query; the error is the detail of a 400.
pub fn usage_query(query: &str) -> Result<UsageQuery, &'static str> {
    let mut q = UsageQuery {
        consumer: None,
        cursor: 0,
        limit: USAGE_LIMIT_DEFAULT,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "consumer" => q.consumer = Some(v.to_string()),
            "cursor" => {
                q.cursor = v
                    .parse()
                    .map_err(|_| "cursor must be a number from a previous next_cursor")?
            }
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=USAGE_LIMIT_MAX).contains(&n) => q.limit = n,
                _ => return Err("limit must be 1..=10000"),
            },
            _ => return Err("known parameters: consumer, cursor, limit"),
        }
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_paths_and_their_methods() {
        let r = route("/v1/keyset?force=true").unwrap();
        assert_eq!(
            (r.route, r.allow, r.force, r.query),
            (Route::PutKeySet, "PUT", true, "force=true")
        );
        assert_eq!(route("/v1/status").unwrap().allow, "GET");
        assert_eq!(route("/v1/keyset/delta?force=1").unwrap().route, Route::PostDelta);
        assert!(route("/v1/keyset/delta?force=1").unwrap().force);
        assert!(!route("/v1/keyset?force=yes").unwrap().force);
        assert_eq!(route("/v1/keyset/uploads").unwrap().route, Route::UploadBegin);
        assert_eq!(route("/v1/usage?limit=5").unwrap().query, "limit=5");
        assert_eq!(route("/v1/keyset/"), None);
        assert_eq!(route("/v1/statusx"), None);
        assert_eq!(route(""), None);
    }

    #[test]
    fn upload_paths_carry_a_safe_id() {
        let r = route("/v1/keyset/uploads/ab-12/keys").unwrap();
        assert_eq!((r.route, r.allow, r.upload_id), (Route::UploadKeys, "PUT", "ab-12"));
        assert_eq!(route("/v1/keyset/uploads/ab12").unwrap().route, Route::UploadAbort);
        assert_eq!(route("/v1/keyset/uploads/ab12/commit").unwrap().allow, "POST");
        assert_eq!(route("/v1/keyset/uploads/ab12/other"), None);
        assert_eq!(route("/v1/keyset/uploads/a%2Fb/keys"), None);
        assert_eq!(route("/v1/keyset/uploads//keys"), None);
        assert_eq!(route(&format!("/v1/keyset/uploads/{}", "a".repeat(65))), None);
        assert!(route(&format!("/v1/keyset/uploads/{}", "a".repeat(64))).is_some());
    }

    #[test]
    fn usage_query_defaults_bounds_and_errors() {
        assert_eq!(
            usage_query("").unwrap(),
            UsageQuery {
                consumer: None,
                cursor: 0,
                limit: USAGE_LIMIT_DEFAULT
            }
        );
        let q = usage_query("consumer=acme&cursor=7&limit=10000&").unwrap();
        assert_eq!((q.consumer.as_deref(), q.cursor, q.limit), (Some("acme"), 7, 10_000));
        assert!(usage_query("limit=0").is_err());
        assert!(usage_query("limit=10001").is_err());
        assert!(usage_query("cursor=-1").is_err());
        assert!(usage_query("cursor=18446744073709551616").is_err());
        assert!(usage_query("other=1").is_err());
    }
}
