//! Admin API routing and its usage query: never panic; an upload id taken from the path
//! is always safe to echo; routing depends on the path only, never on the query.
#![no_main]

use keymeter::core::admin_route::{route, usage_query, USAGE_LIMIT_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = String::from_utf8_lossy(data);
    if let Some(r) = route(&path) {
        assert!(path.starts_with("/v1/"));
        assert!(r.upload_id.len() <= 64);
        assert!(r.upload_id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'));
        let bare = path.split_once('?').map_or(&*path, |(p, _)| p);
        let again = route(bare).expect("the path without its query routes too");
        assert_eq!(
            (again.route, again.allow, again.upload_id),
            (r.route, r.allow, r.upload_id)
        );
        if let Ok(q) = usage_query(r.query) {
            assert!((1..=USAGE_LIMIT_MAX).contains(&q.limit));
        }
    }
    let _ = usage_query(&path);
});
