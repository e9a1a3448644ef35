//! Staged uploads: one full push spread over several requests (begin, chunks of keys,
//! commit or abort), holding the writer lock under the upload's id between them.

use crate::core::keyset::apply::{ApplyError, ApplyReport};
use crate::core::keyset::document::compile_plan;
use crate::core::keyset::document::DocError;
use crate::core::keyset::full_push::{FullPush, PushState};
use crate::core::keyset::names::UPLOAD;
use crate::core::keyset::stream::{check_plan_refs, KeySink, KeysSeed, PushError};
use crate::core::keyset::sweep::{queue_abort_cleanup, CLEANUP_STEP_CHUNKS};
use crate::core::limits::plan::PlanDoc;
use crate::core::store::{read_value, Store};
use serde::de::DeserializeSeed;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A staged upload between requests: its push plus what the document checks need at
/// commit. Stored (bincode) in `km/upload` while the upload holds the lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    pub push: PushState,
    /// First key (global index, id) referring to each plan name.
    pub plan_refs: BTreeMap<String, (u64, String)>,
    /// Global index of the next key (`keys[i]` in error paths).
    pub next_index: u64,
}

pub fn read_upload(store: &dyn Store) -> Option<UploadState> {
    read_value(store, UPLOAD).0.and_then(|b| bincode::deserialize(&b).ok())
}

pub fn write_upload(store: &dyn Store, st: Option<&UploadState>) -> Result<(), ApplyError> {
    let bytes = st
        .map(|s| bincode::serialize(s).expect("upload encodes"))
        .unwrap_or_default();
    store.set(UPLOAD, &bytes, None)?;
    Ok(())
}

/// Called with the lock just taken: an upload still recorded lost its lock, so it is
/// dropped and its slots queued for cleanup.
pub(crate) fn reap_abandoned_upload(store: &dyn Store) -> Result<(), ApplyError> {
    let Some(st) = read_upload(store) else {
        return Ok(());
    };
    log::warn!("keymeter: upload {} expired; cleaning up its records", st.push.owner);
    write_upload(store, None)?;
    queue_abort_cleanup(store, &st.push)
}

/// Why a step of a staged upload failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadError {
    /// No upload with that id (never begun, committed, aborted, or reaped).
    NotFound,
    /// The upload's lock expired (no request for `writer_lock::UPLOAD_TTL_MS`): it was aborted.
    Expired,
    /// The upload was aborted because of this (except `Busy` at begin).
    Push(PushError),
}

impl From<ApplyError> for UploadError {
    fn from(e: ApplyError) -> Self {
        UploadError::Push(PushError::Apply(e))
    }
}

/// Begins a staged upload with id `id`: takes the writer lock for it and a fresh
/// generation. Nothing is visible before `upload_commit`.
pub fn upload_begin(store: &dyn Store, id: &str, now_ms: u64) -> Result<(), UploadError> {
    let push = FullPush::begin_owned(store, now_ms, id)?;
    let st = UploadState {
        push: push.state().clone(),
        plan_refs: BTreeMap::new(),
        next_index: 0,
    };
    if let Err(e) = write_upload(store, Some(&st)) {
        push.abort();
        return Err(e.into());
    }
    push.suspend();
    Ok(())
}

/// The upload `id` and its push, resumed (lock renewed); an expired one is reaped.
fn resume<'a>(store: &'a dyn Store, id: &str, now_ms: u64) -> Result<(UploadState, FullPush<'a>), UploadError> {
    let st = read_upload(store)
        .filter(|s| s.push.owner == id)
        .ok_or(UploadError::NotFound)?;
    match FullPush::resume(store, st.push.clone(), now_ms) {
        Ok(push) => Ok((st, push)),
        Err(_) => {
            // Its lock expired: whoever takes the lock next cleans up; do it now if free.
            drop(crate::core::keyset::writer_lock::Lock::acquire(store, now_ms));
            Err(UploadError::Expired)
        }
    }
}

/// Gives the upload up: forgets it and clears what it wrote (a bounded part now, the
/// rest by `cleanup_step` or the next full push).
fn give_up(store: &dyn Store, push: FullPush<'_>, e: PushError) -> UploadError {
    let _ = write_upload(store, None);
    push.abort_with(CLEANUP_STEP_CHUNKS);
    UploadError::Push(e)
}

