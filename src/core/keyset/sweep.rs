//! Sweeping a generation that is no longer (or never became) active: its records are
//! cleared in bounded steps, by index chunk, because shared data cannot be listed.

use crate::core::keyset::apply::ApplyError;
use crate::core::keyset::entry::update_entry;
use crate::core::keyset::full_push::PushState;
use crate::core::keyset::index::INDEX_CHUNK;
use crate::core::keyset::names::{index_chunk_name, index_len_name, CLEANUP};
use crate::core::keyset::writer_lock::Lock;
use crate::core::store::{read_u64, read_value, Store, StoreError};
use serde::{Deserialize, Serialize};

/// Work left after a flip (the previous generation's records) or an abort (the
/// abandoned generation's records): clear slot `slot` of the ids listed in that slot's
/// index chunks `next..chunks` where the slot still holds generation `gen`, then (under
/// the writer lock) empty the index. Clearing is conditional on the generation, so it
/// is safe to run concurrently from several workers and alongside deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Cleanup {
    pub slot: u8,
    pub gen: u64,
    pub chunks: usize,
    pub next: usize,
}

/// Index chunks (4096 ids each) one short callback may clean.
pub const CLEANUP_STEP_CHUNKS: usize = 5;

fn read_cleanup(store: &dyn Store) -> (Option<Cleanup>, u32) {
    let (v, cas) = read_value(store, CLEANUP);
    (v.and_then(|b| bincode::deserialize(&b).ok()), cas)
}

pub(crate) fn queue_cleanup(store: &dyn Store, job: Cleanup) -> Result<(), ApplyError> {
    // At most one job: a previous one must be finished first (the caller holds the
    // lock). Only a bounded step of it is done here, never a whole sweep of a large
    // set (the timer's `cleanup_step` does the rest); until then writers are Busy.
    if !run_cleanup(store, CLEANUP_STEP_CHUNKS, true)? {
        return Err(ApplyError::Busy);
    }
    store.set(CLEANUP, &bincode::serialize(&job).expect("cleanup encodes"), None)?;
    Ok(())
}

pub(crate) fn queue_abort_cleanup(store: &dyn Store, st: &PushState) -> Result<(), ApplyError> {
    let mut chunks = st.index_chunks;
    if !st.index_buf.is_empty() {
        store.set(&index_chunk_name(st.slot, chunks), &st.index_buf, None)?;
        chunks += 1;
    }
    queue_cleanup(
        store,
        Cleanup {
            slot: st.slot,
            gen: st.gen,
            chunks: chunks.max(st.old_index_len.div_ceil(INDEX_CHUNK)),
            next: 0,
        },
    )
}

/// Does up to `budget` index chunks of pending cleanup; with `locked` (the caller holds
/// the writer lock) also the final index reset. Returns whether nothing is left.
pub(crate) fn run_cleanup(store: &dyn Store, budget: usize, locked: bool) -> Result<bool, ApplyError> {
    let mut left = budget;
    loop {
        let (job, cas) = read_cleanup(store);
        let Some(mut job) = job else { return Ok(true) };
        if job.next < job.chunks {
            if left == 0 {
                return Ok(false);
            }
            left -= 1;
            let (slot, gen) = (job.slot as usize & 1, job.gen);
            if let Some(chunk) = read_value(store, &index_chunk_name(job.slot, job.next)).0 {
                for id in chunk.chunks(12).filter_map(|c| std::str::from_utf8(c).ok()) {
                    update_entry(store, id, |e| {
                        if e.slots[slot].as_ref().is_some_and(|s| s.gen == gen) {
                            e.slots[slot] = None;
                        }
                    })?;
                }
            }
            job.next += 1;
            match store.set(CLEANUP, &bincode::serialize(&job).expect("cleanup encodes"), Some(cas)) {
                Ok(()) | Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        if !locked {
            return Ok(false);
        }
        for j in 0..job.chunks {
            store.set(&index_chunk_name(job.slot, j), &[], None)?;
        }
        if read_u64(store, &index_len_name(job.slot)) != 0 {
            store.set(&index_len_name(job.slot), &0u64.to_le_bytes(), None)?;
        }
        store.set(CLEANUP, &[], None)?;
        return Ok(true);
    }
}

/// One short step of pending cleanup (the admin role runs it on a timer): clears up to
/// `budget` index chunks of stale records without the lock, and takes the lock only for
/// the final index reset (skipped while another writer holds it).
pub fn cleanup_step(store: &dyn Store, now_ms: u64, budget: usize) -> Result<bool, ApplyError> {
    if read_cleanup(store).0.is_none() {
        return Ok(true);
    }
    if run_cleanup(store, budget, false)? {
        return Ok(true);
    }
    match read_cleanup(store).0 {
        Some(job) if job.next >= job.chunks => match Lock::acquire(store, now_ms) {
            Ok(_lock) => run_cleanup(store, 0, true),
            Err(_) => Ok(false),
        },
        _ => Ok(false),
    }
}
