//! JWT users beside API-key clients.
//!
//! Envoy's `jwt_authn` filter verifies the token (signature, issuer, audience, expiry)
//! and puts the payload in dynamic metadata; keymeter maps the verified claims to a
//! consumer and a plan, then limits and meters the request like an API-key request of
//! that consumer. keymeter never parses or verifies a token itself, and never reads
//! claims from a request header.

pub mod config;
pub mod identity;
pub mod metadata;
pub mod order;
