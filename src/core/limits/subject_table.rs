//! Limit state for subjects nobody registered: anonymous clients, by address.
//!
//! Keys and consumers are bounded by the key set, but client addresses are not: one
//! shared-data entry per address ever seen would grow without bound (ABI 0.2 cannot
//! delete), and churning source addresses is cheap. Their state therefore lives in a
//! fixed table of `slots` entries (`km/rl/ip/<n>`), each holding its owner and its
//! limit state. A subject hashes to `PROBES` candidate slots and uses the first that is
//! its own, free, or held by an owner whose state is idle (every bucket full again, no
//! quota used in the current period: forgetting it changes no decision). When all
//! candidates are busy with other live subjects, the subject shares the first one's
//! state: it is limited together with that neighbour (never unlimited), which only
//! happens with more live anonymous clients than the table holds.

use crate::core::cas::{cas_update, Create, Step};
use crate::core::limits::limiter::{evaluate, LimitOutcome, LimitState, CAS_RETRIES};
use crate::core::limits::plan::{NamedBucket, NamedQuota};
use crate::core::store::Store;
use serde::{Deserialize, Serialize};

/// Slots of the anonymous table: the bound on anonymous limit entries (about 200 bytes
/// each with the host's overhead, so at most ~13 MB).
pub const ANONYMOUS_SLOTS: u32 = 65_536;
/// Candidate slots per subject.
pub const PROBES: u32 = 8;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SlotValue {
    owner: String,
    state: LimitState,
}

/// Shared-data name of slot `n`.
pub fn slot_name(n: u32) -> String {
    format!("km/rl/ip/{n}")
}

