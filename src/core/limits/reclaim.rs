//! Reclaiming the limit state of idle subjects.
//!
//! Every key lineage, consumer and JWT consumer that ever made a request has a small
//! limit-state entry (`km/rl/k/<lineage>`, `km/rl/c/<consumer>`, `km/rl/j/<consumer>`).
//! Keys come and go, so without reclaiming, these entries grow with every key ever
//! used, not with the keys in use.
//!
//! A state is reclaimed only when it is *equivalent to no state at all*, so reclaiming
//! never changes a decision, whether or not its key still exists:
//! - every token bucket in it was last touched at least [`IDLE_MS`] ago, and no bucket
//!   takes longer than `token_bucket::MAX_REFILL_MS` (one day less) to fill, which plan
//!   validation enforces; a full bucket is what an empty entry means;
//! - every quota count in it belongs to a period that started at least [`IDLE_MS`] ago,
//!   so that period (a day, a week or a calendar month: at most 31 days) has ended; an
//!   empty entry means "nothing used in the current period".
//!
//! Shared data cannot be listed, but every subject with limit state has made a request,
//! and every request of an authentic caller is metered into a usage record listed in
//! the usage index (`km/uidx/...`). The walk pages through that index with a cursor
//! kept in shared data, claimed by CAS before a page is read, so the admin workers that
//! run it share the work instead of repeating it. A state is emptied with the CAS token
//! of the read that judged it idle: a request that touched it in between wins, and the
//! state is kept. ABI 0.2 has no delete, so "reclaimed" means the host keeps only the
//! entry's name: the value is freed. Anonymous clients live in the fixed table of
//! `subject_table` and need none of this. With metering disabled there is no usage
//! index, so nothing is walked (documented).

use crate::core::cas::{add_u64_capped, cas_update, Create, Step};
use crate::core::limits::limiter::LimitState;
use crate::core::metering::usage;
use crate::core::store::{decode_u64, read_u64, read_value, Store};

/// How long a state must have been idle before it is reclaimed: 32 days, one more than
/// the longest bucket refill and the longest quota period.
pub const IDLE_MS: u64 = 32 * 24 * 3600 * 1000;
/// The walk's position in the usage index.
pub const CURSOR: &str = "km/reclaim/cursor";
/// States reclaimed since the process started (shown in the admin status).
pub const RECLAIMED: &str = "km/reclaim/n";
const CAS_RETRIES: usize = 8;

/// Whether `state` says nothing an empty entry would not say at `now_ms`.
pub fn is_idle(state: &LimitState, now_ms: u64) -> bool {
    let horizon_ms = now_ms.saturating_sub(IDLE_MS);
    let horizon_s = (horizon_ms / 1000) as i64;
    state.buckets.iter().all(|(_, b)| b.last_ns() / 1_000_000 <= horizon_ms)
        && state
            .quotas
            .iter()
            .all(|(_, q)| q.used == 0 || q.period_start <= horizon_s)
}

/// The limit-state entries a usage record's subject can own.
fn state_names(lineage: &str, consumer: &str) -> [String; 2] {
    match lineage.strip_prefix("jwt-") {
        Some(c) => [format!("km/rl/j/{c}"), format!("km/rl/c/{consumer}")],
        None => [format!("km/rl/k/{lineage}"), format!("km/rl/c/{consumer}")],
    }
}

/// Empties `name` if it holds an idle state; true when it did.
pub fn reclaim_entry(store: &dyn Store, name: &str, now_ms: u64) -> bool {
    let (Some(bytes), cas) = read_value(store, name) else {
        return false;
    };
    if cas == 0 || !is_idle(&LimitState::decode(&bytes), now_ms) {
        return false;
    }
    store.set(name, &[], Some(cas)).is_ok()
}

/// What one step did, for the admin status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Usage-index positions walked.
    pub walked: u64,
    /// States emptied.
    pub reclaimed: u64,
    /// The walk reached the end of the index and starts over.
    pub wrapped: bool,
}

