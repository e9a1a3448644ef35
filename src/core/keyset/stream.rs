//! Applying a full key-set document while parsing it.
//!
//! A million-key document is over 100 MiB of JSON; parsing it into memory first would
//! grow the wasm heap (which never shrinks) by several times that. Instead each key is
//! validated and written into the inactive slot as soon as it is read
//! (`full_push::FullPush`), and the set becomes visible only at the final commit.
//! Checks that need the whole document (plan references, the version, which may come
//! after the keys) run before the commit; any error abandons the push, leaving the
//! running set untouched.

use crate::core::keyset::apply::{ApplyError, ApplyReport};
use crate::core::keyset::document::{compile_plan, DocError, KeyDoc};
use crate::core::keyset::full_push::{AddError, FullPush};
use crate::core::limits::plan::PlanDoc;
use crate::core::store::Store;
use crate::core::time::Clock;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;

/// Why a streamed push failed: the document, or applying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushError {
    Doc(DocError),
    Apply(ApplyError),
}

/// What the keys need checked once the whole document is read.
pub(crate) struct KeySink<'s, 'a> {
    pub push: &'s mut FullPush<'a>,
    /// First key (index, id) referring to each plan name.
    pub plan_refs: BTreeMap<String, (u64, String)>,
    pub failure: Option<PushError>,
    /// Global index of the next key (a staged upload continues it across chunks).
    pub next: u64,
}

impl KeySink<'_, '_> {
    fn add(&mut self, i: u64, doc: KeyDoc) -> Result<(), PushError> {
        let at = format!("keys[{i}]");
        let rec = doc.compile(&at, |_| true).map_err(PushError::Doc)?;
        if !self.plan_refs.contains_key(&rec.plan) {
            self.plan_refs.insert(rec.plan.clone(), (i, rec.id.clone()));
        }
        self.push.add(&rec).map_err(|e| match e {
            AddError::Duplicate => PushError::Doc(DocError {
                at: format!("{at}.id"),
                message: format!("duplicate key id \"{}\"", rec.id),
            }),
            AddError::Apply(e) => PushError::Apply(e),
        })
    }
}

pub(crate) struct KeysSeed<'k, 's, 'a>(pub &'k mut KeySink<'s, 'a>);

impl<'de> DeserializeSeed<'de> for KeysSeed<'_, '_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for KeysSeed<'_, '_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of keys")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        loop {
            let i = self.0.next;
            let doc = seq
                .next_element::<KeyDoc>()
                .map_err(|e| de::Error::custom(format!("keys[{i}]: {e}")))?;
            let Some(doc) = doc else { return Ok(()) };
            if let Err(e) = self.0.add(i, doc) {
                self.0.failure = Some(e);
                return Err(de::Error::custom("key rejected"));
            }
            self.0.next += 1;
        }
    }
}

#[derive(Default)]
struct Head {
    version: Option<u64>,
    plans: Option<BTreeMap<String, PlanDoc>>,
}

struct DocSeed<'k, 's, 'a>(&'k mut KeySink<'s, 'a>);

impl<'de> DeserializeSeed<'de> for DocSeed<'_, '_, '_> {
    type Value = Head;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Head, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocSeed<'_, '_, '_> {
    type Value = Head;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key-set document (an object with version, plans, keys)")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head, A::Error> {
        let mut head = Head::default();
        let mut seen_keys = false;
        while let Some(field) = map.next_key::<String>()? {
            match field.as_str() {
                "version" if head.version.is_none() => head.version = Some(map.next_value()?),
                "plans" if head.plans.is_none() => head.plans = Some(map.next_value()?),
                "keys" if !seen_keys => {
                    seen_keys = true;
                    map.next_value_seed(KeysSeed(&mut *self.0))?;
                }
                "version" | "plans" | "keys" => return Err(de::Error::duplicate_field("version, plans or keys")),
                other => return Err(de::Error::unknown_field(other, &["version", "plans", "keys"])),
            }
        }
        Ok(head)
    }
}

/// Reads only the `version` of a full key-set document, skipping plans and keys
/// without building them: the pull service uses it to decide whether a document is
/// new before applying it with `push_stream`, which validates everything.
pub fn peek_version(reader: impl std::io::Read) -> Result<u64, DocError> {
    struct Peek;
    impl<'de> Visitor<'de> for Peek {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a key-set document (an object with version, plans, keys)")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<u64>, A::Error> {
            let mut version = None;
            while let Some(field) = map.next_key::<String>()? {
                match field.as_str() {
                    "version" => version = Some(map.next_value()?),
                    "plans" | "keys" => {
                        map.next_value::<de::IgnoredAny>()?;
                    }
                    other => return Err(de::Error::unknown_field(other, &["version", "plans", "keys"])),
                }
            }
            Ok(version)
        }
    }
    let invalid = |m: String| DocError {
        at: String::new(),
        message: format!("invalid document: {m}"),
    };
    let mut de = serde_json::Deserializer::from_reader(reader);
    let version = de::Deserializer::deserialize_map(&mut de, Peek).map_err(|e| invalid(e.to_string()))?;
    de.end().map_err(|e| invalid(e.to_string()))?;
    match version {
        None => Err(invalid("missing field `version`".into())),
        Some(0) => Err(DocError {
            at: "version".into(),
            message: "must be >= 1".into(),
        }),
        Some(v) => Ok(v),
    }
}