/// The `probe`-th candidate slot of `subject` (FNV-1a, stable across builds).
pub fn slot_of(subject: &str, probe: u32, slots: u32) -> u32 {
    let h = subject
        .bytes()
        .chain(probe.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
    (h % slots.max(1) as u64) as u32
}

/// Whether forgetting `state` changes no decision at `now_ms`.
fn idle(state: &LimitState, buckets: &[NamedBucket], quotas: &[NamedQuota], now_ms: u64) -> bool {
    let (as_is, _) = evaluate(buckets, quotas, state, now_ms, 0);
    let (fresh, _) = evaluate(buckets, quotas, &LimitState::default(), now_ms, 0);
    as_is
        .views
        .iter()
        .zip(&fresh.views)
        .all(|(a, f)| a.remaining == f.remaining)
}

enum Probe {
    Done(LimitOutcome),
    /// Held by another live subject.
    Taken,
}

/// Applies limits to `subject` (an anonymous client's address) in a table of `slots`.
pub fn apply(
    store: &dyn Store,
    subject: &str,
    slots: u32,
    buckets: &[NamedBucket],
    quotas: &[NamedQuota],
    now_ms: u64,
    cost: u64,
) -> LimitOutcome {
    if buckets.is_empty() && quotas.is_empty() {
        return crate::core::limits::limiter::apply(store, "", buckets, quotas, now_ms, cost);
    }
    let create = Create::ViaLock { now_ms };
    for probe in 0..PROBES {
        let name = slot_name(slot_of(subject, probe, slots));
        let r = cas_update(store, &name, CAS_RETRIES, create, |bytes| {
            let slot: SlotValue = bytes.and_then(|b| bincode::deserialize(b).ok()).unwrap_or_default();
            let mine = slot.owner == subject;
            if !mine && !slot.owner.is_empty() && !idle(&slot.state, buckets, quotas, now_ms) {
                return Step::Keep(Probe::Taken);
            }
            let state = if mine { slot.state } else { LimitState::default() };
            decide(subject, &state, buckets, quotas, now_ms, cost)
        });
        match r {
            Ok(Probe::Done(outcome)) => return outcome,
            Ok(Probe::Taken) => continue,
            Err(_) => return LimitOutcome::Contended,
        }
    }
    // Every candidate is held by a live subject: share the first one's state.
    let name = slot_name(slot_of(subject, 0, slots));
    let r = cas_update(store, &name, CAS_RETRIES, create, |bytes| {
        let slot: SlotValue = bytes.and_then(|b| bincode::deserialize(b).ok()).unwrap_or_default();
        decide(&slot.owner, &slot.state, buckets, quotas, now_ms, cost)
    });
    match r {
        Ok(Probe::Done(outcome)) => outcome,
        _ => LimitOutcome::Contended,
    }
}

fn decide(
    owner: &str,
    state: &LimitState,
    buckets: &[NamedBucket],
    quotas: &[NamedQuota],
    now_ms: u64,
    cost: u64,
) -> Step<Probe> {
    match evaluate(buckets, quotas, state, now_ms, cost) {
        (verdict, Some(next)) => {
            let v = SlotValue {
                owner: owner.to_string(),
                state: next,
            };
            Step::Write(
                bincode::serialize(&v).expect("slot encodes"),
                Probe::Done(LimitOutcome::Allowed(verdict)),
            )
        }
        (verdict, None) => Step::Keep(Probe::Done(LimitOutcome::Denied(verdict))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::limits::plan::NamedBucket;
    use crate::core::limits::token_bucket::BucketLimit;
    use crate::core::store::MemStore;

    const T0: u64 = 1_700_000_000_000;

    fn per_minute(n: u64) -> Vec<NamedBucket> {
        vec![NamedBucket {
            name: "m".into(),
            limit: BucketLimit {
                rate: n,
                interval_ms: 60_000,
                burst: n,
            },
        }]
    }

    fn allowed(o: &LimitOutcome) -> bool {
        matches!(o, LimitOutcome::Allowed(_))
    }

    /// Issue 10.17: anonymous clients churning source addresses create a bounded number
    /// of shared-data entries, and each one is still limited on its own.
    #[test]
    fn address_churn_is_bounded_and_each_address_stays_limited() {
        let s = MemStore::default();
        let b = per_minute(2);
        let slots = 512;
        let mut now = T0;
        let mut refused = 0;
        for i in 0..20_000u32 {
            let ip = format!("127.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
            refused += usize::from(!allowed(&apply(&s, &ip, slots, &b, &[], now, 1)));
            now += 200; // 4000 s of churn: an address is idle 30 s after its request
        }
        // ~150 live addresses in 512 slots: a newcomer finds a free candidate among
        // PROBES almost always; the rare one that does not shares a neighbour's state.
        assert!(refused <= 20, "{refused} of 20000 first requests refused");
        let entries = s.keys_with_prefix("km/rl/").len();
        assert!(entries <= slots as usize, "{entries} limit entries for 20000 addresses");
        // one address still gets exactly its own allowance
        let ip = "127.99.0.1";
        assert!(allowed(&apply(&s, ip, slots, &b, &[], now, 1)));
        assert!(allowed(&apply(&s, ip, slots, &b, &[], now, 1)));
        assert!(
            !allowed(&apply(&s, ip, slots, &b, &[], now, 1)),
            "a third request in the minute"
        );
        // and a neighbour is not charged for it
        assert!(allowed(&apply(&s, "127.99.0.2", slots, &b, &[], now, 1)));
    }

    /// A live subject is never evicted by a newcomer: its state survives the churn.
    #[test]
    fn a_live_subject_keeps_its_slot() {
        let s = MemStore::default();
        let b = per_minute(3);
        let slots = 8;
        for _ in 0..3 {
            assert!(allowed(&apply(&s, "10.0.0.1", slots, &b, &[], T0, 1)));
        }
        for i in 0..100 {
            let _ = apply(&s, &format!("10.1.0.{i}"), slots, &b, &[], T0 + 1, 1);
        }
        assert!(
            !allowed(&apply(&s, "10.0.0.1", slots, &b, &[], T0 + 2, 1)),
            "the exhausted address was reset by others' traffic"
        );
        assert!(s.keys_with_prefix("km/rl/").len() <= slots as usize);
    }
}