/// Walks up to `budget` positions of the usage index from the shared cursor.
pub fn step(store: &dyn Store, now_ms: u64, budget: u64) -> StepReport {
    let len = read_u64(store, usage::INDEX_LEN);
    if len == 0 || budget == 0 {
        return StepReport::default();
    }
    // Claim [start, start + budget) so concurrent walkers take different pages.
    let claimed = cas_update(store, CURSOR, CAS_RETRIES, Create::ViaLock { now_ms }, |v| {
        let at = v.and_then(decode_u64).unwrap_or(0);
        let start = if at >= len { 0 } else { at };
        let end = start.saturating_add(budget).min(len);
        Step::Write(end.to_le_bytes().to_vec(), (start, end))
    });
    let Ok((start, end)) = claimed else {
        return StepReport::default();
    };
    let mut report = StepReport {
        walked: end - start,
        wrapped: end >= len,
        ..StepReport::default()
    };
    let (rows, _) = usage::entries(store, None, start, (end - start) as usize);
    for (pos, rec) in rows {
        if pos >= end {
            break;
        }
        for name in state_names(&rec.lineage, &rec.consumer) {
            if reclaim_entry(store, &name, now_ms) {
                report.reclaimed += 1;
            }
        }
    }
    if report.reclaimed > 0 {
        // Only a figure for the status: a lost update is not worth retrying for.
        let _ = add_u64_capped(
            store,
            RECLAIMED,
            report.reclaimed,
            u64::MAX,
            CAS_RETRIES,
            Create::ViaLock { now_ms },
        );
    }
    report
}