/// Parses `reader` as a full key-set document and applies it through `FullPush`.
/// `clock` keeps the writer lock renewed while a large document streams in: pass the
/// host clock (`Clock::Live`) in production.
pub fn push_stream(
    store: &dyn Store,
    reader: impl std::io::Read,
    clock: Clock<'_>,
    force: bool,
) -> Result<ApplyReport, PushError> {
    let mut push = FullPush::begin(store, clock).map_err(PushError::Apply)?;
    let mut sink = KeySink {
        push: &mut push,
        plan_refs: BTreeMap::new(),
        failure: None,
        next: 0,
    };
    let mut de = serde_json::Deserializer::from_reader(reader);
    let parsed = DocSeed(&mut sink)
        .deserialize(&mut de)
        .and_then(|head| de.end().map(|()| head));
    let KeySink { plan_refs, failure, .. } = sink;
    let head = match (parsed, failure) {
        (_, Some(failure)) => return abort(push, failure),
        (Err(e), None) => {
            let e = DocError {
                at: String::new(),
                message: format!("invalid document: {e}"),
            };
            return abort(push, PushError::Doc(e));
        }
        (Ok(head), None) => head,
    };
    let doc_err = |at: &str, m: String| {
        PushError::Doc(DocError {
            at: at.to_string(),
            message: m,
        })
    };
    let version = match head.version {
        None => return abort(push, doc_err("", "invalid document: missing field `version`".into())),
        Some(0) => return abort(push, doc_err("version", "must be >= 1".into())),
        Some(v) => v,
    };
    let mut plans = BTreeMap::new();
    for (name, p) in head.plans.unwrap_or_default() {
        match compile_plan(&name, &p, "plans") {
            Ok(plan) => plans.insert(name, plan),
            Err(e) => return abort(push, PushError::Doc(e)),
        };
    }
    if let Err(e) = check_plan_refs(&plan_refs, &plans) {
        return abort(push, e);
    }
    push.commit(version, &plans, force).map_err(PushError::Apply)
}

/// The first key (lowest index) that refers to a plan the document does not define.
pub(crate) fn check_plan_refs(
    plan_refs: &BTreeMap<String, (u64, String)>,
    plans: &BTreeMap<String, crate::core::limits::plan::Plan>,
) -> Result<(), PushError> {
    let missing = plan_refs
        .iter()
        .filter(|(plan, _)| !plans.contains_key(*plan))
        .map(|(plan, (i, id))| (*i, id, plan))
        .min();
    match missing {
        None => Ok(()),
        Some((i, id, plan)) => Err(PushError::Doc(DocError {
            at: format!("keys[{i}] (id \"{id}\").plan"),
            message: format!("unknown plan '{plan}'"),
        })),
    }
}

