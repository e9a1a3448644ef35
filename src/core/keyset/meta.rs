//! `km/meta`: what a request reads first, and the generation counter.

use crate::core::cas::{add_u64_capped, Create};
use crate::core::keyset::apply::ApplyError;
use crate::core::keyset::names::{GEN, META};
use crate::core::store::{read_value, Store};
use serde::{Deserialize, Serialize};

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

/// Per-key cost beyond the value, as measured (1M-key push: ~135 B of RSS per 30-byte
/// entry): the host map's node (key string inline, value string, CAS: 72 bytes, rounded
/// up by the allocator), its bucket slot, the value's allocation rounding and the id's
/// 12 bytes in the sweep index.
pub(crate) const ENTRY_OVERHEAD_BYTES: u64 = 104;

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
    pub(crate) fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).expect("meta encodes")
    }
}

/// The running meta, or `None` when no key set was ever loaded into this process.
pub fn read_meta(store: &dyn Store) -> Option<Meta> {
    read_value(store, META).0.and_then(|b| Meta::decode(&b))
}

/// Takes the next generation number (CAS on `km/gen`).
pub(crate) fn next_gen(store: &dyn Store) -> Result<u64, ApplyError> {
    // Only a writer holding the writer lock takes generations.
    let g = add_u64_capped(store, GEN, 1, u64::MAX, 16, Create::Exclusive)?;
    Ok(g.unwrap_or(u64::MAX))
}
