//! How the key set lives in proxy-wasm shared data, and every update to it.
//!
//! ABI 0.2 can neither delete nor list shared-data keys, and a full snapshot must switch
//! atomically for requests on all workers. The layout:
//!
//! - `km/meta`: the active generation and slot, version, key count (tiny, read per request).
//! - `km/k/<id>`: one small entry per key id with two slots. A full push writes the new
//!   record into the slot the active generation does not use, tagged with a fresh
//!   generation number, then flips `km/meta` with CAS: a request reads `km/meta` and
//!   then takes the slot whose generation is active, so it sees the old set or the new
//!   one, never a mix. A key absent from the new snapshot has no slot of the new
//!   generation and stops working at the flip.
//! - `km/plans/<slot>`: the plans of the generation in that slot.
//! - `km/idx/<slot>/<n>`: the ids written to a slot, in chunks, because shared data
//!   cannot be listed: after a flip the old slot's index is swept, dropping the old
//!   records (entries of removed keys become empty values). Memory is therefore bounded
//!   by the live set plus one empty entry per id ever removed (the ABI cannot delete the
//!   key string itself).
//! - `km/lock`: serialises writers (admin pushes on any worker, the pull service), since
//!   shared-data CAS is not checked for keys that do not exist yet.
//! - `km/gen`: generation counter, so a failed or interrupted push leaves only inert slots.

use crate::core::auth::key_record::KeyRecord;
use crate::core::keyset::document::CompiledOp;
#[cfg(test)]
use crate::core::keyset::document::KeySet;
use crate::core::limits::plan::Plan;
use crate::core::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const META: &str = "km/meta";
pub const GEN: &str = "km/gen";
pub const LOCK: &str = "km/lock";
pub const STATUS: &str = "km/status";
const INDEX_CHUNK: usize = 4096;
const LOCK_TTL_MS: u64 = 60_000;
const CAS_RETRIES: usize = 16;

/// What a request reads first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub gen: u64,
    pub slot: u8,
    pub version: u64,
    pub keys: u64,
    /// Bumped whenever plans change, so workers know when to re-read them.
    pub plans_rev: u64,
    /// Unix seconds of the last successful update.
    pub updated_at: i64,
    /// Mean encoded size of a key entry at the last full push, for the memory estimate.
    pub avg_entry_bytes: u64,
}

/// Per-entry cost of the host's map beyond the value: key string, node, CAS.
const ENTRY_OVERHEAD_BYTES: u64 = 96;

impl Meta {
    /// Rough shared-data footprint of the key entries (values plus map overhead).
    pub fn memory_estimate_bytes(&self) -> u64 {
        self.keys * (self.avg_entry_bytes + ENTRY_OVERHEAD_BYTES)
    }
}

impl Meta {
    pub fn decode(bytes: &[u8]) -> Option<Meta> {
        bincode::deserialize(bytes).ok()
    }
    fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).expect("meta encodes")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub gen: u64,
    pub record: KeyRecord,
}

/// The per-key shared-data value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    pub slots: [Option<Slot>; 2],
}

impl KeyEntry {
    pub fn decode(bytes: &[u8]) -> Option<KeyEntry> {
        bincode::Options::deserialize(entry_codec(), bytes).ok()
    }
    fn encode(&self) -> Vec<u8> {
        if self.slots.iter().all(Option::is_none) {
            Vec::new()
        } else {
            bincode::Options::serialize(entry_codec(), self).expect("entry encodes")
        }
    }
    /// The record visible under `meta`, if any.
    pub fn active(&self, meta: &Meta) -> Option<&KeyRecord> {
        match &self.slots[meta.slot as usize & 1] {
            Some(s) if s.gen == meta.gen => Some(&s.record),
            _ => None,
        }
    }
    /// Takes the record visible under `meta` out of the entry (no clone).
    pub fn into_active(self, meta: &Meta) -> Option<KeyRecord> {
        let [a, b] = self.slots;
        match if meta.slot & 1 == 0 { a } else { b } {
            Some(s) if s.gen == meta.gen => Some(s.record),
            _ => None,
        }
    }