/// Adds a chunk of keys (a JSON array of key objects, as in `keys[]`) to upload `id`;
/// error paths continue the document's global index. Any error aborts the upload.
/// Returns how many keys the upload holds so far.
pub fn upload_keys(store: &dyn Store, id: &str, reader: impl std::io::Read, now_ms: u64) -> Result<u64, UploadError> {
    let (mut st, mut push) = resume(store, id, now_ms)?;
    let mut sink = KeySink {
        push: &mut push,
        plan_refs: std::mem::take(&mut st.plan_refs),
        failure: None,
        next: st.next_index,
    };
    let mut de = serde_json::Deserializer::from_reader(reader);
    let parsed = KeysSeed(&mut sink).deserialize(&mut de).and_then(|()| de.end());
    let KeySink {
        plan_refs,
        failure,
        next,
        ..
    } = sink;
    match (parsed, failure) {
        (_, Some(f)) => return Err(give_up(store, push, f)),
        (Err(e), None) => {
            let e = DocError {
                at: String::new(),
                message: format!("invalid keys chunk (a JSON array of keys): {e}"),
            };
            return Err(give_up(store, push, PushError::Doc(e)));
        }
        (Ok(()), None) => {}
    }
    st.plan_refs = plan_refs;
    st.next_index = next;
    st.push = push.state().clone();
    if let Err(e) = write_upload(store, Some(&st)) {
        return Err(give_up(store, push, PushError::Apply(e)));
    }
    let keys = st.push.keys();
    push.suspend();
    Ok(keys)
}

/// The body of a commit: what a full document holds besides its keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitDoc {
    version: u64,
    #[serde(default)]
    plans: BTreeMap<String, PlanDoc>,
}

/// Checks the plans and version (`commit` body: `{"version": V, "plans": {...}}`) and
/// makes the uploaded set the running one. Any error aborts the upload.
pub fn upload_commit(
    store: &dyn Store,
    id: &str,
    body: &[u8],
    now_ms: u64,
    force: bool,
) -> Result<ApplyReport, UploadError> {
    let (_, push) = resume(store, id, now_ms)?;
    let st = read_upload(store).ok_or(UploadError::NotFound)?;
    let doc_err = |at: &str, m: String| {
        PushError::Doc(DocError {
            at: at.to_string(),
            message: m,
        })
    };
    let doc: CommitDoc = match serde_json::from_slice(body) {
        Ok(d) => d,
        Err(e) => return Err(give_up(store, push, doc_err("", format!("invalid commit body: {e}")))),
    };
    if doc.version == 0 {
        return Err(give_up(store, push, doc_err("version", "must be >= 1".into())));
    }
    let mut plans = BTreeMap::new();
    for (name, p) in &doc.plans {
        match compile_plan(name, p, "plans") {
            Ok(plan) => plans.insert(name.clone(), plan),
            Err(e) => return Err(give_up(store, push, PushError::Doc(e))),
        };
    }
    if let Err(e) = check_plan_refs(&st.plan_refs, &plans) {
        return Err(give_up(store, push, e));
    }
    write_upload(store, None)?;
    push.commit_with(doc.version, &plans, force, CLEANUP_STEP_CHUNKS)
        .map_err(UploadError::from)
}

