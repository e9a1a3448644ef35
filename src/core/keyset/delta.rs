//! Applying a batch of changes (upsert, revoke, enable/disable, set a plan) to the
//! running set.

use crate::core::keyset::apply::{check_version, ApplyError, ApplyOptions, ApplyReport};
use crate::core::keyset::document::CompiledOp;
use crate::core::keyset::entry::{lookup, update_entry, Slot};
use crate::core::keyset::index::append_index;
use crate::core::keyset::meta::Meta;
use crate::core::keyset::names::META;
use crate::core::keyset::plans::{read_plans, write_plans};
use crate::core::keyset::writer_lock::Lock;
use crate::core::limits::plan::Plan;
use crate::core::store::{read_value, Store};
use std::collections::BTreeMap;

/// Applies a batch of changes to the running set, op by op (each op is atomic for
/// requests; a revoke is visible to every worker as soon as this returns).
pub fn apply_delta(
    store: &dyn Store,
    version: u64,
    ops: &[CompiledOp],
    opts: ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    let _lock = Lock::acquire(store, opts.now_ms)?;
    let (meta_bytes, meta_cas) = read_value(store, META);
    let mut meta = meta_bytes
        .as_deref()
        .and_then(Meta::decode)
        .ok_or(ApplyError::NoKeySet)?;
    check_version(Some(&meta), version, opts.force)?;

    // Check every op first, so an unknown id fails the batch before anything changes.
    let mut upserted: Vec<&str> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            CompiledOp::Upsert(r) => upserted.push(&r.id),
            CompiledOp::Revoke(id) | CompiledOp::SetEnabled(id, _) => {
                if !upserted.contains(&id.as_str()) && lookup(store, &meta, id).is_none() {
                    return Err(ApplyError::UnknownKey {
                        at: format!("ops[{i}]"),
                        id: id.clone(),
                    });
                }
            }
            CompiledOp::SetPlan(..) => {}
        }
    }
    // Plan references were validated against the plans read before the lock; the set
    // may have been replaced since. Re-checked here, under the lock.
    if ops.iter().any(|o| matches!(o, CompiledOp::Upsert(_))) {
        let running = read_plans(store, &meta);
        let set_here = |name: &str| ops.iter().any(|o| matches!(o, CompiledOp::SetPlan(n, _) if n == name));
        for (i, op) in ops.iter().enumerate() {
            if let CompiledOp::Upsert(r) = op {
                if !running.contains_key(&r.plan) && !set_here(&r.plan) {
                    return Err(ApplyError::UnknownPlan {
                        at: format!("ops[{i}].key"),
                        id: r.id.clone(),
                        plan: r.plan.clone(),
                    });
                }
            }
        }
    }

    let slot = meta.slot as usize & 1;
    let mut plans: Option<BTreeMap<String, Plan>> = None;
    let mut new_ids = Vec::new();
    let mut report = ApplyReport {
        version,
        ..Default::default()
    };
    for op in ops {
        match op {
            CompiledOp::Upsert(rec) => {
                let mut existed = false;
                update_entry(store, &rec.id, |e| {
                    existed = e.active(&meta).is_some();
                    e.slots[slot] = Some(Slot {
                        gen: meta.gen,
                        record: rec.clone(),
                    });
                })?;
                if !existed {
                    meta.keys += 1;
                    new_ids.push(rec.id.clone());
                }
                report.written += 1;
            }
            CompiledOp::Revoke(id) => {
                let mut existed = false;
                update_entry(store, id, |e| {
                    existed = e.active(&meta).is_some();
                    if existed {
                        e.slots[slot] = None;
                    }
                })?;
                if existed {
                    meta.keys = meta.keys.saturating_sub(1);
                    report.removed += 1;
                }
            }
            CompiledOp::SetEnabled(id, on) => {
                update_entry(store, id, |e| {
                    if let Some(r) = e.active_mut(&meta) {
                        r.enabled = *on;
                    }
                })?;
                report.written += 1;
            }
            CompiledOp::SetPlan(name, plan) => {
                plans
                    .get_or_insert_with(|| read_plans(store, &meta))
                    .insert(name.clone(), plan.clone());
            }
        }
    }
    append_index(store, meta.slot, &new_ids)?;
    if let Some(p) = &plans {
        write_plans(store, meta.slot, meta.gen, p)?;
        meta.plans_rev += 1;
    }
    meta.version = version;
    meta.updated_at = (opts.now_ms / 1000) as i64;
    store.set(META, &meta.encode(), Some(meta_cas))?;
    report.keys = meta.keys;
    Ok(report)
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
}
