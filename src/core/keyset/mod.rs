//! The key set: its document, and how it lives in and is updated in proxy-wasm shared data.
//!
//! ABI 0.2 can neither delete nor list shared-data keys, and a full snapshot must switch
//! atomically for requests on all workers. The layout:
//!
//! - `km/meta`: the active generation and slot, version, key count (tiny, read per request).
//! - `k/<id>`: one small entry per key id (a short name: see `names::KEY_ENTRY_PREFIX`)
//!   with two slots. A full push writes the new record into the slot the active
//!   generation does not use, tagged with a fresh generation number, then flips `km/meta` with CAS: a request reads `km/meta` and
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
//! - `km/cleanup`: the pending sweep of a previous (or abandoned) generation.
//! - `km/upload`: the state of a staged upload between its requests.
//! - `km/delta`: a delta being applied, kept until finished (see `delta`).
//! - `km/status`: the last applied update, for the status endpoint.
//!
//! Modules: `document` (the JSON formats and validation), `names` (shared-data key
//! names), `meta`, `entry` and `plans` (the values), `writer_lock`, `index` and `sweep`
//! (bookkeeping for the previous generation), `full_push`, `delta`, `stream` (applying a
//! document while parsing it) and `upload` (a full push spread over several requests).

pub mod apply;
pub mod delta;
pub mod document;
pub mod entry;
pub mod entry_format;
pub mod full_push;
pub mod index;
pub mod meta;
pub mod names;
pub mod plans;
pub mod stream;
pub mod sweep;
pub mod upload;
pub mod writer_lock;

#[cfg(test)]
pub(crate) mod test_support;
