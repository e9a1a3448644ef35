//! A full snapshot written key by key into the inactive slot, then made active in one
//! CAS on `km/meta`.

use crate::core::auth::key_record::KeyRecord;
#[cfg(test)]
use crate::core::keyset::apply::ApplyOptions;
use crate::core::keyset::apply::{check_version, ApplyError, ApplyReport};
#[cfg(test)]
use crate::core::keyset::document::KeySet;
use crate::core::keyset::entry::{update_entry, Slot};
use crate::core::keyset::entry_format::slot_len;
use crate::core::keyset::index::INDEX_CHUNK;
use crate::core::keyset::meta::{next_gen, Meta};
use crate::core::keyset::names::{index_chunk_name, index_len_name, META};
use crate::core::keyset::plans::write_plans;
use crate::core::keyset::sweep::{queue_abort_cleanup, queue_cleanup, run_cleanup, Cleanup, CLEANUP_STEP_CHUNKS};
use crate::core::keyset::writer_lock::Lock;
use crate::core::limits::plan::Plan;
use crate::core::store::{read_u64, read_value, Store};
use crate::core::time::Clock;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Replaces the whole key set atomically from an in-memory set (see the module doc).
/// Production paths stream documents through `keyset::stream` instead; this is the
/// compact form for tests.
#[cfg(test)]
pub(crate) fn apply_full(store: &dyn Store, set: &KeySet, opts: ApplyOptions) -> Result<ApplyReport, ApplyError> {
    let mut push = FullPush::begin(store, Clock::Fixed(opts.now_ms))?;
    for rec in &set.keys {
        if let Err(e) = push.add(rec) {
            push.abort();
            return Err(match e {
                // `KeySetDoc::compile` already rejected duplicate ids.
                AddError::Duplicate => ApplyError::Host,
                AddError::Apply(e) => e,
            });
        }
    }
    push.commit(set.version, &set.plans, opts.force)
}

/// How often (in keys added) a push looks at the clock to renew the writer lock.
const RENEW_EVERY_KEYS: u64 = 256;

/// Why a key could not be added to a full push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddError {
    /// The same id was already added to this push.
    Duplicate,
    Apply(ApplyError),
}

/// A full snapshot being written key by key into the inactive slot, so a document can
/// be applied while it is parsed: the filter never holds the whole set in memory, and
/// nothing is visible to requests before `commit` flips the generation. An abandoned
/// push (`abort`, or an error) leaves only slots of a generation that never becomes
/// active, and `abort` clears those too.
///
/// A staged upload spreads one push over several requests: `suspend` returns the state
/// to persist (the lock stays held by the upload id until its deadline) and `resume`
/// continues it from a later request, renewing the lock.
pub struct FullPush<'a> {
    store: &'a dyn Store,
    lock: Lock<'a>,
    clock: Clock<'a>,
    st: PushState,
}

/// Everything a `FullPush` needs to continue in another request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushState {
    /// The upload id holding the lock (empty for a one-shot push).
    pub owner: String,
    pub(crate) running: Option<Meta>,
    meta_cas: u32,
    pub(crate) gen: u64,
    pub(crate) slot: u8,
    keys: u64,
    /// Keys added that are active in the running set (for the removed count).
    kept: u64,
    entry_bytes: u64,
    /// Ids not yet written to an index chunk, and how many chunks were written.
    pub(crate) index_buf: Vec<u8>,
    pub(crate) index_chunks: usize,
    pub(crate) old_index_len: usize,
    now_ms: u64,
}

impl PushState {
    pub fn keys(&self) -> u64 {
        self.keys
    }
}

