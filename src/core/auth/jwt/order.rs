//! Which credential decides when a request may carry an API key, a verified JWT, both or
//! neither.
//!
//! - `key_wins` (the default): any API key present decides, exactly as without JWT
//!   support (a malformed key is a 401 even with a good token: a request never
//!   authenticates in a way its sender did not obviously intend). Only a request with no
//!   key falls back to the token. Key requests cost no extra host call.
//! - `key_wins: false`: a verified token decides and the key is not even parsed; without
//!   a token the key decides.
//!
//! One exception: with jwt_authn's `forward: true` the token stays in
//! `Authorization: Bearer`, where it is a malformed API key. When a verified payload is
//! present, such a Bearer value *is* the token, so it is not held against the request.

use crate::core::auth::credential::{Credential, CredentialError, Source};

/// The credential that decides the request.
#[derive(Debug)]
pub enum Which {
    Key(Credential),
    Jwt,
    /// No usable credential: as without JWT support (401 with challenges, or the
    /// anonymous plan for `Missing`).
    Neither(CredentialError),
}

/// Picks the deciding credential. Both inputs are asked lazily, each at most once:
/// `find_key` parses the API-key sources, `jwt_present` looks for a verified payload;
/// both get `ctx` (the host reads they share).
pub fn choose<C: ?Sized>(
    key_wins: bool,
    ctx: &mut C,
    find_key: impl FnOnce(&mut C) -> Result<Credential, CredentialError>,
    jwt_present: impl FnOnce(&mut C) -> bool,
) -> Which {
    if !key_wins {
        if jwt_present(ctx) {
            return Which::Jwt;
        }
        return match find_key(ctx) {
            Ok(c) => Which::Key(c),
            Err(e) => Which::Neither(e),
        };
    }
    match find_key(ctx) {
        Ok(c) => Which::Key(c),
        Err(e @ CredentialError::Missing)
        | Err(e @ CredentialError::Malformed(Source::Bearer))
        | Err(e @ CredentialError::BadChecksum(Source::Bearer)) => {
            if jwt_present(ctx) {
                Which::Jwt
            } else {
                Which::Neither(e)
            }
        }
        Err(e) => Which::Neither(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::auth::credential::{find, CredentialSources, Field};
    use std::cell::Cell;

    /// A well-formed key (checksum included), from the key-format tests' generator.
    fn good_key() -> String {
        crate::core::auth::api_key::assemble("AbCdEf012345", "0123456789abcdefghijABCDEFGHIJkl")
    }

    fn run(key_wins: bool, header: Option<&str>, auth: Option<&str>, jwt: bool) -> (Which, usize, usize) {
        let (key_calls, jwt_calls) = (Cell::new(0), Cell::new(0));
        let sources = CredentialSources::default();
        let which = choose(
            key_wins,
            &mut (),
            |_| {
                key_calls.set(key_calls.get() + 1);
                find(&sources, |f| match f {
                    Field::ApiKeyHeader => header.map(String::from),
                    Field::Authorization => auth.map(String::from),
                    Field::Path => None,
                })
            },
            |_| {
                jwt_calls.set(jwt_calls.get() + 1);
                jwt
            },
        );
        (which, key_calls.get(), jwt_calls.get())
    }

    #[test]
    fn key_wins_by_default_and_costs_no_jwt_lookup() {
        let key = good_key();
        let (w, k, j) = run(true, Some(&key), None, true);
        assert!(matches!(w, Which::Key(_)));
        assert_eq!((k, j), (1, 0), "a key request never looks for a token");
        let (w, _, j) = run(true, None, None, true);
        assert!(matches!(w, Which::Jwt));
        assert_eq!(j, 1);
        let (w, _, _) = run(true, None, None, false);
        assert!(matches!(w, Which::Neither(CredentialError::Missing)));
    }

    #[test]
    fn a_malformed_key_is_not_rescued_by_a_token() {
        let (w, _, j) = run(true, Some("km_typo"), None, true);
        assert!(matches!(w, Which::Neither(CredentialError::Malformed(Source::Header))));
        assert_eq!(j, 0);
        // Basic is never a JWT either.
        let (w, _, _) = run(true, None, Some("Basic Zm9vOmJhcg=="), true);
        assert!(matches!(w, Which::Neither(CredentialError::Malformed(Source::Basic))));
    }

    #[test]
    fn a_forwarded_token_in_bearer_is_the_token_not_a_bad_key() {
        let (w, _, _) = run(true, None, Some("Bearer eyJhbGciOi.eyJzdWIi.sig"), true);
        assert!(matches!(w, Which::Jwt));
        // Without a verified payload it is what it looks like: a malformed key.
        let (w, _, _) = run(true, None, Some("Bearer eyJhbGciOi.eyJzdWIi.sig"), false);
        assert!(matches!(w, Which::Neither(CredentialError::Malformed(Source::Bearer))));
    }

    #[test]
    fn token_wins_when_configured_and_the_key_is_not_parsed() {
        let key = good_key();
        let (w, k, j) = run(false, Some(&key), None, true);
        assert!(matches!(w, Which::Jwt));
        assert_eq!((k, j), (0, 1));
        let (w, _, _) = run(false, Some("km_typo"), None, true);
        assert!(matches!(w, Which::Jwt));
        let (w, _, _) = run(false, Some(&key), None, false);
        assert!(matches!(w, Which::Key(_)));
        let (w, _, _) = run(false, None, None, false);
        assert!(matches!(w, Which::Neither(CredentialError::Missing)));
    }
}