/// Aborts upload `id` (DELETE): the running set is untouched.
pub fn upload_abort(store: &dyn Store, id: &str, now_ms: u64) -> Result<(), UploadError> {
    let (_, push) = resume(store, id, now_ms)?;
    write_upload(store, None)?;
    push.abort_with(CLEANUP_STEP_CHUNKS);
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keyset::apply::ApplyOptions;
    use crate::core::keyset::delta::apply_delta;
    use crate::core::keyset::entry::{lookup, KeyEntry};
    use crate::core::keyset::meta::read_meta;
    use crate::core::keyset::names::KEY_ENTRY_PREFIX;
    use crate::core::keyset::stream::push_stream;
    use crate::core::keyset::sweep::cleanup_step;
    use crate::core::keyset::test_support::*;
    use crate::core::keyset::writer_lock::UPLOAD_TTL_MS;
    use crate::core::store::MemStore;
    use crate::core::store::Store;

    const PLANS: &str = r#"{"p":{}}"#;

    fn ids(from: usize, n: usize) -> Vec<String> {
        (from..from + n).map(|i| format!("k{i:011}")).collect()
    }
    fn chunk(ids: &[String]) -> String {
        format!("[{}]", ids.iter().map(|id| key(id, "p")).collect::<Vec<_>>().join(","))
    }
    fn doc(version: u64, ids: &[String]) -> String {
        format!(r#"{{"version":{version},"plans":{PLANS},"keys":{}}}"#, chunk(ids))
    }
    fn commit_body(version: u64) -> String {
        format!(r#"{{"version":{version},"plans":{PLANS}}}"#)
    }
    /// Uploads `ids` in chunks of `per`, then commits.
    fn staged(s: &MemStore, version: u64, ids: &[String], per: usize, now: u64) -> Result<ApplyReport, UploadError> {
        upload_begin(s, "up1", now)?;
        for c in ids.chunks(per) {
            upload_keys(s, "up1", chunk(c).as_bytes(), now)?;
        }
        upload_commit(s, "up1", commit_body(version).as_bytes(), now, false)
    }
    fn drain(s: &MemStore) {
        for _ in 0..1000 {
            if cleanup_step(s, 1_000, 5).unwrap() {
                return;
            }
        }
        panic!("cleanup never finished");
    }
    /// Every (id, record) active now, and whether any entry holds an inactive slot.
    fn snapshot(s: &MemStore) -> (Vec<(String, String)>, usize) {
        let m = read_meta(s).unwrap();
        let mut active = Vec::new();
        let mut stale = 0;
        for k in s.keys_with_prefix(KEY_ENTRY_PREFIX) {
            let Some(e) = s
                .get(&k)
                .0
                .filter(|v| !v.is_empty())
                .and_then(|v| KeyEntry::decode(&v, &k[KEY_ENTRY_PREFIX.len()..]))
            else {
                continue;
            };
            if let Some(r) = e.active(&m) {
                active.push((r.id.clone(), format!("{r:?}")));
            }
            stale += e.slots.iter().flatten().filter(|sl| sl.gen != m.gen).count();
        }
        (active, stale)
    }

    #[test]
    fn a_multi_chunk_upload_equals_a_one_shot_push() {
        let (one, two) = (MemStore::default(), MemStore::default());
        // crosses index chunks (4096 ids) and the per-callback cleanup budget
        let v1 = ids(0, 9000);
        let v2: Vec<String> = ids(3000, 9000);
        let r1 = push(&one, &doc(1, &v1)).unwrap();
        let s1 = staged(&two, 1, &v1, 2500, 1_000).unwrap();
        assert_eq!(r1, s1);
        let r2 = push(&one, &doc(2, &v2)).unwrap();
        let s2 = staged(&two, 2, &v2, 2500, 1_000).unwrap();
        assert_eq!(r2, s2);
        assert_eq!((s2.keys, s2.written, s2.removed), (9000, 9000, 3000));
        drain(&two);
        assert_eq!(snapshot(&one), snapshot(&two));
        assert_eq!(snapshot(&two).1, 0, "the previous generation was swept");
        assert_eq!(read_meta(&one), read_meta(&two));
        assert_eq!(one.value_bytes(), two.value_bytes());
        assert!(read_upload(&two).is_none());
    }

    /// Issue 10.3: a key naming a plan the set does not define is refused on every
    /// path, with an error naming the key and the plan, and the running set is kept.
    #[test]
    fn a_key_whose_plan_is_missing_is_refused_on_every_path() {
        use crate::core::keyset::document::{parse_json, DeltaDoc};
        let s = MemStore::default();
        push(&s, &doc(1, &ids(0, 2))).unwrap();
        let before = s.value_bytes();
        let orphan = key("orphan000001", "gold");
        // One-shot push (the plan check runs after the keys were streamed).
        let one_shot = format!(
            r#"{{"version":2,"plans":{PLANS},"keys":[{},{orphan}]}}"#,
            key("k00000000000", "p")
        );
        let Err(PushError::Doc(e)) = push(&s, &one_shot) else {
            panic!("accepted")
        };
        assert_eq!(e.to_string(), "keys[1] (id \"orphan000001\").plan: unknown plan 'gold'");
        // Staged upload: the key comes in a later chunk, the plans only with the commit.
        upload_begin(&s, "u", 1_000).unwrap();
        upload_keys(&s, "u", chunk(&ids(0, 3)).as_bytes(), 1_000).unwrap();
        upload_keys(&s, "u", format!("[{orphan}]").as_bytes(), 1_000).unwrap();
        let Err(UploadError::Push(PushError::Doc(e))) = upload_commit(&s, "u", commit_body(2).as_bytes(), 1_000, false)
        else {
            panic!("commit accepted")
        };
        assert_eq!(e.to_string(), "keys[3] (id \"orphan000001\").plan: unknown plan 'gold'");
        drain(&s);
        assert_eq!(s.value_bytes(), before, "running set untouched");
        assert_eq!(read_meta(&s).unwrap().version, 1);
        // Delta upsert: against the running plans, or a plan the same delta sets.
        let d: DeltaDoc =
            parse_json(format!(r#"{{"version":2,"ops":[{{"op":"upsert","key":{orphan}}}]}}"#).as_bytes()).unwrap();
        let running = |p: &str| p == "p";
        assert_eq!(
            d.compile(running).unwrap_err().to_string(),
            "ops[0].key (id \"orphan000001\").plan: unknown plan 'gold'"
        );
        let d: DeltaDoc = parse_json(
            format!(r#"{{"version":2,"ops":[{{"op":"upsert","key":{orphan}}},{{"op":"set_plan","name":"gold","plan":{{}}}}]}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert!(d.compile(running).is_ok());
        // A set_plan whose plan is itself invalid fails the batch, key and all.
        let d: DeltaDoc = parse_json(
            format!(r#"{{"version":2,"ops":[{{"op":"upsert","key":{orphan}}},{{"op":"set_plan","name":"gold","plan":{{"rate_limits":[{{"name":"x","rate":0,"per":"1s"}}]}}}}]}}"#)
                .as_bytes(),
        )
        .unwrap();
        assert!(d.compile(running).unwrap_err().to_string().starts_with("ops[1].gold:"));
    }

    #[test]
    fn removed_keys_work_until_the_commit() {
        let s = MemStore::default();
        push(&s, &doc(1, &ids(0, 3))).unwrap();
        upload_begin(&s, "u", 1_000).unwrap();
        upload_keys(&s, "u", chunk(&ids(2, 2)).as_bytes(), 1_000).unwrap();
        let m = read_meta(&s).unwrap();
        assert!(lookup(&s, &m, &ids(0, 1)[0]).is_some(), "old set intact before commit");
        assert!(
            lookup(&s, &m, &ids(3, 1)[0]).is_none(),
            "new key invisible before commit"
        );
        let r = upload_commit(&s, "u", commit_body(2).as_bytes(), 1_000, false).unwrap();
        assert_eq!((r.keys, r.removed), (2, 2));
        let m = read_meta(&s).unwrap();
        assert!(lookup(&s, &m, &ids(0, 1)[0]).is_none() && lookup(&s, &m, &ids(3, 1)[0]).is_some());
    }

    #[test]
    fn a_bad_key_in_a_later_chunk_aborts_and_leaves_nothing() {
        let s = MemStore::default();
        push(&s, &doc(1, &ids(100, 5))).unwrap();
        let before = (s.value_bytes(), snapshot(&s), read_meta(&s));
        upload_begin(&s, "u", 1_000).unwrap();
        assert_eq!(upload_keys(&s, "u", chunk(&ids(0, 3)).as_bytes(), 1_000), Ok(3));
        let mut bad = ids(3, 3);
        bad[1] = "short".into();
        let Err(UploadError::Push(PushError::Doc(e))) = upload_keys(&s, "u", chunk(&bad).as_bytes(), 1_000) else {
            panic!("accepted")
        };
        assert!(e.at.starts_with("keys[4]"), "global index: {e:?}");
        assert_eq!((s.value_bytes(), snapshot(&s), read_meta(&s)), before);
        assert_eq!(upload_keys(&s, "u", &b"[]"[..], 1_000), Err(UploadError::NotFound));
        // a malformed chunk names the global index too
        upload_begin(&s, "u2", 1_000).unwrap();
        upload_keys(&s, "u2", chunk(&ids(0, 2)).as_bytes(), 1_000).unwrap();
        let Err(UploadError::Push(PushError::Doc(e))) = upload_keys(&s, "u2", &br#"[{"id":1}]"#[..], 1_000) else {
            panic!("accepted")
        };
        assert!(e.message.contains("keys[2]"), "{e:?}");
        assert_eq!((s.value_bytes(), snapshot(&s), read_meta(&s)), before);
        // and the lock was released
        assert_eq!(staged(&s, 2, &ids(0, 3), 2, 1_000).unwrap().keys, 3);
    }

    #[test]
    fn duplicate_ids_across_chunks_are_rejected() {
        let s = MemStore::default();
        push(&s, &doc(1, &ids(100, 2))).unwrap();
        let before = s.value_bytes();
        upload_begin(&s, "u", 1_000).unwrap();
        upload_keys(&s, "u", chunk(&ids(0, 3)).as_bytes(), 1_000).unwrap();
        let e = upload_keys(&s, "u", chunk(&ids(2, 2)).as_bytes(), 1_000).unwrap_err();
        let UploadError::Push(PushError::Doc(e)) = e else {
            panic!("{e:?}")
        };
        assert_eq!(e.at, "keys[3].id");
        assert!(e.message.contains("duplicate"), "{e:?}");
        assert_eq!(s.value_bytes(), before);
    }

    #[test]
    fn a_stale_or_invalid_commit_is_refused_and_cleaned() {
        let s = MemStore::default();
        push(&s, &doc(5, &ids(100, 2))).unwrap();
        let before = (s.value_bytes(), snapshot(&s), read_meta(&s));
        let e = staged(&s, 5, &ids(0, 4), 2, 1_000).unwrap_err();
        assert_eq!(
            e,
            UploadError::Push(PushError::Apply(ApplyError::Stale { running: 5, pushed: 5 }))
        );
        assert_eq!((s.value_bytes(), snapshot(&s), read_meta(&s)), before);
        // a key referring to a plan the commit does not define
        upload_begin(&s, "u", 1_000).unwrap();
        upload_keys(&s, "u", chunk(&ids(0, 2)).as_bytes(), 1_000).unwrap();
        upload_keys(&s, "u", format!("[{}]", key("zzzzzzzzzzz9", "q")).as_bytes(), 1_000).unwrap();
        let e = upload_commit(&s, "u", commit_body(6).as_bytes(), 1_000, false).unwrap_err();
        let UploadError::Push(PushError::Doc(e)) = e else {
            panic!("{e:?}")
        };
        assert_eq!(e.at, r#"keys[2] (id "zzzzzzzzzzz9").plan"#);
        assert_eq!((s.value_bytes(), snapshot(&s), read_meta(&s)), before);
        // forced
        upload_begin(&s, "u", 1_000).unwrap();
        upload_keys(&s, "u", chunk(&ids(0, 2)).as_bytes(), 1_000).unwrap();
        assert!(upload_commit(&s, "u", commit_body(4).as_bytes(), 1_000, true).is_ok());
        assert_eq!(read_meta(&s).unwrap().version, 4);
    }

    #[test]
    fn an_abandoned_upload_is_cleaned_by_the_next_push() {
        let s = MemStore::default();
        push(&s, &doc(1, &ids(100, 2))).unwrap();
        let before = (s.value_bytes(), snapshot(&s), read_meta(&s));
        upload_begin(&s, "gone", 1_000).unwrap();
        upload_keys(&s, "gone", chunk(&ids(0, 5000)).as_bytes(), 1_000).unwrap();
        upload_keys(&s, "gone", chunk(&ids(5000, 10)).as_bytes(), 1_000).unwrap();
        // within the TTL the lock holds; a chunk renews it
        assert!(matches!(
            push_stream(
                &s,
                doc(2, &ids(100, 1)).as_bytes(),
                crate::core::time::Clock::Fixed(10_000),
                false
            ),
            Err(PushError::Apply(ApplyError::Busy))
        ));
        upload_keys(&s, "gone", &b"[]"[..], 10_000).unwrap();
        assert!(matches!(
            push_stream(
                &s,
                doc(2, &ids(100, 1)).as_bytes(),
                crate::core::time::Clock::Fixed(20_000),
                false
            ),
            Err(PushError::Apply(ApplyError::Busy))
        ));
        // UPLOAD_TTL_MS (15 s) without a request: the next writer reaps it
        upload_begin(&s, "next", 10_000 + UPLOAD_TTL_MS + 1).unwrap();
        assert_eq!(upload_keys(&s, "gone", &b"[]"[..], 26_000), Err(UploadError::NotFound));
        upload_abort(&s, "next", 26_000).unwrap();
        drain(&s);
        assert_eq!((s.value_bytes(), snapshot(&s), read_meta(&s)), before);
        // an expired upload nobody reaped yet answers Expired, and is reaped then
        upload_begin(&s, "late", 200_000).unwrap();
        upload_keys(&s, "late", chunk(&ids(0, 3)).as_bytes(), 200_000).unwrap();
        assert_eq!(upload_keys(&s, "late", &b"[]"[..], 300_000), Err(UploadError::Expired));
        assert_eq!(upload_keys(&s, "late", &b"[]"[..], 300_000), Err(UploadError::NotFound));
        drain(&s);
        assert_eq!((s.value_bytes(), snapshot(&s), read_meta(&s)), before);
    }

    #[test]
    fn other_writers_are_busy_during_an_upload() {
        let s = MemStore::default();
        push(&s, &doc(1, &ids(100, 2))).unwrap();
        upload_begin(&s, "u", 1_000).unwrap();
        upload_keys(&s, "u", chunk(&ids(0, 2)).as_bytes(), 1_000).unwrap();
        let d = crate::core::keyset::document::parse_json::<crate::core::keyset::document::DeltaDoc>(
            br#"{"version":7,"ops":[{"op":"revoke","id":"k00000000000"}]}"#,
        )
        .unwrap()
        .compile(|_| true)
        .unwrap();
        let o = ApplyOptions {
            force: false,
            now_ms: 2_000,
        };
        assert_eq!(apply_delta(&s, 7, &d, o), Err(ApplyError::Busy));
        assert!(matches!(
            push_stream(
                &s,
                doc(3, &ids(0, 1)).as_bytes(),
                crate::core::time::Clock::Fixed(2_000),
                false
            ),
            Err(PushError::Apply(ApplyError::Busy))
        ));
        assert_eq!(
            upload_begin(&s, "other", 2_000),
            Err(UploadError::Push(PushError::Apply(ApplyError::Busy)))
        );
        assert_eq!(upload_keys(&s, "other", &b"[]"[..], 2_000), Err(UploadError::NotFound));
        upload_commit(&s, "u", commit_body(2).as_bytes(), 2_000, false).unwrap();
        assert_eq!(apply_delta(&s, 7, &d, o).unwrap().removed, 1, "the lock was released");
    }

    /// Issue 10.14: an upload begun right after a large staged commit (whose sweep of
    /// the previous generation is left to the timer) must not finish that sweep inline:
    /// every inline step is bounded. It answers Busy until the sweep is done, then works.
    #[test]
    fn an_upload_after_a_large_commit_does_a_bounded_step_only() {
        use crate::core::keyset::sweep::CLEANUP_STEP_CHUNKS;
        use std::rc::Rc;
        let s = Rc::new(MemStore::default());
        let n = 4096 * (2 * CLEANUP_STEP_CHUNKS + 2);
        staged(&s, 1, &ids(0, n), 10_000, 1_000).unwrap();
        drain(&s);
        staged(&s, 2, &ids(n, n), 10_000, 1_000).unwrap(); // sweep of v1 left pending
        let writes = Rc::new(std::cell::Cell::new(0usize));
        let w2 = writes.clone();
        *s.before_set.borrow_mut() = Some(Box::new(move |k: &str| {
            if k.starts_with(KEY_ENTRY_PREFIX) {
                w2.set(w2.get() + 1);
            }
        }));
        let first = upload_begin(&*s, "u", 2_000);
        let inline = writes.get();
        *s.before_set.borrow_mut() = None;
        assert!(
            inline <= 4096 * CLEANUP_STEP_CHUNKS,
            "{inline} entries swept inline (budget {})",
            4096 * CLEANUP_STEP_CHUNKS
        );
        if first.is_ok() {
            upload_abort(&*s, "u", 2_000).unwrap();
        } else {
            assert_eq!(first, Err(UploadError::Push(PushError::Apply(ApplyError::Busy))));
        }
        drain(&s);
        upload_begin(&*s, "u2", 3_000).unwrap();
        upload_abort(&*s, "u2", 3_000).unwrap();
        drain(&s);
        assert_eq!(snapshot(&s).1, 0, "nothing stale left");
    }
}
