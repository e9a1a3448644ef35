//! The bytes of a `k/<id>` entry: a compact layout, because entries are most of the
//! memory a large key set takes (one host map node + one heap string each).
//!
//! Layout (format 2):
//!
//! ```text
//! header  u8       0b0000_01ba: a = slot 0 present, b = slot 1 present
//! slot    varint   generation (LEB128)
//!         u8       flags: enabled, then which optional fields follow (see `F_*`)
//!         [16]     the first 128 bits of sha256(key)
//!         str      consumer, then plan (LEB128 length + bytes)
//!         ...      the optional fields whose flag is set, in flag order (bincode)
//! ```
//!
//! What it leaves out, and why that is safe:
//! - the key id: it is the entry's name, so the reader supplies it;
//! - the second half of the hash: 128 bits still leave 2^128 work to find a secret
//!   matching a stored hash, and ids are unique, so truncation cannot make two keys
//!   collide with each other;
//! - empty optional fields: one flag bit instead of a byte each.
//!
//! A typical key (consumer and plan names of a few characters) encodes in 30 bytes,
//! which the host stores in a 32-byte allocation; format 1 (plain bincode of the entry
//! with id and full hash) took 67 bytes and an 80-byte allocation.
//!
//! Format 1 entries start with 0 or 1 (bincode's tag of slot 0), so the header tells the
//! formats apart: an upgraded filter still reads entries an older one wrote.

use crate::core::auth::key_record::{KeyRecord, StoredHash};
use crate::core::auth::{cidr::Cidr, scope::Scope};
use crate::core::keyset::entry::{KeyEntry, Slot};
use crate::core::limits::plan::Limits;
use serde::{Deserialize, Serialize};

const HEADER: u8 = 0b100;
const HEADER_MASK: u8 = !0b11;

const F_ENABLED: u8 = 1;
const F_NOT_BEFORE: u8 = 1 << 1;
const F_EXPIRES_AT: u8 = 1 << 2;
const F_SCOPES: u8 = 1 << 3;
const F_CIDRS: u8 = 1 << 4;
const F_METADATA: u8 = 1 << 5;
const F_LINEAGE: u8 = 1 << 6;
const F_LIMITS: u8 = 1 << 7;

/// The optional fields' codec (bincode with varints, as format 1 used for everything).
fn codec() -> impl bincode::Options {
    bincode::DefaultOptions::new()
}

/// Encodes an entry; an entry with no slot is the empty value (a removed key).
pub fn encode(entry: &KeyEntry) -> Vec<u8> {
    if entry.slots.iter().all(Option::is_none) {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(32);
    let present = entry
        .slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_some())
        .fold(0u8, |a, (i, _)| a | (1 << i));
    out.push(HEADER | present);
    for s in entry.slots.iter().flatten() {
        put_varint(&mut out, s.gen);
        put_record(&mut out, &s.record);
    }
    out
}

/// Decodes an entry of either format; `id` is the entry's key id. `None` for bytes no
/// writer produced (the caller treats the key as unknown, never panics).
pub fn decode(bytes: &[u8], id: &str) -> Option<KeyEntry> {
    let (&header, mut rest) = bytes.split_first()?;
    if header & HEADER_MASK != HEADER {
        return decode_format1(bytes, id);
    }
    let mut entry = KeyEntry::default();
    for (i, slot) in entry.slots.iter_mut().enumerate() {
        if header & (1 << i) != 0 {
            let gen = take_varint(&mut rest)?;
            let record = take_record(&mut rest, id)?;
            *slot = Some(Slot { gen, record });
        }
    }
    rest.is_empty().then_some(entry)
}

/// Bytes one slot adds to an entry (push statistics).
pub fn slot_len(slot: &Slot) -> usize {
    let mut out = Vec::with_capacity(32);
    put_varint(&mut out, slot.gen);
    put_record(&mut out, &slot.record);
    out.len()
}

fn put_record(out: &mut Vec<u8>, r: &KeyRecord) {
    let mut flags = 0u8;
    let mut set = |on: bool, f: u8| {
        if on {
            flags |= f
        }
    };
    set(r.enabled, F_ENABLED);
    set(r.not_before.is_some(), F_NOT_BEFORE);
    set(r.expires_at.is_some(), F_EXPIRES_AT);
    set(!r.scopes.is_empty(), F_SCOPES);
    set(!r.cidrs.is_empty(), F_CIDRS);
    set(!r.metadata.is_empty(), F_METADATA);
    set(r.lineage.is_some(), F_LINEAGE);
    set(r.limits.is_some(), F_LIMITS);
    out.push(flags);
    out.extend_from_slice(&r.hash);
    put_str(out, &r.consumer);
    put_str(out, &r.plan);
    let opt = |out: &mut Vec<u8>, v: &dyn erased::Encode| v.encode_into(out);
    if let Some(t) = r.not_before {
        opt(out, &t);
    }
    if let Some(t) = r.expires_at {
        opt(out, &t);
    }
    if !r.scopes.is_empty() {
        opt(out, &r.scopes);
    }
    if !r.cidrs.is_empty() {
        opt(out, &r.cidrs);
    }
    if !r.metadata.is_empty() {
        opt(out, &r.metadata);
    }
    if let Some(l) = &r.lineage {
        opt(out, l);
    }
    if let Some(l) = &r.limits {
        opt(out, l);
    }
}

