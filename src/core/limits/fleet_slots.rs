//! Fleet mode's anonymous subjects (`ip:<addr>`) in a fixed table of node entries.
//!
//! Keys and consumers are bounded by the key set; client addresses are not, and ABI 0.2
//! cannot delete a shared-data entry. So, as in single-node mode
//! (`super::subject_table`), an address's node state (its [`FleetEntry`]: lease,
//! sequence number, spend) lives in one of `slots` fixed entries `km/fl/ip/<n>`, found
//! among `PROBES` candidates. A slot is taken over from another address only when
//! forgetting that address's entry loses nothing (see [`forgettable`]: no units held,
//! every spend reported, no call in flight), which the root context brings about by
//! returning an idle subject's lease. With more live addresses than the table holds, a
//! newcomer shares the first candidate's entry: limited together with that neighbour
//! (charged to its subject in the fleet), never unlimited.
//!
//! Each claim gets a new epoch, and the slot's lease calls go to the fleet under the
//! node id `<node id>.<epoch>`: the fleet keeps a node's sequence number and
//! cumulative spend per subject for days, and a fresh entry (sequence 0, spend 0) must
//! not look like a replay of the address's earlier entry on this node.
//!
//! The fleet side is bounded by time: every key limitd writes for a subject expires
//! (buckets soon after they would be full, quota periods a day after their end, the
//! node record after `--forget-node-ms`).

use super::fleet::FleetEntry;
use super::lease::LeasePolicy;
use super::subject_table::{slot_of, PROBES};
use crate::core::cas::{cas_update, Create, Step};
use crate::core::store::Store;
use serde::{Deserialize, Serialize};

/// Largest node id limitd accepts (`fleet_protocol`'s `valid_node`).
const MAX_NODE_ID: usize = 64;
/// CAS attempts on one slot.
const CAS_RETRIES: usize = 32;

/// Shared-data name of slot `n`.
pub fn slot_name(n: u32) -> String {
    format!("km/fl/ip/{n}")
}

/// One slot: whose entry it holds, since which claim, and the entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnonSlot {
    /// The subject (`ip:<addr>`); empty: never claimed.
    pub owner: String,
    /// When it was claimed (ms): names the slot's node id in the fleet.
    pub epoch: u64,
    pub entry: FleetEntry,
}

impl AnonSlot {
    pub fn decode(bytes: &[u8]) -> AnonSlot {
        super::fleet::decode_tagged(bytes)
    }
    pub fn encode(&self) -> Vec<u8> {
        super::fleet::encode_tagged(self)
    }
}

/// Why a slot update did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// The slot holds another subject now (or another claim of this one).
    Lost,
    /// Other writers won every CAS attempt (or the host failed).
    Contended,
}

/// Where a subject's node entry is: slot `n`, held by `owner` since `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub n: u32,
    /// The subject whose limits apply (the address itself, or the neighbour it shares
    /// with when the table is full).
    pub owner: String,
    pub epoch: u64,
}

impl Place {
    /// The node id of this slot's lease calls: `<node id>.<epoch in base 36>`, cut
    /// from the front to limitd's 64 characters (the unique instance id is at the end).
    pub fn node_id(&self, node_id: &str) -> String {
        let mut s = format!("{node_id}.{}", base36(self.epoch));
        if s.len() > MAX_NODE_ID {
            s.drain(..s.len() - MAX_NODE_ID);
        }
        s
    }
}

