//! Helpers the key-set tests share: small documents and views of a `MemStore`.

use crate::core::keyset::apply::{ApplyOptions, ApplyReport};
use crate::core::keyset::document::{parse_json, KeySet, KeySetDoc};
use crate::core::keyset::entry::lookup;
use crate::core::keyset::meta::read_meta;
use crate::core::keyset::names::KEY_ENTRY_PREFIX;
use crate::core::keyset::stream::{push_stream, PushError};
use crate::core::store::MemStore;

pub(crate) const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

pub(crate) fn set(version: u64, ids: &[&str]) -> KeySet {
    let keys: Vec<String> = ids
        .iter()
        .map(|id| format!(r#"{{"id":"{id}","hash":"{H}","consumer":"c","plan":"p"}}"#))
        .collect();
    let doc = format!(
        r#"{{"version":{version},"plans":{{"p":{{}}}},"keys":[{}]}}"#,
        keys.join(",")
    );
    parse_json::<KeySetDoc>(doc.as_bytes()).unwrap().compile().unwrap()
}
pub(crate) fn opts() -> ApplyOptions {
    ApplyOptions {
        force: false,
        now_ms: 1_000_000,
    }
}
pub(crate) fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("k{i:011}")).collect()
}
pub(crate) fn active(s: &MemStore) -> Vec<String> {
    let m = read_meta(s).unwrap();
    let mut v: Vec<String> = s
        .keys_with_prefix(KEY_ENTRY_PREFIX)
        .iter()
        .filter_map(|k| lookup(s, &m, &k[KEY_ENTRY_PREFIX.len()..]).map(|r| r.id))
        .collect();
    v.sort();
    v
}

pub(crate) fn key(id: &str, plan: &str) -> String {
    format!(r#"{{"id":"{id}","hash":"{H}","consumer":"c","plan":"{plan}"}}"#)
}

pub(crate) fn push(s: &MemStore, doc: &str) -> Result<ApplyReport, PushError> {
    push_stream(s, doc.as_bytes(), crate::core::time::Clock::Fixed(1_000), false)
}