impl<'a> FullPush<'a> {
    /// Takes the writer lock and a fresh generation. `clock` renews the lock while
    /// keys are added: a live clock for a push that may run for seconds.
    pub fn begin(store: &'a dyn Store, clock: Clock<'a>) -> Result<FullPush<'a>, ApplyError> {
        let now_ms = clock.now_ms();
        let lock = Lock::acquire(store, now_ms)?;
        Self::start(store, lock, clock, "")
    }

    /// `begin` for a staged upload: the lock is held by `owner` (the upload id).
    pub fn begin_owned(store: &'a dyn Store, now_ms: u64, owner: &str) -> Result<FullPush<'a>, ApplyError> {
        let lock = Lock::acquire_owned(store, now_ms, owner)?;
        Self::start(store, lock, Clock::Fixed(now_ms), owner)
    }

    fn start(store: &'a dyn Store, lock: Lock<'a>, clock: Clock<'a>, owner: &str) -> Result<FullPush<'a>, ApplyError> {
        let now_ms = clock.now_ms();
        // The slot about to be written must be clean (and its index free) first.
        // Bounded: after a large commit the sweep of the previous generation takes the
        // timer a few seconds; a push begun meanwhile is told to retry, not stalled.
        if !run_cleanup(store, CLEANUP_STEP_CHUNKS, true)? {
            return Err(ApplyError::Busy);
        }
        let (meta_bytes, meta_cas) = read_value(store, META);
        let running = meta_bytes.as_deref().and_then(Meta::decode);
        let gen = next_gen(store)?;
        let slot = running.map_or(0, |m| 1 - (m.slot & 1));
        let old_index_len = read_u64(store, &index_len_name(slot)) as usize;
        Ok(FullPush {
            store,
            lock,
            clock,
            st: PushState {
                owner: owner.to_string(),
                running,
                meta_cas,
                gen,
                slot,
                keys: 0,
                kept: 0,
                entry_bytes: 0,
                index_buf: Vec::with_capacity(INDEX_CHUNK * 12),
                index_chunks: 0,
                old_index_len,
                now_ms,
            },
        })
    }

    /// Continues a suspended push; `Busy` when its lock expired or was taken.
    pub fn resume(store: &'a dyn Store, st: PushState, now_ms: u64) -> Result<FullPush<'a>, ApplyError> {
        let lock = Lock::renew(store, now_ms, &st.owner)?;
        let mut st = st;
        st.now_ms = now_ms;
        Ok(FullPush {
            store,
            lock,
            clock: Clock::Fixed(now_ms),
            st,
        })
    }

    /// Ends this request's part of the push, leaving the lock held by the owner.
    pub fn suspend(self) -> PushState {
        let FullPush { lock, st, .. } = self;
        lock.keep();
        st
    }

    pub fn state(&self) -> &PushState {
        &self.st
    }

    /// The running version when the push began (`None`: nothing loaded).
    pub fn running_version(&self) -> Option<u64> {
        self.st.running.map(|m| m.version)
    }

    /// Writes one key into the inactive slot.
    pub fn add(&mut self, rec: &KeyRecord) -> Result<(), AddError> {
        let (gen, slot, running) = (self.st.gen, self.st.slot as usize, self.st.running);
        let mut duplicate = false;
        let mut kept = false;
        let e = update_entry(self.store, &rec.id, |e| match &e.slots[slot] {
            Some(s) if s.gen == gen => duplicate = true,
            _ => {
                kept = running.is_some_and(|m| e.active(&m).is_some());
                e.slots[slot] = Some(Slot {
                    gen,
                    record: rec.clone(),
                })
            }
        })
        .map_err(AddError::Apply)?;
        if duplicate {
            return Err(AddError::Duplicate);
        }
        // Sized with only the new slot: what the entry holds after the sweep.
        self.st.entry_bytes += e.slots[slot].as_ref().map_or(0, |s| 1 + slot_len(s) as u64);
        self.st.keys += 1;
        self.st.kept += u64::from(kept);
        if self.st.keys.is_multiple_of(RENEW_EVERY_KEYS) {
            self.lock.keep_alive(self.clock.now_ms()).map_err(AddError::Apply)?;
        }
        self.st.index_buf.extend_from_slice(rec.id.as_bytes());
        if self.st.index_buf.len() == INDEX_CHUNK * 12 {
            self.flush_index_chunk().map_err(AddError::Apply)?;
        }
        Ok(())
    }

    fn flush_index_chunk(&mut self) -> Result<(), ApplyError> {
        if !self.st.index_buf.is_empty() {
            self.store.set(
                &index_chunk_name(self.st.slot, self.st.index_chunks),
                &self.st.index_buf,
                None,
            )?;
            self.st.index_buf.clear();
            self.st.index_chunks += 1;
        }
        Ok(())
    }

    /// Checks the version, then makes the pushed set the active one in one CAS and
    /// sweeps the previous generation.
    pub fn commit(self, version: u64, plans: &BTreeMap<String, Plan>, force: bool) -> Result<ApplyReport, ApplyError> {
        self.commit_with(version, plans, force, CLEANUP_STEP_CHUNKS)
    }

    /// `commit` doing at most `budget` index chunks of the sweep in this call; the rest
    /// is left to `cleanup_step` (or the next full push), so the callback stays short.
    /// Requests never see the old records: they are of an inactive generation.
    pub fn commit_with(
        mut self,
        version: u64,
        plans: &BTreeMap<String, Plan>,
        force: bool,
        budget: usize,
    ) -> Result<ApplyReport, ApplyError> {
        if let Err(e) = check_version(self.st.running.as_ref(), version, force) {
            self.abort_with(budget);
            return Err(e);
        }
        // Still ours? A writer that lost its lease must not flip the set (its slots are
        // of a generation that never becomes active).
        let now_ms = self.clock.now_ms();
        self.lock.confirm(now_ms)?;
        self.st.now_ms = now_ms;
        let store = self.store;
        let slot = self.st.slot;
        let plans_rev = self.st.running.map_or(0, |m| m.plans_rev) + 1;
        write_plans(store, slot, self.st.gen, &[(plans_rev, plans)])?;
        self.flush_index_chunk()?;
        for j in self.st.index_chunks..self.st.old_index_len.div_ceil(INDEX_CHUNK) {
            store.set(&index_chunk_name(slot, j), &[], None)?;
        }
        store.set(&index_len_name(slot), &self.st.keys.to_le_bytes(), None)?;
        let st = &self.st;
        let meta = Meta {
            gen: st.gen,
            slot,
            version,
            keys: st.keys,
            plans_rev,
            updated_at: (st.now_ms / 1000) as i64,
            avg_entry_bytes: st.entry_bytes / st.keys.max(1),
        };
        store.set(META, &meta.encode(), Some(st.meta_cas))?;
        let removed = st.running.map_or(0, |m| m.keys.saturating_sub(st.kept));
        if let Some(old) = st.running.filter(|old| old.slot & 1 != slot & 1) {
            let old_len = read_u64(store, &index_len_name(old.slot)) as usize;
            // The set is switched: a failure from here on only delays the sweep of the
            // old generation's (inert) records, and must not report the push failed.
            let job = Cleanup {
                slot: old.slot,
                gen: old.gen,
                chunks: old_len.div_ceil(INDEX_CHUNK),
                next: 0,
            };
            if let Err(e) = queue_cleanup(store, job).and_then(|()| run_cleanup(store, budget, true)) {
                log::warn!("keymeter: sweep of generation {} not started: {e}", old.gen);
            }
        }
        Ok(ApplyReport {
            version,
            keys: meta.keys,
            written: self.st.keys,
            removed,
        })
    }

    /// Gives the push up, clearing the slots it wrote so they take no memory.
    pub fn abort(self) {
        self.abort_with(CLEANUP_STEP_CHUNKS)
    }

    /// `abort` clearing at most `budget` index chunks now, the rest later (see
    /// `commit_with`); the written slots are of a generation that never becomes active.
    pub fn abort_with(self, budget: usize) {
        if queue_abort_cleanup(self.store, &self.st).is_ok() {
            let _ = run_cleanup(self.store, budget, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keyset::entry::{lookup, KeyEntry};
    use crate::core::keyset::meta::{read_meta, ENTRY_OVERHEAD_BYTES};
    use crate::core::keyset::plans::read_plans;
    use crate::core::keyset::test_support::*;
    use crate::core::store::MemStore;
    use crate::core::store::Store;

    #[test]
    fn full_push_replaces_and_sweeps() {
        let s = MemStore::default();
        assert!(read_meta(&s).is_none());
        let r = apply_full(&s, &set(1, &["aaaaaaaaaaa1", "aaaaaaaaaaa2"]), opts()).unwrap();
        assert_eq!((r.keys, r.removed), (2, 0));
        assert_eq!(active(&s), ["aaaaaaaaaaa1", "aaaaaaaaaaa2"]);
        let r = apply_full(&s, &set(2, &["aaaaaaaaaaa2", "aaaaaaaaaaa3"]), opts()).unwrap();
        assert_eq!((r.keys, r.removed), (2, 1));
        assert_eq!(active(&s), ["aaaaaaaaaaa2", "aaaaaaaaaaa3"]);
        // the removed key's entry is an empty value; live entries hold one slot only
        assert_eq!(s.get("k/aaaaaaaaaaa1").0.unwrap().len(), 0);
        let e = KeyEntry::decode(&s.get("k/aaaaaaaaaaa2").0.unwrap(), "aaaaaaaaaaa2").unwrap();
        assert_eq!(e.slots.iter().filter(|s| s.is_some()).count(), 1);
        let m = read_meta(&s).unwrap();
        assert_eq!(read_plans(&s, &m).len(), 1);
        assert!(
            m.avg_entry_bytes > 20 && m.avg_entry_bytes < 300,
            "{}",
            m.avg_entry_bytes
        );
        assert_eq!(
            m.memory_estimate_bytes(),
            2 * (m.avg_entry_bytes + ENTRY_OVERHEAD_BYTES)
        );
    }

    #[test]
    fn memory_stays_bounded_over_many_pushes() {
        let s = MemStore::default();
        let all = ids(50);
        let mut sizes = Vec::new();
        for v in 1..=20u64 {
            // rotate through different subsets
            let start = (v as usize * 7) % 25;
            let subset: Vec<&str> = all[start..start + 25].iter().map(String::as_str).collect();
            apply_full(&s, &set(v, &subset), opts()).unwrap();
            sizes.push((s.len(), s.value_bytes()));
        }
        assert!(s.len() <= 50 + 10, "shared-data keys grew to {}", s.len());
        let max_bytes = sizes.iter().map(|x| x.1).max().unwrap();
        assert!(sizes[19].1 <= max_bytes && max_bytes < 25 * 400, "{sizes:?}");
    }

    #[test]
    fn stale_versions_are_refused_unless_forced() {
        let s = MemStore::default();
        apply_full(&s, &set(5, &["aaaaaaaaaaa1"]), opts()).unwrap();
        assert_eq!(
            apply_full(&s, &set(5, &[]), opts()).unwrap_err(),
            ApplyError::Stale { running: 5, pushed: 5 }
        );
        assert_eq!(
            apply_full(&s, &set(4, &[]), opts()).unwrap_err(),
            ApplyError::Stale { running: 5, pushed: 4 }
        );
        assert_eq!(active(&s), ["aaaaaaaaaaa1"]);
        apply_full(&s, &set(4, &[]), ApplyOptions { force: true, ..opts() }).unwrap();
        assert!(active(&s).is_empty());
    }

    #[test]
    fn a_request_mid_push_sees_only_the_old_set() {
        let s = std::rc::Rc::new(MemStore::default());
        apply_full(&*s, &set(1, &["aaaaaaaaaaa1", "aaaaaaaaaaa2"]), opts()).unwrap();
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let (s2, seen2) = (std::rc::Rc::downgrade(&s), seen.clone());
        *s.before_set.borrow_mut() = Some(Box::new(move |key: &str| {
            if key == META {
                return;
            }
            // A "request" between two writes of the push.
            let s = s2.upgrade().unwrap();
            let m = read_meta(&*s).unwrap();
            let a = ["aaaaaaaaaaa1", "aaaaaaaaaaa2", "aaaaaaaaaaa3"].map(|id| lookup(&*s, &m, id).is_some());
            seen2.borrow_mut().push(a);
        }));
        apply_full(&*s, &set(2, &["aaaaaaaaaaa3"]), opts()).unwrap();
        *s.before_set.borrow_mut() = None;
        let seen = seen.borrow();
        let old = [true, true, false];
        let new = [false, false, true];
        let flip = seen.iter().position(|a| *a == new).unwrap_or(seen.len());
        assert!(flip > 2, "{seen:?}");
        assert!(seen[..flip].iter().all(|a| *a == old), "mixed view: {seen:?}");
        assert!(seen[flip..].iter().all(|a| *a == new), "mixed view: {seen:?}");
        assert_eq!(active(&s), ["aaaaaaaaaaa3"]);
    }

    #[test]
    fn an_aborted_push_changes_nothing_and_leaves_no_records() {
        let s = MemStore::default();
        apply_full(&s, &set(1, &["aaaaaaaaaaa1"]), opts()).unwrap();
        let before = s.value_bytes();
        let new = set(2, &["aaaaaaaaaaa2", "aaaaaaaaaaa3"]);
        let mut push = FullPush::begin(&s, Clock::Fixed(1)).unwrap();
        push.add(&new.keys[0]).unwrap();
        assert_eq!(push.add(&new.keys[0]).unwrap_err(), AddError::Duplicate);
        push.add(&new.keys[1]).unwrap();
        push.abort();
        assert_eq!(active(&s), ["aaaaaaaaaaa1"]);
        assert_eq!(s.value_bytes(), before, "aborted slots were cleared");
        // the lock was released and the next push works
        apply_full(&s, &new, opts()).unwrap();
        assert_eq!(active(&s), ["aaaaaaaaaaa2", "aaaaaaaaaaa3"]);
    }

    #[test]
    fn a_stale_commit_is_refused_after_streaming() {
        let s = MemStore::default();
        apply_full(&s, &set(5, &["aaaaaaaaaaa1"]), opts()).unwrap();
        let new = set(3, &["aaaaaaaaaaa2"]);
        let mut push = FullPush::begin(&s, Clock::Fixed(1)).unwrap();
        push.add(&new.keys[0]).unwrap();
        let e = push.commit(3, &new.plans, false).unwrap_err();
        assert_eq!(e, ApplyError::Stale { running: 5, pushed: 3 });
        assert_eq!(active(&s), ["aaaaaaaaaaa1"]);
        assert_eq!(s.get("k/aaaaaaaaaaa2").0.unwrap().len(), 0);
    }

    /// Issue 10.12: a one-shot push that runs longer than the lock's lease renews it as
    /// it goes, so no other writer gets in mid-push; and a push that lost its lease
    /// (a clock jump past the TTL between renewals) does not flip the set.
    #[test]
    fn a_long_one_shot_push_keeps_the_lock_and_a_lost_one_does_not_commit() {
        use crate::core::keyset::writer_lock::{Lock, ONE_SHOT_TTL_MS};
        let s = MemStore::default();
        let t = std::cell::Cell::new(1_000u64);
        let tick = || t.get();
        let new = set(2, &ids(3000).iter().map(String::as_str).collect::<Vec<_>>());
        let mut push = FullPush::begin(&s, Clock::Live(&tick)).unwrap();
        for (i, rec) in new.keys.iter().enumerate() {
            push.add(rec).unwrap();
            if i % 100 == 0 {
                t.set(t.get() + 500); // 15 s in all, three leases
                assert_eq!(Lock::acquire(&s, t.get()).err(), Some(ApplyError::Busy), "at key {i}");
            }
        }
        assert!(t.get() > 1_000 + 2 * ONE_SHOT_TTL_MS);
        push.commit(2, &new.plans, false).unwrap();
        assert_eq!(active(&s).len(), 3000);

        // Lost: the clock jumps past the lease and another writer takes the lock.
        let mut push = FullPush::begin(&s, Clock::Live(&tick)).unwrap();
        push.add(&new.keys[0]).unwrap();
        t.set(t.get() + ONE_SHOT_TTL_MS + 1);
        let other = Lock::acquire(&s, t.get()).unwrap();
        assert_eq!(push.commit(3, &new.plans, false).unwrap_err(), ApplyError::Busy);
        assert_eq!(read_meta(&s).unwrap().version, 2, "nothing flipped");
        drop(other);
    }
}
