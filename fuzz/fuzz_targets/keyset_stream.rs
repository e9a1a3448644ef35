//! The streaming full push (admin `PUT /v1/keyset`, the pull service) over a loaded
//! store: never panics; accepts exactly the documents the in-memory validation accepts;
//! a refused document leaves the store byte for byte as it was; an applied one is
//! visible whole (and `peek_version` agrees on its version).
#![no_main]

use keymeter::core::keyset::document::{parse_json, KeySetDoc};
use keymeter::core::keyset::entry::lookup;
use keymeter::core::keyset::meta::read_meta;
use keymeter::core::keyset::stream::{peek_version, push_stream};
use keymeter::core::time::Clock;
use keymeter_fuzz::{check_layout, loaded_store, snapshot, T0_MS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let store = loaded_store();
    let before = snapshot(&store);
    // force: the version check is not what is fuzzed here.
    let streamed = push_stream(&store, data, Clock::Fixed(T0_MS + 1000), true);
    let compiled = parse_json::<KeySetDoc>(data).and_then(|d| d.compile());
    match (&streamed, &compiled) {
        (Ok(report), Ok(set)) => {
            let meta = read_meta(&store).expect("meta after a push");
            assert_eq!((meta.version, meta.keys), (set.version, set.keys.len() as u64));
            assert_eq!(report.keys, set.keys.len() as u64);
            for rec in &set.keys {
                assert_eq!(lookup(&store, &meta, &rec.id).as_ref(), Some(rec));
            }
            assert_eq!(peek_version(data).expect("peek of an applied document"), set.version);
        }
        (Err(_), Err(_)) => assert_eq!(snapshot(&store), before, "a refused push changed the store"),
        (s, c) => panic!("streamed push and document validation disagree: {s:?} vs {c:?}"),
    }
    check_layout(&store);
});
