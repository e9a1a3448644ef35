//! Size caps on what the admin API and the key-set validation accept.
//!
//! Key entries are copied out of shared data on every request, plans on every plan
//! change, and delta and commit bodies are read whole into the wasm heap (which never
//! shrinks): each must stay small whatever a client sends. A document over a cap is
//! refused whole with an error naming the entry, the field and the cap (HTTP 422 on
//! the admin API; bodies over their byte cap get 413 before they are read).

/// Scopes per key.
pub const MAX_SCOPES: usize = 64;
/// CIDRs per key.
pub const MAX_CIDRS: usize = 256;
/// Metadata entries per key (each value is at most 512 bytes).
pub const MAX_METADATA: usize = 32;
/// Rate limits, and quotas, per plan or per-key override.
pub const MAX_LIMITS: usize = 16;
/// Route costs per plan.
pub const MAX_COSTS: usize = 64;
/// Bytes of a `path_prefix`.
pub const MAX_PATH_PREFIX: usize = 1024;

/// Bytes of a `POST /v1/keyset/delta` body (read whole into memory).
pub const MAX_DELTA_BODY: usize = 8 * 1024 * 1024;
/// Bytes of a staged upload's commit body (`{"version", "plans"}`).
pub const MAX_COMMIT_BODY: usize = 1024 * 1024;

/// Every cap message starts with this, so callers can tell "too big" from "invalid".
pub const OVER_LIMIT: &str = "over the limit: ";

/// `Err` with the cap message when `n > max`: `over the limit: 65 scopes, at most 64 per key`.
pub fn check(n: usize, max: usize, what: &str, per: &str) -> Result<(), String> {
    if n > max {
        Err(format!("{OVER_LIMIT}{n} {what}, at most {max} per {per}"))
    } else {
        Ok(())
    }
}

/// Whether an error message is a cap being exceeded (see [`OVER_LIMIT`]).
pub fn is_over_limit(message: &str) -> bool {
    message.starts_with(OVER_LIMIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(check(64, MAX_SCOPES, "scopes", "key"), Ok(()));
        let e = check(65, MAX_SCOPES, "scopes", "key").unwrap_err();
        assert_eq!(e, "over the limit: 65 scopes, at most 64 per key");
        assert!(is_over_limit(&e) && !is_over_limit("must be >= 1"));
    }
}