    fn active_mut(&mut self, meta: &Meta) -> Option<&mut KeyRecord> {
        match &mut self.slots[meta.slot as usize & 1] {
            Some(s) if s.gen == meta.gen => Some(&mut s.record),
            _ => None,
        }
    }
}

/// Prefix of per-key entries. Deliberately short: `k/` + a 12-byte id fits the host's
/// small-string buffer, which saves a heap allocation per key in a million-key set.
pub const KEY_ENTRY_PREFIX: &str = "k/";

/// Writes `k/<id>` into `buf` without allocating (ids are 12 ASCII bytes).
pub fn key_entry_name<'a>(id: &str, buf: &'a mut [u8; 32]) -> &'a str {
    let p = KEY_ENTRY_PREFIX.len();
    let n = p + id.len().min(32 - p);
    buf[..p].copy_from_slice(KEY_ENTRY_PREFIX.as_bytes());
    buf[p..n].copy_from_slice(&id.as_bytes()[..n - p]);
    std::str::from_utf8(&buf[..n]).unwrap_or(KEY_ENTRY_PREFIX)
}

/// Key entries use bincode's varint encoding: a third smaller than fixed-width lengths,
/// and entries are most of the memory a large key set takes.
fn entry_codec() -> impl bincode::Options {
    bincode::DefaultOptions::new()
}

pub fn plans_name(slot: u8) -> String {
    format!("km/plans/{}", slot & 1)
}
fn index_len_name(slot: u8) -> String {
    format!("km/idx/{}/n", slot & 1)
}
fn index_chunk_name(slot: u8, i: usize) -> String {
    format!("km/idx/{}/{i}", slot & 1)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyError {
    /// The pushed version is not newer than the running one.
    Stale {
        running: u64,
        pushed: u64,
    },
    /// A delta needs a running set to apply to.
    NoKeySet,
    /// Another writer holds the lock, or changed the set under us: retry.
    Busy,
    /// A delta op refers to a key that is not in the running set.
    UnknownKey {
        at: String,
        id: String,
    },
    /// A delta upserts a key whose plan is neither in the running set nor set by the
    /// delta (the set was replaced after the delta was validated): never applied, since
    /// a key without its plan would have no limits.
    UnknownPlan {
        at: String,
        id: String,
        plan: String,
    },
    Host,
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Stale { running, pushed } => {
                write!(
                    f,
                    "version {pushed} is not newer than the running version {running} (force to override)"
                )
            }
            ApplyError::NoKeySet => f.write_str("no key set is loaded: push a full snapshot first"),
            ApplyError::Busy => f.write_str("another key-set update is in progress; retry"),
            ApplyError::UnknownKey { at, id } => {
                write!(f, "{at}: no key with id \"{id}\" in the running set")
            }
            ApplyError::UnknownPlan { at, id, plan } => write!(
                f,
                "{at} (id \"{id}\").plan: unknown plan '{plan}' (not in the running set nor set by this delta)"
            ),
            ApplyError::Host => f.write_str("shared-data write failed"),
        }
    }
}

impl From<StoreError> for ApplyError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::CasMismatch => ApplyError::Busy,
            StoreError::Host => ApplyError::Host,
        }
    }
}

/// Result of a successful update.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    pub version: u64,
    pub keys: u64,
    pub written: u64,
    pub removed: u64,
}

fn value(store: &dyn Store, key: &str) -> (Option<Vec<u8>>, u32) {
    let (v, cas) = store.get(key);
    (v.filter(|v| !v.is_empty()), cas)
}

/// The running meta, or `None` when no key set was ever loaded into this process.
pub fn read_meta(store: &dyn Store) -> Option<Meta> {
    value(store, META).0.and_then(|b| Meta::decode(&b))
}

pub fn read_plans(store: &dyn Store, meta: &Meta) -> BTreeMap<String, Plan> {
    value(store, &plans_name(meta.slot))
        .0
        .and_then(|b| bincode::deserialize::<(u64, BTreeMap<String, Plan>)>(&b).ok())
        .filter(|(gen, _)| *gen == meta.gen)
        .map(|(_, p)| p)
        .unwrap_or_default()
}

