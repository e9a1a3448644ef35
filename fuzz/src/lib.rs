//! Helpers shared by the fuzz targets: a store loaded with a small base key set, a
//! snapshot of the whole store, and the layout invariants every update must keep.

use keymeter::core::keyset::entry::KeyEntry;
use keymeter::core::keyset::meta::{read_meta, Meta};
use keymeter::core::keyset::stream::push_stream;
use keymeter::core::mem_store::MemStore;
use keymeter::core::store::Store;
use keymeter::core::time::Clock;
use std::collections::BTreeMap;

pub const HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// Ids of the base set (the seeds refer to them).
pub const BASE_IDS: [&str; 4] = ["AAAAAAAAAAA1", "AAAAAAAAAAA2", "AAAAAAAAAAA3", "AAAAAAAAAAA4"];
pub const T0_MS: u64 = 1_800_000_000_000;

/// The base document: version 10, plans `free` and `pro`, the four `BASE_IDS`.
pub fn base_doc() -> String {
    let keys: Vec<String> = BASE_IDS
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let plan = if i % 2 == 0 { "free" } else { "pro" };
            format!(r#"{{"id":"{id}","hash":"{HASH}","consumer":"c{i}","plan":"{plan}"}}"#)
        })
        .collect();
    format!(
        r#"{{"version":10,"plans":{{"free":{{"rate_limits":[{{"name":"s","rate":5,"per":"1s"}}]}},"pro":{{}}}},"keys":[{}]}}"#,
        keys.join(",")
    )
}

/// A store holding the base set.
pub fn loaded_store() -> MemStore {
    let s = MemStore::default();
    push_stream(&s, base_doc().as_bytes(), Clock::Fixed(T0_MS), false).expect("base set applies");
    s
}

/// What the store means: every key and value, except what a refused update may
/// legitimately leave behind: a consumed generation number (`km/gen`), and entries that
/// read as absent (empty values, which is how ABI 0.2 "removes"; a zero index length; a
/// free lock).
pub fn snapshot(s: &MemStore) -> BTreeMap<String, Vec<u8>> {
    let zero = 0u64.to_le_bytes();
    s.keys_with_prefix("")
        .into_iter()
        .filter_map(|k| {
            let v = s.get(&k).0.unwrap_or_default();
            let absent = v.is_empty()
                || k == "km/gen"
                || (v == zero && (k == "km/lock" || (k.starts_with("km/idx/") && k.ends_with("/n"))));
            (!absent).then_some((k, v))
        })
        .collect()
}

/// The records visible to requests, by id (every `k/` entry decoded under `meta`).
pub fn active(s: &MemStore, meta: &Meta) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in s.keys_with_prefix("k/") {
        let Some(v) = s.get(&name).0.filter(|v| !v.is_empty()) else {
            continue;
        };
        // The entry's name supplies the record's id (the format does not repeat it).
        let entry = KeyEntry::decode(&v, &name[2..]).unwrap_or_else(|| panic!("{name}: undecodable key entry"));
        if let Some(rec) = entry.active(meta) {
            out.insert(rec.id.clone(), format!("{rec:?}"));
        }
    }
    out
}

/// Layout invariants: `km/meta` decodes, and its key count is the number of records
/// requests can see.
pub fn check_layout(s: &MemStore) {
    if let Some(meta) = read_meta(s) {
        let n = active(s, &meta).len() as u64;
        assert_eq!(meta.keys, n, "km/meta says {} keys, {n} are visible", meta.keys);
    } else {
        assert!(
            s.get(keymeter::core::keyset::names::META)
                .0
                .is_none_or(|v| v.is_empty()),
            "km/meta does not decode"
        );
    }
}
