//! What a key may call: HTTP methods and path prefixes.

use serde::{Deserialize, Serialize};

/// HTTP methods as a bit set, so a scope check allocates nothing.
pub const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
];

/// Bit for a method name, or `None` for a method we do not know (which then only
/// matches scopes that allow every method).
pub fn method_bit(method: &str) -> Option<u16> {
    METHODS.iter().position(|m| *m == method).map(|i| 1 << i)
}

/// One grant: the methods (empty = all) on paths under `path_prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// 0 means any method.
    pub methods: u16,
    pub path_prefix: String,
}

impl Scope {
    /// Builds a scope from names; unknown method names are an error.
    pub fn new(methods: &[String], path_prefix: &str) -> Result<Scope, String> {
        if !path_prefix.starts_with('/') {
            return Err(format!("path_prefix '{path_prefix}' must start with '/'"));
        }
        if path_prefix.len() > crate::core::caps::MAX_PATH_PREFIX {
            return Err(format!(
                "{}path_prefix of {} bytes, at most {} bytes",
                crate::core::caps::OVER_LIMIT,
                path_prefix.len(),
                crate::core::caps::MAX_PATH_PREFIX
            ));
        }
        // Requests are matched in canonical form (core::auth::path), so a prefix that is
        // not canonical could never match, or only match forms that are refused.
        match crate::core::auth::path::canonical(path_prefix) {
            Ok(c) if c == path_prefix => {}
            Ok(c) => {
                return Err(format!(
                    "path_prefix '{path_prefix}' is not in canonical form: write '{c}' (no query, no %-escaped letters, digits or -._~)"
                ))
            }
            Err(a) => return Err(format!("path_prefix '{path_prefix}' contains {}", a.describe())),
        }
        let mut bits = 0u16;
        for m in methods {
            bits |= method_bit(m).ok_or_else(|| format!("unknown HTTP method '{m}' (use upper case, e.g. GET)"))?;
        }
        Ok(Scope {
            methods: bits,
            path_prefix: path_prefix.to_string(),
        })
    }

    pub fn allows(&self, method: &str, path: &str) -> bool {
        let method_ok = self.methods == 0 || method_bit(method).is_some_and(|b| self.methods & b != 0);
        method_ok && path_has_prefix(path, &self.path_prefix)
    }
}

/// Segment-aware prefix match on the path without its query: `/v1` matches `/v1` and
/// `/v1/x` but not `/v10`, so a grant never leaks to a sibling resource.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or("");
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// True when `scopes` is empty (no restriction) or one of them allows the request.
pub fn allowed(scopes: &[Scope], method: &str, path: &str) -> bool {
    scopes.is_empty() || scopes.iter().any(|s| s.allows(method, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_segment_aware() {
        assert!(path_has_prefix("/v1", "/v1"));
        assert!(path_has_prefix("/v1/users?x=1", "/v1"));
        assert!(!path_has_prefix("/v10", "/v1"));
        assert!(path_has_prefix("/v1/x", "/v1/"));
        assert!(!path_has_prefix("/v1", "/v1/"));
        assert!(path_has_prefix("/anything", "/"));
        assert!(!path_has_prefix("/v2?/v1", "/v1"));
    }

    #[test]
    fn methods_and_paths() {
        let read = Scope::new(&["GET".into(), "HEAD".into()], "/reports").unwrap();
        assert!(read.allows("GET", "/reports/1"));
        assert!(!read.allows("POST", "/reports/1"));
        assert!(!read.allows("GET", "/admin"));
        assert!(!read.allows("BREW", "/reports"));
        let any = Scope::new(&[], "/").unwrap();
        assert!(any.allows("BREW", "/x"));
        assert!(allowed(&[], "DELETE", "/x"));
        assert!(!allowed(std::slice::from_ref(&read), "DELETE", "/reports"));
        assert!(allowed(&[read, any], "DELETE", "/reports"));
        assert!(Scope::new(&["get".into()], "/").is_err());
        assert!(Scope::new(&[], "v1").is_err());
        // prefixes must be canonical paths: requests are matched in that form
        for bad in [
            "/v1/../admin",
            "/v1//x",
            "/v1;x",
            "/v1%2fx",
            "/v1\\x",
            "/v1/%72",
            "/v1?x",
            "/v1/%zz",
        ] {
            assert!(Scope::new(&[], bad).is_err(), "{bad}");
        }
        assert!(Scope::new(&[], "/v1/a%20b/").is_ok());
    }
}
