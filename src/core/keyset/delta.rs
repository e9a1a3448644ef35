//! Applying a batch of changes (upsert, revoke, enable/disable, set a plan) to the
//! running set.

use crate::core::keyset::apply::{check_version, ApplyError, ApplyOptions, ApplyReport};
use crate::core::keyset::document::CompiledOp;
use crate::core::keyset::entry::{lookup, update_entry, Slot};
use crate::core::keyset::index::write_index_at;
use crate::core::keyset::meta::Meta;
use crate::core::keyset::names::{index_len_name, DELTA, META};
use crate::core::keyset::plans::{read_plans, write_plans, Plans};
use crate::core::keyset::writer_lock::Lock;
use crate::core::store::{read_u64, read_value, Store};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A delta being applied, stored in `km/delta` before its first write and emptied
/// after its last. Everything it changes is computed up front from the set as it was
/// under the lock (the final key count, the index positions of new ids, the next
/// plans), so applying it is a sequence of idempotent writes: whoever takes the writer
/// lock next after an interruption (a host error, a VM that died) replays it from the
/// start and gets the same result, and version, key count and `plans_rev` always move
/// together in the final `km/meta` write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Journal {
    version: u64,
    ops: Vec<CompiledOp>,
    gen: u64,
    slot: u8,
    /// The key count once applied.
    keys: u64,
    /// Ids to append to the slot's index, at position `index_at`.
    new_ids: Vec<String>,
    index_at: u64,
    /// (revision, plans) to switch to, when the delta sets plans.
    plans: Option<(u64, Plans)>,
    updated_at: i64,
    report: ApplyReport,
}

/// A delta finished on behalf of an interrupted writer (see `Lock`), so that writer's
/// retry of the same delta is answered with its result instead of "stale".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub version: u64,
    pub ops: Vec<CompiledOp>,
    pub report: ApplyReport,
}

/// Finishes an interrupted delta, if one is recorded. Called with the writer lock just
/// taken, before anything else is written.
pub(crate) fn finish_pending(store: &dyn Store) -> Result<Option<Recovered>, ApplyError> {
    let Some(j) = read_value(store, DELTA)
        .0
        .and_then(|b| bincode::deserialize::<Journal>(&b).ok())
    else {
        return Ok(None);
    };
    log::warn!("keymeter: finishing interrupted delta to version {}", j.version);
    run(store, &j)?;
    Ok(Some(Recovered {
        version: j.version,
        ops: j.ops,
        report: j.report,
    }))
}

/// Applies a batch of changes to the running set (see `Journal`). Each op is atomic
/// for requests and a revoke is visible to every worker as soon as this returns; an
/// interrupted batch is finished by the next writer.
pub fn apply_delta(
    store: &dyn Store,
    version: u64,
    ops: &[CompiledOp],
    opts: ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    let lock = Lock::acquire(store, opts.now_ms)?;
    if let Some(r) = lock.recovered().filter(|r| r.version == version && r.ops == ops) {
        return Ok(r.report.clone());
    }
    let meta = read_value(store, META)
        .0
        .as_deref()
        .and_then(Meta::decode)
        .ok_or(ApplyError::NoKeySet)?;
    check_version(Some(&meta), version, opts.force)?;
    let journal = plan(store, &meta, version, ops, opts.now_ms)?;
    store.set(DELTA, &bincode::serialize(&journal).expect("delta encodes"), None)?;
    run(store, &journal)?;
    Ok(journal.report)
}