fn take_record(rest: &mut &[u8], id: &str) -> Option<KeyRecord> {
    let (&flags, r) = rest.split_first()?;
    *rest = r;
    let hash: StoredHash = take(rest, 16)?.try_into().ok()?;
    let consumer = take_str(rest)?;
    let plan = take_str(rest)?;
    let has = |f: u8| flags & f != 0;
    Some(KeyRecord {
        id: id.to_string(),
        hash,
        consumer,
        plan,
        enabled: has(F_ENABLED),
        not_before: if has(F_NOT_BEFORE) {
            Some(take_opt::<i64>(rest)?)
        } else {
            None
        },
        expires_at: if has(F_EXPIRES_AT) {
            Some(take_opt::<i64>(rest)?)
        } else {
            None
        },
        scopes: if has(F_SCOPES) {
            take_opt::<Vec<Scope>>(rest)?
        } else {
            Vec::new()
        },
        cidrs: if has(F_CIDRS) {
            take_opt::<Vec<Cidr>>(rest)?
        } else {
            Vec::new()
        },
        metadata: if has(F_METADATA) {
            take_opt::<Vec<(String, String)>>(rest)?
        } else {
            Vec::new()
        },
        lineage: if has(F_LINEAGE) {
            Some(take_opt::<String>(rest)?)
        } else {
            None
        },
        limits: if has(F_LIMITS) {
            Some(take_opt::<Limits>(rest)?)
        } else {
            None
        },
    })
}

/// Object-safe "bincode-encode yourself into this buffer", so `put_record` can treat
/// the optional fields alike.
mod erased {
    pub trait Encode {
        fn encode_into(&self, out: &mut Vec<u8>);
    }
    impl<T: serde::Serialize> Encode for T {
        fn encode_into(&self, out: &mut Vec<u8>) {
            bincode::Options::serialize_into(super::codec(), out, self).expect("in-memory encode");
        }
    }
}

fn take_opt<T: serde::de::DeserializeOwned>(rest: &mut &[u8]) -> Option<T> {
    use bincode::Options;
    // Bounded by the remaining bytes, so a corrupt length cannot ask for a huge buffer.
    codec().with_limit(rest.len() as u64).deserialize_from(rest).ok()
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(rest: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, r) = rest.split_first()?;
        *rest = r;
        v |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rest.len() < n {
        return None;
    }
    let (a, b) = rest.split_at(n);
    *rest = b;
    Some(a)
}

fn take_str(rest: &mut &[u8]) -> Option<String> {
    let n = usize::try_from(take_varint(rest)?).ok()?;
    String::from_utf8(take(rest, n)?.to_vec()).ok()
}

/// Format 1: bincode (varint) of the entry, records with their id and full hash.
#[derive(Serialize, Deserialize)]
struct Format1Entry {
    slots: [Option<Format1Slot>; 2],
}

#[derive(Serialize, Deserialize)]
struct Format1Slot {
    gen: u64,
    record: Format1Record,
}

#[derive(Serialize, Deserialize)]
struct Format1Record {
    id: String,
    hash: [u8; 32],
    consumer: String,
    plan: String,
    enabled: bool,
    not_before: Option<i64>,
    expires_at: Option<i64>,
    scopes: Vec<Scope>,
    cidrs: Vec<Cidr>,
    metadata: Vec<(String, String)>,
    lineage: Option<String>,
    limits: Option<Limits>,
}