/// The active record for `id` (admin and tests; the filter inlines this to reuse buffers).
pub fn lookup(store: &dyn Store, meta: &Meta, id: &str) -> Option<KeyRecord> {
    let mut buf = [0u8; 32];
    let (v, _) = value(store, key_entry_name(id, &mut buf));
    KeyEntry::decode(&v?)?.active(meta).cloned()
}

/// Holds `km/lock` for the duration of one update, or (owned by an upload id) across
/// the requests of a staged upload, renewed by each of them.
///
/// The value is the holder's deadline (u64 LE, ms) followed by its owner id (empty for a
/// one-shot writer). A holder past its deadline has lost the lock.
pub struct Lock<'a> {
    store: &'a dyn Store,
    release: bool,
}

fn read_lock(store: &dyn Store) -> (u64, String, u32) {
    let (v, cas) = store.get(LOCK);
    let v = v.unwrap_or_default();
    if v.len() < 8 {
        return (0, String::new(), cas);
    }
    let held_until = u64::from_le_bytes(v[..8].try_into().unwrap_or_default());
    (held_until, String::from_utf8_lossy(&v[8..]).into_owned(), cas)
}

fn lock_value(held_until: u64, owner: &str) -> Vec<u8> {
    let mut v = held_until.to_le_bytes().to_vec();
    v.extend_from_slice(owner.as_bytes());
    v
}

