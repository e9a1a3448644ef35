//! Which kind of credential a usage row was counted under: the `credential` label in
//! Prometheus, the `credential` field of the usage API and of exported events, and the
//! `x-keymeter-auth` value sent to the backend.
//!
//! Derived from the lineage rather than stored, so usage records keep their format:
//! key lineages are 12 base62 characters, the anonymous plan's is `anonymous`, and JWT
//! users' are `jwt-<consumer>` (see `core::auth::jwt::identity`), three disjoint sets.

use crate::core::auth::jwt::identity::is_jwt_lineage;

pub const API_KEY: &str = "api-key";
pub const JWT: &str = "jwt";
pub const ANONYMOUS: &str = "anonymous";

/// The lineage of the anonymous plan's usage row.
pub const ANONYMOUS_LINEAGE: &str = "anonymous";

/// The credential kind of a usage lineage.
pub fn of_lineage(lineage: &str) -> &'static str {
    if is_jwt_lineage(lineage) {
        JWT
    } else if lineage == ANONYMOUS_LINEAGE {
        ANONYMOUS
    } else {
        API_KEY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lineages_map_to_their_credential() {
        assert_eq!(of_lineage("AbCdEf012345"), API_KEY);
        assert_eq!(of_lineage("jwt-acme"), JWT);
        assert_eq!(of_lineage("anonymous"), ANONYMOUS);
    }
}