/// `{cursor, reclaimed_states}` for the admin status.
pub fn status(store: &dyn Store) -> serde_json::Value {
    serde_json::json!({"cursor": read_u64(store, CURSOR), "reclaimed_states": read_u64(store, RECLAIMED)})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::limits::limiter::{apply, LimitOutcome};
    use crate::core::limits::plan::{NamedBucket, NamedQuota};
    use crate::core::limits::test_support::{bucket, monthly};
    use crate::core::limits::token_bucket::BucketLimit;
    use crate::core::metering::usage::{merge, Counters, Outcome, Subject};
    use crate::core::store::MemStore;

    const DAY: u64 = 24 * 3600 * 1000;
    /// 2023-11-14T22:13:20Z.
    const T0: u64 = 1_700_000_000_000;

    fn use_subject(s: &MemStore, lineage: &str, consumer: &str, now_ms: u64) {
        let mut c = Counters::default();
        c.record(Outcome::Admitted, 200, 0, 0, 1);
        let subject = Subject {
            lineage: lineage.into(),
            key_id: lineage.into(),
            consumer: consumer.into(),
            plan: "p".into(),
        };
        merge(s, &subject, &c, now_ms).unwrap();
    }

    fn take(s: &MemStore, name: &str, b: &[NamedBucket], q: &[NamedQuota], now_ms: u64) -> bool {
        matches!(apply(s, name, b, q, now_ms, 1), LimitOutcome::Allowed(_))
    }

    fn value(s: &MemStore, name: &str) -> Vec<u8> {
        s.get(name).0.unwrap_or_default()
    }

    #[test]
    fn only_states_equivalent_to_none_are_idle() {
        let s = MemStore::default();
        // A bucket drained at T0: not idle until IDLE_MS later.
        let b = bucket(1, 1000, 5);
        for _ in 0..5 {
            assert!(take(&s, "km/rl/k/a", &b, &[], T0));
        }
        let st = LimitState::decode(&value(&s, "km/rl/k/a"));
        assert!(!is_idle(&st, T0 + IDLE_MS - 1));
        assert!(is_idle(&st, T0 + IDLE_MS));
        // A quota used this month: idle only once its period began IDLE_MS ago.
        assert!(take(&s, "km/rl/k/q", &[], &monthly(10), T0));
        let st = LimitState::decode(&value(&s, "km/rl/k/q"));
        let period_start_ms = st.quotas[0].1.period_start as u64 * 1000;
        assert!(!is_idle(&st, period_start_ms + IDLE_MS - 1));
        assert!(is_idle(&st, period_start_ms + IDLE_MS));
    }

    #[test]
    fn a_reclaimed_state_decides_exactly_like_the_kept_one() {
        // The slowest bucket validation allows: 31 days to refill from empty.
        let b = bucket(1, crate::core::limits::token_bucket::MAX_REFILL_MS, 1);
        assert!(b[0].limit.validate().is_ok());
        let q = monthly(3);
        let kept = MemStore::default();
        let reclaimed = MemStore::default();
        for s in [&kept, &reclaimed] {
            assert!(take(s, "km/rl/k/a", &b, &q, T0));
            assert!(!take(s, "km/rl/k/a", &b, &q, T0 + 1), "bucket is empty");
        }
        let later = T0 + IDLE_MS;
        assert!(reclaim_entry(&reclaimed, "km/rl/k/a", later));
        assert!(value(&reclaimed, "km/rl/k/a").is_empty());
        assert!(!reclaim_entry(&kept, "km/rl/k/missing", later));
        // From then on both stores answer every request the same way.
        for i in 0..6 {
            let t = later + i * 1000;
            assert_eq!(
                take(&kept, "km/rl/k/a", &b, &q, t),
                take(&reclaimed, "km/rl/k/a", &b, &q, t),
                "request {i}"
            );
        }
    }

    #[test]
    fn a_state_touched_after_the_read_is_kept() {
        // The CAS token of the judging read guards the write: a request in between wins.
        let s = MemStore::default();
        let b = bucket(10, 1000, 10);
        assert!(take(&s, "km/rl/k/a", &b, &[], T0));
        let (bytes, cas) = s.get("km/rl/k/a");
        assert!(is_idle(&LimitState::decode(&bytes.unwrap()), T0 + IDLE_MS));
        assert!(take(&s, "km/rl/k/a", &b, &[], T0 + IDLE_MS));
        assert!(s.set("km/rl/k/a", &[], Some(cas)).is_err(), "stale token must lose");
        assert!(!reclaim_entry(&s, "km/rl/k/a", T0 + IDLE_MS), "freshly used");
    }

    #[test]
    fn the_walk_reclaims_idle_subjects_of_keys_gone_and_keeps_active_ones() {
        let s = MemStore::default();
        let b = bucket(10, 1000, 1000);
        let q = monthly(1000);
        // 300 lineages (a key set churning through keys), 1 consumer each of 3.
        for i in 0..300u64 {
            let lineage = format!("lin{i:04}");
            let consumer = format!("c{}", i % 3);
            use_subject(&s, &lineage, &consumer, T0);
            assert!(take(&s, &format!("km/rl/k/{lineage}"), &b, &q, T0));
            assert!(take(&s, &format!("km/rl/c/{consumer}"), &b, &q, T0));
        }
        // A JWT user, limited on its own state.
        use_subject(&s, "jwt-alice", "alice", T0);
        assert!(take(&s, "km/rl/j/alice", &b, &q, T0));
        let held = |s: &MemStore| {
            s.keys_with_prefix("km/rl/")
                .iter()
                .filter(|k| !value(s, k).is_empty())
                .count()
        };
        assert_eq!(held(&s), 300 + 3 + 1);

        // Nothing is idle yet: a whole cycle reclaims nothing.
        let mut walked = 0;
        while walked < 301 {
            let r = step(&s, T0 + DAY, 64);
            assert_eq!(r.reclaimed, 0);
            walked += r.walked;
        }
        // Lineage 7 and consumer c1 stay in use; everything else falls idle.
        let later = T0 + IDLE_MS + DAY;
        assert!(take(&s, "km/rl/k/lin0007", &b, &q, later - DAY));
        assert!(take(&s, "km/rl/c/c1", &b, &q, later - DAY));
        let mut reclaimed = 0;
        let mut walked = 0;
        while walked < 301 {
            let r = step(&s, later, 64);
            reclaimed += r.reclaimed;
            walked += r.walked;
        }
        assert_eq!(reclaimed, 299 + 2 + 1);
        assert_eq!(status(&s)["reclaimed_states"], 302);
        assert_eq!(held(&s), 2);
        assert!(!value(&s, "km/rl/k/lin0007").is_empty());
        assert!(!value(&s, "km/rl/c/c1").is_empty());
        // Usage records are billing data: never touched.
        assert_eq!(usage::page(&s, None, 0, 1000).0.len(), 301);
    }

    #[test]
    fn concurrent_walkers_share_the_index_instead_of_repeating_it() {
        let s = MemStore::default();
        for i in 0..100u64 {
            use_subject(&s, &format!("l{i}"), "c", T0);
        }
        let a = step(&s, T0, 30);
        let b = step(&s, T0, 30);
        assert_eq!((a.walked, b.walked), (30, 30));
        assert_eq!(decode_u64(&value(&s, CURSOR)), Some(60));
        let c = step(&s, T0, 100);
        assert_eq!((c.walked, c.wrapped), (40, true));
        assert_eq!(step(&s, T0, 10).walked, 10, "starts over");
    }

    #[test]
    fn a_bucket_slower_than_the_reclaim_horizon_is_refused_by_validation() {
        let too_slow = BucketLimit {
            rate: 1,
            interval_ms: crate::core::limits::token_bucket::MAX_REFILL_MS,
            burst: 2,
        };
        assert_eq!(
            too_slow.validate(),
            Err(crate::core::limits::token_bucket::LimitError::RefillTooLong)
        );
    }
}