fn abort<T>(push: FullPush<'_>, e: PushError) -> Result<T, PushError> {
    push.abort();
    Err(e)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keyset::document::{parse_json, KeySetDoc};
    use crate::core::keyset::entry::lookup;
    use crate::core::keyset::meta::read_meta;
    use crate::core::keyset::plans::read_plans;
    use crate::core::keyset::test_support::*;
    use crate::core::store::MemStore;

    #[test]
    fn applies_a_document_in_any_field_order() {
        let s = MemStore::default();
        let doc = format!(
            r#"{{"keys":[{},{}],"plans":{{"p":{{}}}},"version":3}}"#,
            key("aaaaaaaaaaa1", "p"),
            key("aaaaaaaaaaa2", "p")
        );
        let r = push(&s, &doc).unwrap();
        assert_eq!((r.version, r.keys), (3, 2));
        let m = read_meta(&s).unwrap();
        assert!(lookup(&s, &m, "aaaaaaaaaaa2").is_some());
        assert!(read_plans(&s, &m).contains_key("p"));
    }

    #[test]
    fn agrees_with_the_in_memory_validation() {
        // every document KeySetDoc::compile rejects is rejected here too, and the same
        // first error is reported for key-level problems
        let good = key("aaaaaaaaaaa1", "p");
        let docs = [
            format!(r#"{{"version":1,"plans":{{"p":{{}}}},"keys":[{good},{good}]}}"#),
            format!(r#"{{"version":1,"plans":{{}},"keys":[{good}]}}"#),
            format!(r#"{{"version":0,"plans":{{"p":{{}}}},"keys":[{good}]}}"#),
            format!(r#"{{"plans":{{"p":{{}}}},"keys":[{good}]}}"#),
            format!(r#"{{"version":1,"plans":{{"p":{{}}}},"keys":[{good}],"extra":1}}"#),
            r#"{"version":1,"plans":{"p":{"rate_limits":[{"name":"x","rate":0,"per":"1s"}]}},"keys":[]}"#.to_string(),
            format!(
                r#"{{"version":1,"plans":{{"p":{{}}}},"keys":[{}]}}"#,
                good.replace(H, "xyz")
            ),
            format!(
                r#"{{"version":1,"plans":{{"p":{{}}}},"keys":[{}]}}"#,
                good.replace("\"c\"", "\"a b\"")
            ),
            r#"{"version":1,"plans":{"p":{}},"keys":[{"id":"aaaaaaaaaaa1","bogus":1}]}"#.to_string(),
            r#"{"version":1,"keys":[]"#.to_string(),
            r#"[]"#.to_string(),
            String::new(),
        ];
        for doc in docs {
            let s = MemStore::default();
            push(
                &s,
                &format!(
                    r#"{{"version":1,"plans":{{"p":{{}}}},"keys":[{}]}}"#,
                    key("zzzzzzzzzzz1", "p")
                ),
            )
            .unwrap();
            let before = s.value_bytes();
            let streamed = push(&s, &doc.replace("\"version\":1", "\"version\":2"));
            let Err(PushError::Doc(e)) = streamed else {
                panic!("accepted or wrong error for {doc}: {streamed:?}")
            };
            if let Ok(d) = parse_json::<KeySetDoc>(doc.as_bytes()) {
                if let Err(want) = d.compile() {
                    if want.at.starts_with("keys") {
                        assert_eq!(e, want, "{doc}");
                    }
                }
            }
            assert_eq!(s.value_bytes(), before, "a rejected document left data behind: {doc}");
            let m = read_meta(&s).unwrap();
            assert_eq!(m.version, 1);
            assert!(lookup(&s, &m, "zzzzzzzzzzz1").is_some());
        }
    }

    #[test]
    fn peek_version_reads_only_the_version() {
        let doc = format!(
            r#"{{"keys":[{}],"plans":{{"p":{{}}}},"version":7}}"#,
            key("aaaaaaaaaaa1", "p")
        );
        assert_eq!(peek_version(doc.as_bytes()), Ok(7));
        assert!(peek_version(&b"{\"keys\":[]}"[..])
            .unwrap_err()
            .message
            .contains("missing field `version`"));
        assert!(peek_version(&b"{\"version\":1,\"x\":1}"[..])
            .unwrap_err()
            .message
            .contains("unknown field"));
        assert!(peek_version(&b"garbage"[..]).is_err());
        assert_eq!(peek_version(&b"{\"version\":0}"[..]).unwrap_err().at, "version");
    }

    #[test]
    fn truncated_and_mangled_documents_are_errors_not_panics() {
        let s = MemStore::default();
        let doc = format!(
            r#"{{"version":2,"plans":{{"p":{{"rate_limits":[{{"name":"r","rate":5,"per":"1s"}}]}}}},"keys":[{},{}]}}"#,
            key("aaaaaaaaaaa1", "p"),
            key("aaaaaaaaaaa2", "p")
        );
        for cut in 0..doc.len() {
            assert!(
                push(&s, &doc[..cut]).is_err(),
                "a truncated document was accepted at {cut}"
            );
            assert!(peek_version(&doc.as_bytes()[..cut]).is_err() || cut > doc.len() - 2);
        }
        let mut bytes = doc.clone().into_bytes();
        for i in (0..bytes.len()).step_by(7) {
            let saved = bytes[i];
            let junk = b"\xff{}[]\":,0";
            bytes[i] = junk[i % junk.len()];
            let _ = push_stream(&s, &bytes[..], Clock::Fixed(1_000), true);
            bytes[i] = saved;
        }
        assert!(push(&s, &doc).is_ok() || read_meta(&s).is_some());
    }

    #[test]
    fn stale_and_forced() {
        let s = MemStore::default();
        push(
            &s,
            &format!(
                r#"{{"version":5,"plans":{{"p":{{}}}},"keys":[{}]}}"#,
                key("aaaaaaaaaaa1", "p")
            ),
        )
        .unwrap();
        let older = format!(
            r#"{{"version":4,"plans":{{"p":{{}}}},"keys":[{}]}}"#,
            key("aaaaaaaaaaa2", "p")
        );
        assert_eq!(
            push(&s, &older).unwrap_err(),
            PushError::Apply(ApplyError::Stale { running: 5, pushed: 4 })
        );
        assert!(push_stream(&s, older.as_bytes(), Clock::Fixed(1_000), true).is_ok());
        assert_eq!(read_meta(&s).unwrap().version, 4);
    }
}
