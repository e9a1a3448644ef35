//! The key-set document (what `keymeter keyset validate` and the CLI read): parsing and
//! validation never panic, and an accepted document survives a serialize/parse round
//! trip unchanged (the CLI rewrites the file it validated).
#![no_main]

use keymeter::core::keyset::document::{parse_json, KeySetDoc};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(doc) = parse_json::<KeySetDoc>(data) else { return };
    let Ok(set) = doc.compile() else { return };
    assert_eq!(set.keys.len(), doc.keys.len());
    let again: KeySetDoc = parse_json(&serde_json::to_vec(&doc).expect("serializes")).expect("round trip parses");
    assert_eq!(again, doc);
    assert_eq!(again.compile().expect("round trip validates"), set);
});