/// Checks every op against the running set and computes the journal; writes nothing.
fn plan(store: &dyn Store, meta: &Meta, version: u64, ops: &[CompiledOp], now_ms: u64) -> Result<Journal, ApplyError> {
    // Whether each id the batch touches is active, as the ops go.
    let mut active: HashMap<&str, bool> = HashMap::new();
    let at_start = |id: &str| lookup(store, meta, id).is_some();
    let is_active = |id: &str, active: &mut HashMap<&str, bool>| -> bool {
        active.get(id).copied().unwrap_or_else(|| at_start(id))
    };
    let running_plans = read_plans(store, meta);
    let set_here = |name: &str| ops.iter().any(|o| matches!(o, CompiledOp::SetPlan(n, _) if n == name));
    let mut keys = meta.keys;
    let mut new_ids: Vec<String> = Vec::new();
    let mut next_plans: Option<Plans> = None;
    let mut report = ApplyReport {
        version,
        ..Default::default()
    };
    for (i, op) in ops.iter().enumerate() {
        match op {
            CompiledOp::Upsert(r) => {
                // Plan references were validated against the plans read before the
                // lock; the set may have been replaced since. Re-checked here.
                if !running_plans.contains_key(&r.plan) && !set_here(&r.plan) {
                    return Err(ApplyError::UnknownPlan {
                        at: format!("ops[{i}].key"),
                        id: r.id.clone(),
                        plan: r.plan.clone(),
                    });
                }
                if !is_active(&r.id, &mut active) {
                    keys += 1;
                    if !new_ids.contains(&r.id) {
                        new_ids.push(r.id.clone());
                    }
                }
                active.insert(&r.id, true);
                report.written += 1;
            }
            CompiledOp::Revoke(id) | CompiledOp::SetEnabled(id, _) => {
                let was = is_active(id, &mut active);
                let upserted_before = ops[..i]
                    .iter()
                    .any(|o| matches!(o, CompiledOp::Upsert(r) if r.id == *id));
                if !upserted_before && !at_start(id) {
                    return Err(ApplyError::UnknownKey {
                        at: format!("ops[{i}]"),
                        id: id.clone(),
                    });
                }
                if let CompiledOp::Revoke(_) = op {
                    if was {
                        keys = keys.saturating_sub(1);
                        report.removed += 1;
                    }
                    active.insert(id, false);
                } else {
                    report.written += 1;
                }
            }
            CompiledOp::SetPlan(name, p) => {
                next_plans
                    .get_or_insert_with(|| running_plans.clone())
                    .insert(name.clone(), p.clone());
            }
        }
    }
    report.keys = keys;
    Ok(Journal {
        version,
        ops: ops.to_vec(),
        gen: meta.gen,
        slot: meta.slot,
        keys,
        new_ids,
        index_at: read_u64(store, &index_len_name(meta.slot)),
        plans: next_plans.map(|p| (meta.plans_rev + 1, p)),
        updated_at: (now_ms / 1000) as i64,
        report,
    })
}

