//! The pure core: every decision keymeter makes, testable on the host. Nothing here
//! touches the proxy-wasm host; the adapter fetches what the core asks for and applies
//! what it returns.

/// Who is calling: key format, credentials, key records, scopes, CIDRs, problem bodies.
pub mod auth;
/// The key set: its document, how it is streamed into shared data and updated.
pub mod keyset;
/// Token buckets, calendar quotas, plans and the limiter that applies them.
pub mod limits;
/// Usage counting and the CloudEvents export.
pub mod metering;
/// Periodic outbound calls: key-set pull (and export scheduling).
pub mod remote;
/// The request decision: authentication, authorization and limits for one request.
pub mod request;

/// Admin answers held until every worker uses the key-set write they report.
pub mod admin_hold;
/// Which admin API call a request path names (pure, so it is fuzzed).
pub mod admin_route;
/// Size caps on documents and admin bodies.
pub mod caps;
pub mod cas;
pub mod config;
#[cfg(any(test, feature = "test-support"))]
pub mod mem_store;
/// Keeping values that may be secrets out of error bodies, status and logs.
pub mod redact;
pub mod store;
pub mod time;
