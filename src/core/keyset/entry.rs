//! `k/<id>`: the per-key entry with its two generation slots.

use crate::core::auth::key_record::KeyRecord;
use crate::core::cas::{cas_update, Create, Step};
use crate::core::keyset::apply::ApplyError;
use crate::core::keyset::entry_format;
use crate::core::keyset::meta::Meta;
use crate::core::keyset::names::key_entry_name;
use crate::core::store::{read_value, Store};

const CAS_RETRIES: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub gen: u64,
    pub record: KeyRecord,
}

/// The per-key shared-data value (bytes: `entry_format`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyEntry {
    pub slots: [Option<Slot>; 2],
}

impl KeyEntry {
    /// Decodes the entry of key `id` (its name supplies the id; see `entry_format`).
    pub fn decode(bytes: &[u8], id: &str) -> Option<KeyEntry> {
        entry_format::decode(bytes, id)
    }
    pub(crate) fn encode(&self) -> Vec<u8> {
        entry_format::encode(self)
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

    pub(crate) fn active_mut(&mut self, meta: &Meta) -> Option<&mut KeyRecord> {
        match &mut self.slots[meta.slot as usize & 1] {
            Some(s) if s.gen == meta.gen => Some(&mut s.record),
            _ => None,
        }
    }
}

/// The active record for `id` (admin and tests; the filter inlines this to reuse buffers).
pub fn lookup(store: &dyn Store, meta: &Meta, id: &str) -> Option<KeyRecord> {
    let mut buf = [0u8; 32];
    let (v, _) = read_value(store, key_entry_name(id, &mut buf));
    KeyEntry::decode(&v?, id)?.active(meta).cloned()
}

/// Read-modify-write of one key entry with CAS retries (bounded).
pub(crate) fn update_entry(
    store: &dyn Store,
    id: &str,
    mut f: impl FnMut(&mut KeyEntry),
) -> Result<KeyEntry, ApplyError> {
    let mut buf = [0u8; 32];
    let name = key_entry_name(id, &mut buf);
    // Key entries are created only by a key-set writer holding the writer lock (the
    // sweep, which runs without it, only touches entries that exist).
    Ok(cas_update(store, name, CAS_RETRIES, Create::Exclusive, |v| {
        let mut entry = v.and_then(|b| KeyEntry::decode(b, id)).unwrap_or_default();
        f(&mut entry);
        Step::Write(entry.encode(), entry)
    })?)
}