/// Applies a journal; every step is idempotent, so it can be re-run from the start.
fn run(store: &dyn Store, j: &Journal) -> Result<(), ApplyError> {
    let (meta_bytes, mut meta_cas) = read_value(store, META);
    let mut meta = meta_bytes
        .as_deref()
        .and_then(Meta::decode)
        .ok_or(ApplyError::NoKeySet)?;
    if meta.gen != j.gen {
        // Cannot happen under the writer lock; never apply a delta to another set.
        store.set(DELTA, &[], None)?;
        return Err(ApplyError::Busy);
    }
    let slot = j.slot as usize & 1;
    // Plans first, switched by plans_rev: keys that name a new plan find it.
    if let Some((rev, plans)) = &j.plans {
        if meta.plans_rev != *rev {
            let current = read_plans(store, &meta);
            write_plans(store, j.slot, j.gen, &[(meta.plans_rev, &current), (*rev, plans)])?;
            meta.plans_rev = *rev;
            store.set(META, &meta.encode(), Some(meta_cas))?;
            meta_cas = store.get(META).1;
        }
    }
    let as_meta = meta;
    for op in &j.ops {
        match op {
            CompiledOp::Upsert(rec) => {
                update_entry(store, &rec.id, |e| {
                    e.slots[slot] = Some(Slot {
                        gen: j.gen,
                        record: rec.clone(),
                    });
                })?;
            }
            CompiledOp::Revoke(id) => {
                update_entry(store, id, |e| {
                    if e.active(&as_meta).is_some() {
                        e.slots[slot] = None;
                    }
                })?;
            }
            CompiledOp::SetEnabled(id, on) => {
                update_entry(store, id, |e| {
                    if let Some(r) = e.active_mut(&as_meta) {
                        r.enabled = *on;
                    }
                })?;
            }
            CompiledOp::SetPlan(..) => {}
        }
    }
    write_index_at(store, j.slot, j.index_at as usize, &j.new_ids)?;
    meta.version = j.version;
    meta.keys = j.keys;
    meta.updated_at = j.updated_at;
    store.set(META, &meta.encode(), Some(meta_cas))?;
    store.set(DELTA, &[], None)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keyset::document::{parse_json, DeltaDoc};
    use crate::core::keyset::full_push::apply_full;
    use crate::core::keyset::meta::read_meta;
    use crate::core::keyset::test_support::*;
    use crate::core::store::MemStore;
    use crate::core::store::Store;
    use crate::core::store::StoreError;

    fn delta(json: &str, s: &MemStore) -> Result<ApplyReport, ApplyError> {
        let d: DeltaDoc = parse_json(json.as_bytes()).unwrap();
        let m = read_meta(s);
        let plans = m.map(|m| read_plans(s, &m)).unwrap_or_default();
        let ops = d.compile(|p| plans.contains_key(p)).unwrap();
        apply_delta(s, d.version, &ops, opts())
    }

    /// The admin API compiles a delta against the plans it read before taking the
    /// writer lock; a full push landing in between can drop a plan the delta's keys
    /// name. Checked again under the lock, so no key ever points at a missing plan.
    #[test]
    fn a_delta_key_whose_plan_vanished_before_the_lock_is_refused() {
        let s = MemStore::default();
        apply_full(&s, &set(1, &["aaaaaaaaaaa1"]), opts()).unwrap();
        let up = format!(
            r#"{{"version":5,"ops":[{{"op":"upsert","key":{{"id":"aaaaaaaaaaa3","hash":"{H}","consumer":"c","plan":"gone"}}}}]}}"#
        );
        let d: DeltaDoc = parse_json(up.as_bytes()).unwrap();
        // Compiled while the running set still had plan "gone" ...
        let ops = d.compile(|p| p == "p" || p == "gone").unwrap();
        // ... then applied to a set that has not (plan "p" only).
        let e = apply_delta(&s, d.version, &ops, opts()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ops[0].key (id \"aaaaaaaaaaa3\").plan: unknown plan 'gone' (not in the running set nor set by this delta)"
        );
        assert_eq!(active(&s), ["aaaaaaaaaaa1"], "nothing applied");
        assert_eq!(read_meta(&s).unwrap().version, 1);
        // The same delta with a set_plan for it goes through.
        let ok = format!(
            r#"{{"version":5,"ops":[{{"op":"upsert","key":{{"id":"aaaaaaaaaaa3","hash":"{H}","consumer":"c","plan":"gone"}}}},{{"op":"set_plan","name":"gone","plan":{{}}}}]}}"#
        );
        assert!(delta(&ok, &s).is_ok());
    }

    #[test]
    fn deltas_upsert_revoke_disable_and_plans() {
        let s = MemStore::default();
        assert_eq!(
            delta(r#"{"version":1,"ops":[]}"#, &s).unwrap_err(),
            ApplyError::NoKeySet
        );
        apply_full(&s, &set(1, &["aaaaaaaaaaa1", "aaaaaaaaaaa2"]), opts()).unwrap();
        let up = format!(
            r#"{{"version":2,"ops":[{{"op":"upsert","key":{{"id":"aaaaaaaaaaa3","hash":"{H}","consumer":"c","plan":"q"}}}},{{"op":"set_plan","name":"q","plan":{{}}}},{{"op":"revoke","id":"aaaaaaaaaaa1"}},{{"op":"disable","id":"aaaaaaaaaaa2"}}]}}"#
        );
        let r = delta(&up, &s).unwrap();
        assert_eq!((r.keys, r.removed, r.version), (2, 1, 2));
        assert_eq!(active(&s), ["aaaaaaaaaaa2", "aaaaaaaaaaa3"]);
        let m = read_meta(&s).unwrap();
        assert!(!lookup(&s, &m, "aaaaaaaaaaa2").unwrap().enabled);
        assert!(read_plans(&s, &m).contains_key("q"));
        assert_eq!(delta(&up, &s).unwrap_err(), ApplyError::Stale { running: 2, pushed: 2 });
        let bad = r#"{"version":3,"ops":[{"op":"revoke","id":"aaaaaaaaaaa2"},{"op":"enable","id":"zzzzzzzzzzzz"}]}"#;
        assert!(matches!(delta(bad, &s).unwrap_err(), ApplyError::UnknownKey { .. }));
        assert_eq!(
            active(&s),
            ["aaaaaaaaaaa2", "aaaaaaaaaaa3"],
            "a failed batch changed nothing"
        );
        // a later full push sweeps delta-added keys too
        apply_full(&s, &set(10, &["aaaaaaaaaaa2"]), opts()).unwrap();
        assert_eq!(active(&s), ["aaaaaaaaaaa2"]);
        assert_eq!(s.get("k/aaaaaaaaaaa3").0.unwrap().len(), 0);
    }

    fn compiled(json: &str) -> (u64, Vec<CompiledOp>) {
        let d: DeltaDoc = parse_json(json.as_bytes()).unwrap();
        (d.version, d.compile(|_| true).unwrap())
    }

    fn batch_v2() -> (u64, Vec<CompiledOp>) {
        compiled(&format!(
            r#"{{"version":2,"ops":[{{"op":"upsert","key":{{"id":"aaaaaaaaaaa3","hash":"{H}","consumer":"c","plan":"q"}}}},{{"op":"set_plan","name":"q","plan":{{}}}},{{"op":"revoke","id":"aaaaaaaaaaa1"}},{{"op":"disable","id":"aaaaaaaaaaa2"}}]}}"#
        ))
    }

    fn fail_writes_to(s: &MemStore, key: &'static str) {
        *s.fail_set.borrow_mut() = Some(Box::new(move |k: &str| (k == key).then_some(StoreError::Host)));
    }

    /// Issue 10.13: a batch interrupted after some ops were applied is finished by the
    /// next writer (here the client's retry of the same delta, which then succeeds):
    /// version, key count and plans_rev end up as if it had run at once.
    #[test]
    fn an_interrupted_delta_is_finished_and_its_retry_succeeds() {
        let s = MemStore::default();
        apply_full(&s, &set(1, &["aaaaaaaaaaa1", "aaaaaaaaaaa2"]), opts()).unwrap();
        let before = read_meta(&s).unwrap();
        let (v, ops) = batch_v2();
        fail_writes_to(&s, "k/aaaaaaaaaaa1"); // the revoke, after the upsert was applied
        assert!(apply_delta(&s, v, &ops, opts()).is_err());
        *s.fail_set.borrow_mut() = None;
        let r = apply_delta(&s, v, &ops, opts()).unwrap();
        assert_eq!((r.version, r.keys, r.removed), (2, 2, 1));
        let m = read_meta(&s).unwrap();
        assert_eq!((m.version, m.keys, m.plans_rev), (2, 2, before.plans_rev + 1));
        assert_eq!(active(&s), ["aaaaaaaaaaa2", "aaaaaaaaaaa3"]);
        assert!(!lookup(&s, &m, "aaaaaaaaaaa2").unwrap().enabled);
        assert!(read_plans(&s, &m).contains_key("q"));
    }

    /// Issue 10.13: any later writer finishes it too (here a different delta).
    #[test]
    fn an_interrupted_delta_is_finished_by_the_next_writer() {
        let s = MemStore::default();
        apply_full(&s, &set(1, &["aaaaaaaaaaa1", "aaaaaaaaaaa2"]), opts()).unwrap();
        let (v, ops) = compiled(&format!(
            r#"{{"version":2,"ops":[{{"op":"upsert","key":{{"id":"aaaaaaaaaaa3","hash":"{H}","consumer":"c","plan":"q"}}}},{{"op":"set_plan","name":"q","plan":{{}}}}]}}"#
        ));
        fail_writes_to(&s, META);
        assert!(apply_delta(&s, v, &ops, opts()).is_err());
        *s.fail_set.borrow_mut() = None;
        let (v3, ops3) = compiled(r#"{"version":3,"ops":[{"op":"enable","id":"aaaaaaaaaaa2"}]}"#);
        let r = apply_delta(&s, v3, &ops3, opts()).unwrap();
        assert_eq!((r.version, r.keys), (3, 3));
        let m = read_meta(&s).unwrap();
        assert_eq!(m.plans_rev, 2);
        assert_eq!(active(&s), ["aaaaaaaaaaa1", "aaaaaaaaaaa2", "aaaaaaaaaaa3"]);
        assert!(lookup(&s, &m, "aaaaaaaaaaa2").unwrap().enabled);
        assert!(read_plans(&s, &m).contains_key("q"));
    }

    /// Issue 10.13: workers cache plans by (generation, plans_rev). Until the meta
    /// that bumps plans_rev is written, readers of the running meta see the old plans,
    /// so no worker caches new plans under the old revision.
    #[test]
    fn plans_switch_only_with_plans_rev() {
        let s = MemStore::default();
        apply_full(&s, &set(1, &["aaaaaaaaaaa1", "aaaaaaaaaaa2"]), opts()).unwrap();
        let (v, ops) = batch_v2();
        fail_writes_to(&s, META);
        assert!(apply_delta(&s, v, &ops, opts()).is_err());
        *s.fail_set.borrow_mut() = None;
        let m = read_meta(&s).unwrap();
        let plans = read_plans(&s, &m);
        assert!(
            !plans.contains_key("q") || m.plans_rev > 1,
            "new plans visible under the old plans_rev"
        );
    }

    /// Issue 10.15: a delta that creates one key writes O(1) bytes of index, not the
    /// whole index (~12 MB at 1M keys).
    #[test]
    fn a_delta_upsert_does_not_rewrite_the_index() {
        use std::rc::Rc;
        let s = Rc::new(MemStore::default());
        let many = ids(5 * 4096 + 1);
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        apply_full(&*s, &set(1, &refs), opts()).unwrap();
        let written = Rc::new(std::cell::Cell::new(0usize));
        let (w2, weak) = (written.clone(), Rc::downgrade(&s));
        *s.before_set.borrow_mut() = Some(Box::new(move |k: &str| {
            if k.starts_with("km/idx/") {
                let _ = weak.upgrade();
                w2.set(w2.get() + 1);
            }
        }));
        let (v, ops) = compiled(&format!(
            r#"{{"version":2,"ops":[{{"op":"upsert","key":{{"id":"zzzzzzzzzzz1","hash":"{H}","consumer":"c","plan":"p"}}}}]}}"#
        ));
        apply_delta(&*s, v, &ops, opts()).unwrap();
        *s.before_set.borrow_mut() = None;
        assert!(written.get() <= 3, "{} index writes for one new key", written.get());
        assert_eq!(crate::core::keyset::index::read_index(&*s, 0).len(), many.len() + 1);
        assert_eq!(active(&s).len(), many.len() + 1);
    }
}