impl<'a> Lock<'a> {
    pub fn acquire(store: &'a dyn Store, now_ms: u64) -> Result<Lock<'a>, ApplyError> {
        Self::acquire_owned(store, now_ms, "")
    }

    fn acquire_owned(store: &'a dyn Store, now_ms: u64, owner: &str) -> Result<Lock<'a>, ApplyError> {
        let (v, _) = store.get(LOCK);
        if v.is_none() {
            // CAS is not checked on a missing key: create it first, then compete by CAS.
            store.set(LOCK, &0u64.to_le_bytes(), None)?;
        }
        let (held_until, _, cas) = read_lock(store);
        if held_until > now_ms {
            return Err(ApplyError::Busy);
        }
        store
            .set(LOCK, &lock_value(now_ms + LOCK_TTL_MS, owner), Some(cas))
            .map_err(|_| ApplyError::Busy)?;
        let lock = Lock { store, release: true };
        // A live upload always holds the lock: one still recorded now let it expire.
        reap_abandoned_upload(store)?;
        Ok(lock)
    }

    /// Extends the lock held by `owner` (a staged upload) from a later request.
    fn renew(store: &'a dyn Store, now_ms: u64, owner: &str) -> Result<Lock<'a>, ApplyError> {
        let (held_until, holder, cas) = read_lock(store);
        if owner.is_empty() || holder != owner || held_until <= now_ms {
            return Err(ApplyError::Busy);
        }
        store
            .set(LOCK, &lock_value(now_ms + LOCK_TTL_MS, owner), Some(cas))
            .map_err(|_| ApplyError::Busy)?;
        Ok(Lock { store, release: true })
    }

    /// Leaves the lock held (until its deadline) when this value goes away.
    fn keep(mut self) {
        self.release = false;
    }
}

impl Drop for Lock<'_> {
    fn drop(&mut self) {
        if self.release {
            let _ = self.store.set(LOCK, &0u64.to_le_bytes(), None);
        }
    }
}

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

pub const UPLOAD: &str = "km/upload";

pub fn read_upload(store: &dyn Store) -> Option<UploadState> {
    value(store, UPLOAD).0.and_then(|b| bincode::deserialize(&b).ok())
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
fn reap_abandoned_upload(store: &dyn Store) -> Result<(), ApplyError> {
    let Some(st) = read_upload(store) else {
        return Ok(());
    };
    log::warn!("keymeter: upload {} expired; cleaning up its records", st.push.owner);
    write_upload(store, None)?;
    queue_abort_cleanup(store, &st.push)
}

/// Work left after a flip (the previous generation's records) or an abort (the
/// abandoned generation's records): clear slot `slot` of the ids listed in that slot's
/// index chunks `next..chunks` where the slot still holds generation `gen`, then (under
/// the writer lock) empty the index. Clearing is conditional on the generation, so it
/// is safe to run concurrently from several workers and alongside deltas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Cleanup {
    slot: u8,
    gen: u64,
    chunks: usize,
    next: usize,
}

pub const CLEANUP: &str = "km/cleanup";
/// Index chunks (4096 ids each) one short callback may clean.
pub const CLEANUP_STEP_CHUNKS: usize = 5;

fn read_cleanup(store: &dyn Store) -> (Option<Cleanup>, u32) {
    let (v, cas) = value(store, CLEANUP);
    (v.and_then(|b| bincode::deserialize(&b).ok()), cas)
}

fn queue_cleanup(store: &dyn Store, job: Cleanup) -> Result<(), ApplyError> {
    // At most one job: finish a previous one first (the caller holds the lock).
    run_cleanup(store, usize::MAX, true)?;
    store.set(CLEANUP, &bincode::serialize(&job).expect("cleanup encodes"), None)?;
    Ok(())
}

fn queue_abort_cleanup(store: &dyn Store, st: &PushState) -> Result<(), ApplyError> {
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
fn run_cleanup(store: &dyn Store, budget: usize, locked: bool) -> Result<bool, ApplyError> {
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
            if let Some(chunk) = value(store, &index_chunk_name(job.slot, job.next)).0 {
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

fn next_gen(store: &dyn Store) -> Result<u64, ApplyError> {
    let (v, cas) = store.get(GEN);
    let g = v.and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes) + 1;
    store.set(GEN, &g.to_le_bytes(), Some(cas))?;
    Ok(g)
}

/// Read-modify-write of one key entry with CAS retries (bounded).
fn update_entry(store: &dyn Store, id: &str, mut f: impl FnMut(&mut KeyEntry)) -> Result<KeyEntry, ApplyError> {
    let mut buf = [0u8; 32];
    let name = key_entry_name(id, &mut buf);
    for _ in 0..CAS_RETRIES {
        let (v, cas) = value(store, name);
        let mut entry = v.and_then(|b| KeyEntry::decode(&b)).unwrap_or_default();
        f(&mut entry);
        match store.set(name, &entry.encode(), Some(cas)) {
            Ok(()) => return Ok(entry),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApplyError::Busy)
}

fn read_index(store: &dyn Store, slot: u8) -> Vec<String> {
    let n = value(store, &index_len_name(slot))
        .0
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes) as usize;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n.div_ceil(INDEX_CHUNK) {
        if let Some(chunk) = value(store, &index_chunk_name(slot, i)).0 {
            ids.extend(
                chunk
                    .chunks(12)
                    .filter_map(|c| std::str::from_utf8(c).ok())
                    .map(str::to_string),
            );
        }
    }
    ids.truncate(n);
    ids
}

/// Replaces a slot's index with `ids`, emptying chunks the old index had beyond it.
fn write_index<'a>(store: &dyn Store, slot: u8, ids: impl ExactSizeIterator<Item = &'a str>) -> Result<(), ApplyError> {
    let old_n = value(store, &index_len_name(slot))
        .0
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes) as usize;
    let n = ids.len();
    let mut chunk = Vec::with_capacity(INDEX_CHUNK * 12);
    let mut i = 0;
    for id in ids {
        chunk.extend_from_slice(id.as_bytes());
        if chunk.len() == INDEX_CHUNK * 12 {
            store.set(&index_chunk_name(slot, i), &chunk, None)?;
            chunk.clear();
            i += 1;
        }
    }
    if !chunk.is_empty() {
        store.set(&index_chunk_name(slot, i), &chunk, None)?;
        i += 1;
    }
    for j in i..old_n.div_ceil(INDEX_CHUNK) {
        store.set(&index_chunk_name(slot, j), &[], None)?;
    }
    store.set(&index_len_name(slot), &(n as u64).to_le_bytes(), None)?;
    Ok(())
}

fn append_index(store: &dyn Store, slot: u8, new_ids: &[String]) -> Result<(), ApplyError> {
    if new_ids.is_empty() {
        return Ok(());
    }
    let mut ids = read_index(store, slot);
    ids.extend(new_ids.iter().cloned());
    write_index(store, slot, ids.iter().map(String::as_str))
}

fn write_plans(store: &dyn Store, slot: u8, gen: u64, plans: &BTreeMap<String, Plan>) -> Result<(), ApplyError> {
    let bytes = bincode::serialize(&(gen, plans)).expect("plans encode");
    store.set(&plans_name(slot), &bytes, None)?;
    Ok(())
}

/// Options every update takes.
#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    pub force: bool,
    pub now_ms: u64,
}

pub(crate) fn check_version(running: Option<&Meta>, pushed: u64, force: bool) -> Result<(), ApplyError> {
    match running {
        Some(m) if !force && pushed <= m.version => Err(ApplyError::Stale {
            running: m.version,
            pushed,
        }),
        _ => Ok(()),
    }
}

/// Replaces the whole key set atomically from an in-memory set (see the module doc).
/// Production paths stream documents through `keyset::stream` instead; this is the
/// compact form for tests.
#[cfg(test)]
pub(crate) fn apply_full(store: &dyn Store, set: &KeySet, opts: ApplyOptions) -> Result<ApplyReport, ApplyError> {
    let mut push = FullPush::begin(store, opts.now_ms)?;
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
    st: PushState,
}

/// Everything a `FullPush` needs to continue in another request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushState {
    /// The upload id holding the lock (empty for a one-shot push).
    pub owner: String,
    running: Option<Meta>,
    meta_cas: u32,
    gen: u64,
    slot: u8,
    keys: u64,
    /// Keys added that are active in the running set (for the removed count).
    kept: u64,
    entry_bytes: u64,
    /// Ids not yet written to an index chunk, and how many chunks were written.
    index_buf: Vec<u8>,
    index_chunks: usize,
    old_index_len: usize,
    now_ms: u64,
}