/// A format 1 record must carry the id its entry is named by; any other is corrupt.
fn decode_format1(bytes: &[u8], id: &str) -> Option<KeyEntry> {
    use bincode::Options;
    let old: Format1Entry = codec().with_limit(bytes.len() as u64).deserialize(bytes).ok()?;
    if old.slots.iter().flatten().any(|s| s.record.id != id) {
        return None;
    }
    let mut entry = KeyEntry::default();
    for (new, old) in entry.slots.iter_mut().zip(old.slots) {
        *new = old.map(|s| {
            let r = s.record;
            let mut hash = StoredHash::default();
            hash.copy_from_slice(&r.hash[..16]);
            Slot {
                gen: s.gen,
                record: KeyRecord {
                    id: r.id,
                    hash,
                    consumer: r.consumer,
                    plan: r.plan,
                    enabled: r.enabled,
                    not_before: r.not_before,
                    expires_at: r.expires_at,
                    scopes: r.scopes,
                    cidrs: r.cidrs,
                    metadata: r.metadata,
                    lineage: r.lineage,
                    limits: r.limits,
                },
            }
        });
    }
    Some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::auth::key_record::tests::record;

    fn bench_like(gen: u64) -> KeyEntry {
        let r = KeyRecord {
            consumer: "c999".into(),
            plan: "bench".into(),
            not_before: None,
            expires_at: None,
            scopes: vec![],
            cidrs: vec![],
            metadata: vec![],
            ..record()
        };
        KeyEntry {
            slots: [Some(Slot { gen, record: r }), None],
        }
    }

    #[test]
    fn a_typical_key_fits_the_hosts_32_byte_allocation() {
        // libc++ keeps strings up to 22 bytes inline and allocates 32 bytes for 23-31.
        let e = bench_like(1);
        let b = encode(&e);
        assert!(b.len() <= 31, "{} bytes", b.len());
        assert_eq!(decode(&b, "AbCdEf012345"), Some(e));
        // Generations up to 127 take one byte, so this holds for a set's first 127 full pushes.
        assert!(encode(&bench_like(127)).len() <= 31);
    }

    #[test]
    fn every_field_round_trips_in_either_slot() {
        let full = KeyRecord {
            lineage: Some("ZzZzZz012345".into()),
            limits: Some(crate::core::limits::plan::Limits::default()),
            enabled: false,
            ..record()
        };
        for slots in [
            [
                Some(Slot {
                    gen: 7,
                    record: full.clone(),
                }),
                None,
            ],
            [
                None,
                Some(Slot {
                    gen: u64::MAX,
                    record: full.clone(),
                }),
            ],
            [
                Some(Slot {
                    gen: 1,
                    record: record(),
                }),
                Some(Slot {
                    gen: 300,
                    record: full.clone(),
                }),
            ],
        ] {
            let e = KeyEntry { slots };
            assert_eq!(decode(&encode(&e), "AbCdEf012345"), Some(e.clone()));
        }
        assert_eq!(encode(&KeyEntry::default()), Vec::<u8>::new());
        assert_eq!(decode(&[], "AbCdEf012345"), None);
    }

    #[test]
    fn format1_entries_still_decode() {
        let r = record();
        let mut full_hash = [0u8; 32];
        full_hash[..16].copy_from_slice(&r.hash);
        full_hash[16..].copy_from_slice(&[0xee; 16]);
        let old = Format1Entry {
            slots: [
                None,
                Some(Format1Slot {
                    gen: 3,
                    record: Format1Record {
                        id: r.id.clone(),
                        hash: full_hash,
                        consumer: r.consumer.clone(),
                        plan: r.plan.clone(),
                        enabled: r.enabled,
                        not_before: r.not_before,
                        expires_at: r.expires_at,
                        scopes: r.scopes.clone(),
                        cidrs: r.cidrs.clone(),
                        metadata: r.metadata.clone(),
                        lineage: None,
                        limits: None,
                    },
                }),
            ],
        };
        let bytes = bincode::Options::serialize(codec(), &old).unwrap();
        assert!(bytes[0] <= 1, "format 1 starts with slot 0's tag");
        assert_eq!(
            decode(&bytes, "XXXXXX012345"),
            None,
            "a record under another key's name"
        );
        let e = decode(&bytes, "AbCdEf012345").unwrap();
        assert_eq!(e.slots[0], None);
        assert_eq!(e.slots[1], Some(Slot { gen: 3, record: r }));
    }

    #[test]
    fn garbage_never_panics_and_truncation_is_refused() {
        let b = encode(&KeyEntry {
            slots: [
                Some(Slot {
                    gen: 9,
                    record: record(),
                }),
                None,
            ],
        });
        for n in 0..b.len() {
            assert_eq!(decode(&b[..n], "AbCdEf012345"), None, "truncated at {n}");
        }
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(decode(&longer, "AbCdEf012345"), None, "trailing bytes");
        // Deterministic pseudo-random bytes of every length up to 200.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode(&bytes, "AbCdEf012345");
            let mut h = bytes.clone();
            if !h.is_empty() {
                h[0] = HEADER | (h[0] & 3);
                let _ = decode(&h, "AbCdEf012345");
            }
        }
    }
}