fn base36(mut v: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// Whether forgetting `e` at `now_ms` loses nothing: no units held, lent or to give
/// back, every spend reported (billing), no call in flight, no partition overdraft, no
/// take in doubt.
pub fn forgettable(e: &FleetEntry, now_ms: u64, policy: &LeasePolicy) -> bool {
    let mut lease = e.lease;
    lease.expire(now_ms);
    lease.settled() && !lease.refill_in_flight(now_ms, policy) && e.overdraft_used == 0 && e.doubts.is_empty()
}

/// Finds (or claims) the slot of `subject` in a table of `slots` and applies `f` to
/// its entry under CAS (`f` may run more than once; it gets the place). `None` when the
/// slots stayed contended.
///
/// Probing reads candidates in order: the subject's own slot is used wherever it is;
/// a never-claimed slot ends the search (the subject cannot own one beyond it: slots
/// are never emptied, so every candidate before its own was taken when it claimed); the
/// first forgettable slot of another subject is claimed if the subject owns none.
pub fn with_slot<T>(
    store: &dyn Store,
    subject: &str,
    slots: u32,
    now_ms: u64,
    policy: &LeasePolicy,
    mut f: impl FnMut(&mut FleetEntry, &Place) -> T,
) -> Option<(T, Place)> {
    // The probing and CAS loops are not generic (one copy in the wasm, whatever `T`):
    // `f`'s result comes out through `out` (the last run is the one that was stored).
    let mut out = None;
    let place = find(store, subject, slots, now_ms, policy, &mut |e, p| out = Some(f(e, p)))?;
    Some((out?, place))
}

fn find(
    store: &dyn Store,
    subject: &str,
    slots: u32,
    now_ms: u64,
    policy: &LeasePolicy,
    f: &mut dyn FnMut(&mut FleetEntry, &Place),
) -> Option<Place> {
    let mut claim = None;
    for probe in 0..PROBES {
        let n = slot_of(subject, probe, slots);
        let (bytes, _) = crate::core::store::read_value(store, &slot_name(n));
        let Some(bytes) = bytes else {
            claim = claim.or(Some(n));
            break;
        };
        let slot = AnonSlot::decode(&bytes);
        if slot.owner == subject {
            return update(store, n, now_ms, &mut |s| s.owner == subject, f).ok();
        }
        if claim.is_none() && (slot.owner.is_empty() || forgettable(&slot.entry, now_ms, policy)) {
            claim = Some(n);
        }
    }
    if let Some(n) = claim {
        let mut admit = |s: &mut AnonSlot| {
            let free = s.owner.is_empty() || s.owner == subject || forgettable(&s.entry, now_ms, policy);
            if free && s.owner != subject {
                *s = AnonSlot {
                    owner: subject.to_string(),
                    epoch: now_ms.max(s.epoch + 1),
                    entry: FleetEntry::default(),
                };
            }
            free
        };
        if let Ok(place) = update(store, n, now_ms, &mut admit, f) {
            return Some(place);
        }
    }
    // Every candidate holds a live subject: share the first one's entry (and limits).
    let n = slot_of(subject, 0, slots);
    update(store, n, now_ms, &mut |_| true, f).ok()
}

/// CAS-updates slot `n`: `admit` checks (and may claim) the slot, then `f` runs on its
/// entry.
fn update(
    store: &dyn Store,
    n: u32,
    now_ms: u64,
    admit: &mut dyn FnMut(&mut AnonSlot) -> bool,
    f: &mut dyn FnMut(&mut FleetEntry, &Place),
) -> Result<Place, Miss> {
    let r = cas_update(
        store,
        &slot_name(n),
        CAS_RETRIES,
        Create::ViaLock { now_ms },
        |current| {
            let old = current.map(AnonSlot::decode).unwrap_or_default();
            let mut slot = old.clone();
            if !admit(&mut slot) {
                return Step::Keep(Err(Miss::Lost));
            }
            let place = Place {
                n,
                owner: slot.owner.clone(),
                epoch: slot.epoch,
            };
            f(&mut slot.entry, &place);
            if current.is_some() && slot == old {
                Step::Keep(Ok(place))
            } else {
                Step::Write(slot.encode(), Ok(place))
            }
        },
    );
    r.unwrap_or(Err(Miss::Contended))
}

/// Applies `f` to the entry at `place` if the slot still holds it (same owner and
/// epoch): `Miss::Lost` once it was taken over (the entry was forgettable).
pub fn at_place<T>(
    store: &dyn Store,
    place: &Place,
    now_ms: u64,
    mut f: impl FnMut(&mut FleetEntry) -> T,
) -> Result<T, Miss> {
    let mut out = None;
    update(
        store,
        place.n,
        now_ms,
        &mut |s| s.owner == place.owner && s.epoch == place.epoch,
        &mut |e, _| out = Some(f(e)),
    )?;
    out.ok_or(Miss::Contended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::limits::fleet::{self, FleetDoc, Step as FleetStep};
    use crate::core::limits::plan::NamedQuota;
    use crate::core::limits::quota::Period;
    use crate::core::remote::fleet_protocol::LeaseResponse;
    use crate::core::store::MemStore;

    const T0: u64 = 1_700_000_000_000;

    fn cfg() -> fleet::FleetConfig {
        let doc: FleetDoc = serde_json::from_str(r#"{"cluster":"l","fleet_size":2}"#).unwrap();
        doc.validate().unwrap()
    }

    fn quota() -> Vec<NamedQuota> {
        vec![NamedQuota {
            name: "d".into(),
            period: Period::Day,
            limit: 1000,
        }]
    }

    /// One anonymous request as the adapter runs it, with the fleet played by a grant
    /// of 4 units on a lease call: decide from the lease; if empty, lease (which the
    /// adapter does off the request path) and decide again.
    fn request(s: &MemStore, addr: &str, slots: u32, now: u64) -> Place {
        let c = cfg();
        let policy = c.policy();
        let q = quota();
        let subject = format!("ip:{addr}");
        let (step, place) = with_slot(s, &subject, slots, now, &policy, |e, _| {
            fleet::decide(e, &[], &q, &c, now, 1, true)
        })
        .unwrap();
        if step == FleetStep::Take {
            at_place(s, &place, now, |e| {
                let sub = fleet::Subject {
                    name: &place.owner,
                    buckets: &[],
                    quotas: &q,
                };
                // (None: the lender said to wait; the adapter would take instead.)
                let Some((ask, _)) = fleet::begin_lease(e, &place.node_id("n"), &sub, &c, now, false) else {
                    return;
                };
                let resp = LeaseResponse {
                    applied: true,
                    granted: 4,
                    hold_void: false,
                    valid_ms: 30_000,
                    now_ms: now,
                    buckets: vec![],
                    quotas: vec![],
                    settled: Vec::new(),
                };
                fleet::apply_lease(e, &ask, &resp, &[], now, &c);
                assert!(e.lease.try_spend(1, now));
            })
            .unwrap();
        }
        place
    }

    /// The root context's idle return: gives the lease back and reports the spend.
    fn settle(s: &MemStore, place: &Place, now: u64) {
        let c = cfg();
        let q = quota();
        at_place(s, place, now, |e| {
            let sub = fleet::Subject {
                name: &place.owner,
                buckets: &[],
                quotas: &q,
            };
            let (ask, _) = fleet::begin_lease(e, "n", &sub, &c, now, true).unwrap();
            let resp = LeaseResponse {
                applied: true,
                granted: 0,
                hold_void: false,
                valid_ms: 30_000,
                now_ms: now,
                buckets: vec![],
                quotas: vec![],
                settled: Vec::new(),
            };
            fleet::apply_lease(e, &ask, &resp, &[], now, &c);
        })
        .unwrap();
    }

    /// Issue 10.17 in fleet mode: addresses churning through a node create a bounded
    /// number of node entries, a live address keeps its slot (and lease), and a
    /// returning address gets a new epoch (a new node id in the fleet).
    #[test]
    fn address_churn_is_bounded_in_fleet_mode() {
        let s = MemStore::default();
        let slots = 256;
        let mut now = T0;
        let mut live: Vec<Place> = Vec::new();
        let mut shared = 0;
        for i in 0..20_000u32 {
            let addr = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
            let place = request(&s, &addr, slots, now);
            shared += usize::from(place.owner != format!("ip:{addr}"));
            live.push(place);
            // The root context returns leases of subjects idle for a while: here, the
            // ones seen 100 requests ago.
            if live.len() > 100 {
                let old = live.remove(0);
                settle(&s, &old, now);
            }
            now += 10;
        }
        let entries = s.keys_with_prefix("km/fl/").len();
        assert!(entries <= slots as usize, "{entries} node entries for 20000 addresses");
        assert!(shared <= 20, "{shared} of 20000 addresses shared a neighbour's entry");
        // A live address keeps its slot and its lease through the churn.
        let p1 = request(&s, "192.0.2.1", slots, now);
        let mut rivals = 0;
        for i in 0..5_000u32 {
            let addr = format!("198.51.{}.{}", i >> 8, i & 255);
            // Addresses whose first candidate is that slot, and all others too.
            rivals += usize::from(slot_of(&format!("ip:{addr}"), 0, slots) == p1.n);
            let p = request(&s, &addr, slots, now);
            assert_ne!(p.owner, p1.owner, "{addr} shares a live entry while slots are free");
            settle(&s, &p, now); // each rival goes idle at once: the table has room
        }
        assert!(rivals > 0);
        let p2 = request(&s, "192.0.2.1", slots, now);
        assert_eq!(p1, p2, "kept its slot");
        let held = at_place(&s, &p2, now, |e| e.lease.available).unwrap();
        assert_eq!(held, 2, "4 granted, 2 spent: the lease survived the churn");
        // Once settled and taken over, a returning address starts a new epoch.
        settle(&s, &p2, now);
        let mut taker = None;
        for i in 0..10_000u32 {
            let p = request(&s, &format!("203.0.{}.{}", i >> 8, i & 255), slots, now + 1);
            if p.n == p2.n && p.owner != p2.owner {
                taker = Some(p);
                break;
            }
        }
        assert!(taker.is_some(), "the forgettable slot was reused");
        let p3 = request(&s, "192.0.2.1", slots, now + 2);
        assert_ne!(
            p3.node_id("envoy-1"),
            p2.node_id("envoy-1"),
            "a new node id for the new entry"
        );
    }

    #[test]
    fn node_ids_fit_limitd_and_keep_the_instance() {
        let p = Place {
            n: 1,
            owner: "ip:1.2.3.4".into(),
            epoch: T0,
        };
        assert_eq!(p.node_id("envoy-ab12"), format!("envoy-ab12.{}", base36(T0)));
        let long = format!("{}-0123456789abcdef", "x".repeat(40));
        let id = p.node_id(&long);
        assert_eq!(id.len(), 64);
        assert!(id.ends_with(&format!("0123456789abcdef.{}", base36(T0))), "{id}");
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
    }

    #[test]
    fn an_unsettled_entry_is_never_taken_over() {
        let c = cfg();
        let policy = c.policy();
        let mut e = FleetEntry::default();
        assert!(forgettable(&e, T0, &policy));
        e.lease.available = 3;
        e.lease.expires_at_ms = T0 + 1_000;
        assert!(!forgettable(&e, T0, &policy), "units held");
        // Expired but not yet told to the fleet: still not forgettable.
        assert!(!forgettable(&e, T0 + 1_000, &policy));
        let mut e = FleetEntry::default();
        e.lease.spent_total = 2;
        assert!(!forgettable(&e, T0, &policy), "spend not reported");
        e.lease.reported_total = 2;
        e.overdraft_used = 1;
        assert!(!forgettable(&e, T0, &policy), "partition overdraft not reported");
    }
}