impl PushState {
    pub fn keys(&self) -> u64 {
        self.keys
    }
}

impl<'a> FullPush<'a> {
    /// Takes the writer lock and a fresh generation.
    pub fn begin(store: &'a dyn Store, now_ms: u64) -> Result<FullPush<'a>, ApplyError> {
        Self::begin_owned(store, now_ms, "")
    }

    /// `begin` for a staged upload: the lock is held by `owner` (the upload id).
    pub fn begin_owned(store: &'a dyn Store, now_ms: u64, owner: &str) -> Result<FullPush<'a>, ApplyError> {
        let lock = Lock::acquire_owned(store, now_ms, owner)?;
        // The slot about to be written must be clean (and its index free) first.
        run_cleanup(store, usize::MAX, true)?;
        let (meta_bytes, meta_cas) = value(store, META);
        let running = meta_bytes.as_deref().and_then(Meta::decode);
        let gen = next_gen(store)?;
        let slot = running.map_or(0, |m| 1 - (m.slot & 1));
        let old_index_len = read_u64(store, &index_len_name(slot)) as usize;
        Ok(FullPush {
            store,
            lock,
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
        Ok(FullPush { store, lock, st })
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
        self.st.entry_bytes += bincode::Options::serialized_size(entry_codec(), &e.slots[slot]).unwrap_or(0);
        self.st.keys += 1;
        self.st.kept += u64::from(kept);
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
        self.commit_with(version, plans, force, usize::MAX)
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
        let store = self.store;
        let slot = self.st.slot;
        write_plans(store, slot, self.st.gen, plans)?;
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
            plans_rev: st.running.map_or(0, |m| m.plans_rev) + 1,
            updated_at: (st.now_ms / 1000) as i64,
            avg_entry_bytes: st.entry_bytes / st.keys.max(1),
        };
        store.set(META, &meta.encode(), Some(st.meta_cas))?;
        let removed = st.running.map_or(0, |m| m.keys.saturating_sub(st.kept));
        if let Some(old) = st.running.filter(|old| old.slot & 1 != slot & 1) {
            let old_len = read_u64(store, &index_len_name(old.slot)) as usize;
            queue_cleanup(
                store,
                Cleanup {
                    slot: old.slot,
                    gen: old.gen,
                    chunks: old_len.div_ceil(INDEX_CHUNK),
                    next: 0,
                },
            )?;
            run_cleanup(store, budget, true)?;
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
        self.abort_with(usize::MAX)
    }

    /// `abort` clearing at most `budget` index chunks now, the rest later (see
    /// `commit_with`); the written slots are of a generation that never becomes active.
    pub fn abort_with(self, budget: usize) {
        if queue_abort_cleanup(self.store, &self.st).is_ok() {
            let _ = run_cleanup(self.store, budget, true);
        }
    }
}

fn read_u64(store: &dyn Store, key: &str) -> u64 {
    value(store, key)
        .0
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Applies a batch of changes to the running set, op by op (each op is atomic for
/// requests; a revoke is visible to every worker as soon as this returns).
pub fn apply_delta(
    store: &dyn Store,
    version: u64,
    ops: &[CompiledOp],
    opts: ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    let _lock = Lock::acquire(store, opts.now_ms)?;
    let (meta_bytes, meta_cas) = value(store, META);
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
    use crate::core::keyset::document::{parse_json, DeltaDoc, KeySetDoc};
    use crate::core::store::MemStore;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn set(version: u64, ids: &[&str]) -> KeySet {
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
    fn opts() -> ApplyOptions {
        ApplyOptions {
            force: false,
            now_ms: 1_000_000,
        }
    }
    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("k{i:011}")).collect()
    }
    fn active(s: &MemStore) -> Vec<String> {
        let m = read_meta(s).unwrap();
        let mut v: Vec<String> = s
            .keys_with_prefix(KEY_ENTRY_PREFIX)
            .iter()
            .filter_map(|k| lookup(s, &m, &k[KEY_ENTRY_PREFIX.len()..]).map(|r| r.id))
            .collect();
        v.sort();
        v
    }

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
        let e = KeyEntry::decode(&s.get("k/aaaaaaaaaaa2").0.unwrap()).unwrap();
        assert_eq!(e.slots.iter().filter(|s| s.is_some()).count(), 1);
        let m = read_meta(&s).unwrap();
        assert_eq!(read_plans(&s, &m).len(), 1);
        assert!(
            m.avg_entry_bytes > 50 && m.avg_entry_bytes < 300,
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
    fn lock_blocks_a_concurrent_writer_and_expires() {
        let s = MemStore::default();
        let l = Lock::acquire(&s, 1000).unwrap();
        assert_eq!(
            apply_full(
                &s,
                &set(1, &[]),
                ApplyOptions {
                    force: false,
                    now_ms: 2000
                }
            )
            .unwrap_err(),
            ApplyError::Busy
        );
        std::mem::forget(l); // a crashed writer never releases
        assert!(apply_full(
            &s,
            &set(1, &[]),
            ApplyOptions {
                force: false,
                now_ms: 1000 + LOCK_TTL_MS + 1
            }
        )
        .is_ok());
        drop(Lock::acquire(&s, 0).unwrap());
    }

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

    #[test]
    fn an_aborted_push_changes_nothing_and_leaves_no_records() {
        let s = MemStore::default();
        apply_full(&s, &set(1, &["aaaaaaaaaaa1"]), opts()).unwrap();
        let before = s.value_bytes();
        let new = set(2, &["aaaaaaaaaaa2", "aaaaaaaaaaa3"]);
        let mut push = FullPush::begin(&s, 1).unwrap();
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
        let mut push = FullPush::begin(&s, 1).unwrap();
        push.add(&new.keys[0]).unwrap();
        let e = push.commit(3, &new.plans, false).unwrap_err();
        assert_eq!(e, ApplyError::Stale { running: 5, pushed: 3 });
        assert_eq!(active(&s), ["aaaaaaaaaaa1"]);
        assert_eq!(s.get("k/aaaaaaaaaaa2").0.unwrap().len(), 0);
    }

    #[test]
    fn index_spans_chunks() {
        let s = MemStore::default();
        let many = ids(INDEX_CHUNK * 2 + 5);
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        apply_full(&s, &set(1, &refs), opts()).unwrap();
        assert_eq!(read_index(&s, 0).len(), many.len());
        let r = apply_full(&s, &set(2, &refs[..10]), opts()).unwrap();
        assert_eq!(r.removed as usize, many.len() - 10);
        assert_eq!(read_index(&s, 0).len(), 0);
        assert_eq!(s.get(&index_chunk_name(0, 2)).0.unwrap().len(), 0);
    }
}
