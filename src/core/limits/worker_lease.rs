//! Worker token leases: a worker takes several units of a subject's limits from the
//! shared state in one CAS and spends them locally, so the steady request of a busy key
//! makes no shared-data call for its limits (no get, no CAS set, no wait on Envoy's
//! process-wide shared-data mutex).
//!
//! The same design as fleet mode one level down: the worker is the holder (a
//! [`Lease`]), the subject's [`LimitState`] in shared data is the lender
//! ([`limiter::lease_take`]). A unit is one unit of request cost, good for every limit
//! of the subject at once.
//!
//! In fleet mode the lender is the node's own lease instead (an *external* lender, in
//! `km/fl/<subject>`): the same entries, sizes and [`WorkerLeases::spend`], drawn with
//! [`WorkerLeases::begin_draw`] / [`WorkerLeases::end_draw`] inside the node entry's
//! CAS and settled with [`WorkerLeases::settlements_due`]; the node's side, which
//! counts lent units as lent and not spent, is `core::limits::fleet_loans`.
//!
//! * **Taken before spent.** A worker admits only what it holds; what it holds was taken
//!   from the shared buckets and quotas by a CAS, like any request.
//! * **Settled at every CAS.** When its lease cannot cover a request, the worker gives
//!   back everything it still holds (and anything that expired) and takes the request's
//!   cost plus up to [`hold_cap`] units, in one CAS. So a worker never holds more than
//!   `hold_cap` units, and the request is decided on the shared state plus this worker's
//!   own units: exactly as without leases, except for what *other* workers hold.
//! * **Short-lived.** Units are valid [`LEASE_MS`], and never past the end of the current
//!   period of any of the subject's quotas (a quota unit is always spent in the period
//!   it was counted in). Expired units go back with the worker's next CAS for the
//!   subject or at its next [`WorkerLeases::sweep`] (every [`SWEEP_MS`]); all of them at
//!   [`WorkerLeases::release_all`] (plugin reload or shutdown).
//! * **Sized by demand.** A worker asks for what it spent in the last lease period at
//!   its recent rate, so a key seen now and then takes exactly its cost, as before; only
//!   a key busy on this worker gets a lease.
//!
//! # Sizes and bounds (W workers, documented in the README)
//!
//! `hold_cap` = min(`rate × 10 ms / interval` and `burst / 16` of every bucket,
//! `limit / 16` of every quota, 1024). The worker count is not visible to a wasm
//! module, so the share of the burst is sized for up to 8 workers (`lease::share(8)` =
//! 16): even then half of a burst stays shared. A `hold_cap` of 0 (burst under 16, a
//! rate under 100/s, a quota under 16) means no lease: every request is one exact CAS,
//! as without leases.
//!
//! * token bucket, admitted in any window T: ≤ `burst + rate × T / interval + W ×
//!   hold_cap` (the bucket plus what the leases hold; every grant comes out of the one
//!   bucket), so the skew is at most W × 10 ms of rate;
//! * token bucket, under-admission: ≤ W × `hold_cap` units parked in leases at once,
//!   back within `LEASE_MS + SWEEP_MS`;
//! * quota: never more than its limit; units parked in other workers' leases (each at
//!   most 1/16 of what was left when it took them, none among the last 16) are back
//!   within `LEASE_MS + SWEEP_MS`; a worker that dies without unloading loses at most
//!   `hold_cap` units per subject (under-admission, never over).

use super::lease::{self, Ask, Lease};
use super::limiter::{self, LimitOutcome, LimitState, LimitView, CAS_RETRIES};
use super::plan::{NamedBucket, NamedQuota};
use super::quota::period_bounds;
use crate::core::cas::{cas_update, Create, Step};
use crate::core::store::Store;
use std::collections::HashMap;

/// Validity of leased units.
pub const LEASE_MS: u64 = 50;
/// A lease holds at most this much of a bucket's refill.
pub const RATE_SLICE_MS: u64 = 10;
/// Workers the burst share is sized for (the real count is not visible to the module).
pub const SIZED_FOR_WORKERS: u64 = 8;
/// Largest lease, whatever the limits.
pub const MAX_HOLD: u64 = 1024;
/// How often each worker returns expired leases of subjects it no longer sees.
pub const SWEEP_MS: u64 = 100;
/// A subject this worker has not taken units for this long (and holds nothing of) is
/// forgotten.
pub const FORGET_MS: u64 = 1_000;
/// Subjects tracked per worker; beyond it new subjects are decided without a lease.
pub const CAPACITY: usize = 4_096;

/// The divisor of the burst and quota shares: `lease::share(SIZED_FOR_WORKERS)`.
pub fn share() -> u64 {
    lease::share(SIZED_FOR_WORKERS)
}

/// Most units a worker may hold for a subject with these limits; 0: no lease (every
/// request decided by one exact CAS).
pub fn hold_cap(buckets: &[NamedBucket], quotas: &[NamedQuota]) -> u64 {
    let share = share();
    let mut cap = MAX_HOLD;
    for b in buckets {
        let l = &b.limit;
        let slice = u128::from(l.rate) * u128::from(RATE_SLICE_MS) / u128::from(l.interval_ms.max(1));
        cap = cap.min(u64::try_from(slice).unwrap_or(u64::MAX)).min(l.burst / share);
    }
    for q in quotas {
        cap = cap.min(q.limit / share);
    }
    cap
}

/// Validity of units taken at `now_ms`: [`LEASE_MS`], cut at the end of the current
/// period of every quota. At least 1 ms (a period never ends at the instant it is in).
pub fn valid_ms(quotas: &[NamedQuota], now_ms: u64) -> u64 {
    let now_secs = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    quotas
        .iter()
        .map(|q| {
            let end_ms = u64::try_from(period_bounds(q.period, now_secs).1)
                .unwrap_or(0)
                .saturating_mul(1000);
            end_ms.saturating_sub(now_ms)
        })
        .fold(LEASE_MS, u64::min)
        .max(1)
}

/// Accuracy bounds, as documented in the README and checked by the tests.
pub mod bounds {
    /// Most units of a token bucket (`rate` per `interval_ms`, capacity `burst`) that
    /// `workers` leasing workers admit in any window of `window_ms`, each holding at most
    /// `hold` units: `burst + rate × window / interval + workers × hold`.
    pub fn rate_admitted_max(rate: u64, interval_ms: u64, burst: u64, window_ms: u64, workers: u64, hold: u64) -> u64 {
        let refill = u128::from(rate) * u128::from(window_ms) / u128::from(interval_ms.max(1));
        let held = u128::from(workers) * u128::from(hold);
        u64::try_from(u128::from(burst).saturating_add(refill).saturating_add(held)).unwrap_or(u64::MAX)
    }
}

/// One subject's lease on this worker.
#[derive(Debug)]
struct Entry {
    lease: Lease,
    /// The limits the units were taken under: a request under other limits (a plan
    /// change) is not served from them, and the sweep gives them back to these.
    buckets: Vec<NamedBucket>,
    quotas: Vec<NamedQuota>,
    /// When the last CAS took units (their quota periods are those of this instant).
    taken_at_ms: u64,
    /// Units this worker spent since then, the CAS request included (sizes the next ask).
    spent: u64,
    /// Each limit's view of the shared state after that CAS; a request served from the
    /// lease reports these plus the units still held.
    views: Vec<LimitView>,
    /// Their `RateLimit-Policy` value, rendered once per CAS.
    policy: String,
    /// The lender is not a shared [`LimitState`] but a lease outside this module (fleet
    /// mode: the node's lease in `km/fl/<subject>`, see `core::limits::fleet_loans`):
    /// units are drawn with [`WorkerLeases::begin_draw`] / [`WorkerLeases::end_draw`]
    /// and settled through [`WorkerLeases::settlements_due`], never by [`Self::sweep`]
    /// or [`Self::release_all`]. Such a lender counts what the worker spent (its
    /// `spent_total`), so the entry is kept until that is reported.
    external: bool,
}

impl Entry {
    /// The units this worker is likely to spend within one lease, at its rate since the
    /// last draw (0 for a subject it took nothing for, or sees now and then), at most `cap`.
    fn want(&self, now_ms: u64, cap: u64) -> u64 {
        let elapsed = now_ms.saturating_sub(self.taken_at_ms).max(1);
        let demand = u128::from(self.spent) * u128::from(LEASE_MS) / u128::from(elapsed);
        u64::try_from(demand).unwrap_or(u64::MAX).min(cap)
    }
}

/// A draw on an external lender (fleet mode), made by the adapter inside the lender's
/// CAS: the worker's settlement of its previous lease (`ask.spent_total -
/// reported_total` spent, `ask.returned` given back) and the units it wants now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draw {
    pub ask: Ask,
    /// Units spent from the previous lease and not yet reported to the lender.
    pub spent: u64,
    /// Units wanted on top of the request's cost (0: settle only).
    pub want: u64,
}

/// What an external lender answered a [`Draw`] (its CAS succeeded).
#[derive(Debug, Clone, Default)]
pub struct Drawn {
    /// Units lent to the worker.
    pub granted: u64,
    /// Their validity from the draw (never past the lender's own expiry).
    pub valid_ms: u64,
    /// Whether the request itself was admitted (its cost is spent by the lender).
    pub admitted: bool,
    /// The limits' views for a request served from the new units (`remaining` without
    /// them: [`Served`] adds what the worker still holds); empty without `RateLimit`
    /// fields.
    pub views: Vec<LimitView>,
}

/// What a request served from the lease reports in its `RateLimit` fields.
pub struct Served<'a> {
    /// The shared state as of the worker's last CAS.
    pub views: &'a [LimitView],
    /// Units this worker still holds.
    pub held: u64,
    /// The `RateLimit-Policy` value of `views`.
    pub policy: &'a str,
}

impl Served<'_> {
    /// `RateLimit-Policy` and `RateLimit` values (`None` without limits).
    pub fn headers(&self) -> Option<(String, String)> {
        (!self.views.is_empty()).then(|| (self.policy.to_string(), limiter::ratelimit_field(self.views, self.held)))
    }
}

/// This worker's leases, by the subject's state key (`km/rl/k/<lineage>`, ...).
#[derive(Debug, Default)]
pub struct WorkerLeases {
    entries: HashMap<String, Entry>,
    /// Requests served from leases on external lenders since [`Self::take_served`]
    /// (fleet mode's lease hit ratio).
    external_served: u64,
}

impl WorkerLeases {
    /// Serves a request of `cost` from the worker's lease on `key` if it holds that many
    /// valid units taken under these very limits. No host call.
    pub fn spend(
        &mut self,
        key: &str,
        buckets: &[NamedBucket],
        quotas: &[NamedQuota],
        now_ms: u64,
        cost: u64,
    ) -> Option<Served<'_>> {
        let e = self.entries.get_mut(key)?;
        if e.buckets != buckets || e.quotas != quotas || !e.lease.try_spend(cost, now_ms) {
            return None;
        }
        e.spent = e.spent.saturating_add(cost);
        if e.external {
            self.external_served += 1;
        }
        Some(Served {
            views: &e.views,
            held: e.lease.available,
            policy: &e.policy,
        })
    }

    /// This worker's entry for `key`, new (nothing held) if it has none.
    fn entry(
        &mut self,
        key: &str,
        buckets: &[NamedBucket],
        quotas: &[NamedQuota],
        now_ms: u64,
        external: bool,
    ) -> &mut Entry {
        self.entries.entry(key.to_string()).or_insert_with(|| Entry {
            lease: Lease::default(),
            buckets: buckets.to_vec(),
            quotas: quotas.to_vec(),
            taken_at_ms: now_ms,
            spent: 0,
            views: Vec::new(),
            policy: String::new(),
            external,
        })
    }

    /// Decides a request the lease could not serve with one CAS on the shared state at
    /// `key`: gives back what the worker holds, decides `cost`, and takes a new lease
    /// sized by this worker's recent demand (none for a subject seen now and then).
    /// The views of an allowed request count the units the worker now holds.
    pub fn take(
        &mut self,
        store: &dyn Store,
        key: &str,
        buckets: &[NamedBucket],
        quotas: &[NamedQuota],
        now_ms: u64,
        cost: u64,
    ) -> LimitOutcome {
        if buckets.is_empty() && quotas.is_empty() {
            return limiter::apply(store, key, buckets, quotas, now_ms, cost);
        }
        let cap = hold_cap(buckets, quotas);
        if !self.entries.contains_key(key) && (cap == 0 || !self.make_room()) {
            // Nothing held and nothing to hold: the exact CAS, as without leases.
            return limiter::apply(store, key, buckets, quotas, now_ms, cost);
        }
        let e = self.entry(key, buckets, quotas, now_ms, false);
        let want = e.want(now_ms, cap);
        let ask = e.lease.release(now_ms);
        let back = (ask.returned, e.taken_at_ms);
        let share = share();
        let r = cas_update(store, key, CAS_RETRIES, Create::ViaLock { now_ms }, |bytes| {
            let state = bytes.map(LimitState::decode).unwrap_or_default();
            let mut t = limiter::lease_take(buckets, quotas, &state, now_ms, cost, want, back, share);
            match t.write.take() {
                Some(next) => Step::Write(next.encode(), t),
                None => Step::Keep(t),
            }
        });
        let Ok(t) = r else {
            // What was held stays to give back at the next CAS.
            e.lease.on_failure();
            return LimitOutcome::Contended;
        };
        e.lease.on_grant(&ask, t.extra, valid_ms(quotas, now_ms));
        if t.check.denial.is_some() {
            return LimitOutcome::Denied(t.check);
        }
        e.taken_at_ms = now_ms;
        e.spent = cost;
        if e.buckets != buckets || e.quotas != quotas {
            e.buckets = buckets.to_vec();
            e.quotas = quotas.to_vec();
        }
        let mut check = t.check;
        e.set_views(&check.views);
        for v in &mut check.views {
            v.remaining = v.remaining.saturating_add(t.extra);
            if v.bucket && v.remaining > 0 {
                v.reset_secs = 0;
            }
        }
        LimitOutcome::Allowed(check)
    }

    /// Gives back the leases that expired (subjects this worker stopped seeing) and
    /// forgets subjects idle for [`FORGET_MS`]. Called every [`SWEEP_MS`] per worker.
    /// Leases on external lenders are left to [`Self::settlements_due`].
    pub fn sweep(&mut self, store: &dyn Store, now_ms: u64) {
        for (key, e) in self.entries.iter_mut().filter(|(_, e)| !e.external) {
            e.lease.expire(now_ms);
            if e.lease.returned_pending > 0 {
                give_back(store, key, e, now_ms);
            }
        }
        self.entries.retain(|_, e| !idle(e, now_ms));
    }

    /// Gives back everything this worker holds (the plugin is unloading).
    /// Leases on external lenders are left to [`Self::settlements_due`] (the fleet node
    /// settles them into its entries before it returns its own lease).
    pub fn release_all(&mut self, store: &dyn Store, now_ms: u64) {
        for (key, e) in self.entries.iter_mut().filter(|(_, e)| !e.external) {
            if e.lease.available > 0 || e.lease.returned_pending > 0 {
                give_back(store, key, e, now_ms);
            }
        }
        self.entries.retain(|_, e| e.external || e.lease.returned_pending > 0);
    }

    /// Starts a draw on the external lender at `key` (fleet mode), for a request its
    /// lease could not serve: gives up what the worker holds and sizes the new lease
    /// exactly as [`Self::take`] does (this worker's recent demand, at most
    /// [`hold_cap`]). `None`: no lease for these limits (a `hold_cap` of 0 and nothing
    /// to settle, or no room): the lender decides the request alone.
    pub fn begin_draw(
        &mut self,
        key: &str,
        buckets: &[NamedBucket],
        quotas: &[NamedQuota],
        now_ms: u64,
    ) -> Option<Draw> {
        let cap = hold_cap(buckets, quotas);
        if !self.entries.contains_key(key) && (cap == 0 || !self.make_room()) {
            return None;
        }
        let e = self.entry(key, buckets, quotas, now_ms, true);
        let want = e.want(now_ms, cap);
        let ask = e.lease.release(now_ms);
        Some(Draw {
            ask,
            spent: ask.spent_total.saturating_sub(e.lease.reported_total),
            want,
        })
    }

    /// Applies the lender's answer to `draw` (`None`: its CAS failed; what the worker
    /// gave up and spent stays to settle with the next draw or sweep).
    pub fn end_draw(
        &mut self,
        key: &str,
        draw: &Draw,
        drawn: Option<Drawn>,
        buckets: &[NamedBucket],
        quotas: &[NamedQuota],
        cost: u64,
    ) {
        let now_ms = draw.ask.sent_at_ms;
        let Some(e) = self.entries.get_mut(key) else { return };
        let Some(d) = drawn else {
            e.lease.on_failure();
            return;
        };
        e.lease.on_grant(&draw.ask, d.granted, d.valid_ms);
        if !d.admitted {
            return;
        }
        e.taken_at_ms = now_ms;
        e.spent = cost;
        if e.buckets != buckets || e.quotas != quotas {
            e.buckets = buckets.to_vec();
            e.quotas = quotas.to_vec();
        }
        e.set_views(&d.views);
    }

    /// Leases on external lenders that must be settled now (fleet mode, every
    /// [`SWEEP_MS`]): expired units to give back, or spend to report once nothing valid
    /// is held; with `all` (unload) everything held. Each comes with its [`Draw`] (want
    /// 0); the caller settles it into the lender and reports with
    /// [`Self::settled`]. Forgets settled subjects idle for [`FORGET_MS`].
    pub fn settlements_due(&mut self, now_ms: u64, all: bool) -> Vec<(String, Draw)> {
        self.entries.retain(|_, e| !(e.external && idle(e, now_ms)));
        let mut due = Vec::new();
        for (key, e) in self.entries.iter_mut().filter(|(_, e)| e.external) {
            e.lease.expire(now_ms);
            let unreported = e.lease.spent_total.saturating_sub(e.lease.reported_total);
            let holding = e.lease.available > 0;
            if (all && holding) || (!holding && (e.lease.returned_pending > 0 || unreported > 0)) {
                let ask = e.lease.release(now_ms);
                due.push((
                    key.clone(),
                    Draw {
                        ask,
                        spent: unreported,
                        want: 0,
                    },
                ));
            }
        }
        due
    }

    /// The outcome of settling `draw` (from [`Self::settlements_due`]).
    pub fn settled(&mut self, key: &str, draw: &Draw, ok: bool) {
        if let Some(e) = self.entries.get_mut(key) {
            if ok {
                e.lease.on_grant(&draw.ask, 0, 0);
            } else {
                e.lease.on_failure();
            }
        }
    }

    /// Requests served from leases on external lenders since the last call.
    pub fn take_served(&mut self) -> u64 {
        std::mem::take(&mut self.external_served)
    }

    /// Units this worker holds for `key` (tests, status).
    pub fn held(&self, key: &str) -> u64 {
        self.entries.get(key).map_or(0, |e| e.lease.available)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether a new subject may be tracked: at capacity, idle subjects are forgotten
    /// first; subjects holding units are never dropped (their units would be lost).
    fn make_room(&mut self) -> bool {
        if self.entries.len() < CAPACITY {
            return true;
        }
        self.entries.retain(|_, e| {
            e.lease.available > 0
                || e.lease.returned_pending > 0
                || (e.external && e.lease.spent_total != e.lease.reported_total)
        });
        self.entries.len() < CAPACITY
    }
}

impl Entry {
    /// Keeps the views of the last draw or CAS, re-rendering the policy only when the
    /// limits' names, quotas or windows changed.
    fn set_views(&mut self, views: &[LimitView]) {
        if self.views.len() != views.len()
            || self
                .views
                .iter()
                .zip(views)
                .any(|(a, b)| (&a.name, a.quota, a.window_secs) != (&b.name, b.quota, b.window_secs))
        {
            self.policy = limiter::policy_field(views);
        }
        self.views.clear();
        self.views.extend_from_slice(views);
    }
}

/// Holds nothing, owes nothing (an external lender also waits for the spend to be
/// reported), took nothing for [`FORGET_MS`].
fn idle(e: &Entry, now_ms: u64) -> bool {
    e.lease.available == 0
        && e.lease.returned_pending == 0
        && (!e.external || e.lease.spent_total == e.lease.reported_total)
        && now_ms.saturating_sub(e.taken_at_ms) >= FORGET_MS
}

/// One CAS giving back everything `e` holds or let expire, into the limits it was taken
/// under. On failure it stays pending for the next try.
fn give_back(store: &dyn Store, key: &str, e: &mut Entry, now_ms: u64) {
    let ask = e.lease.release(now_ms);
    let back = (ask.returned, e.taken_at_ms);
    let (buckets, quotas) = (&e.buckets, &e.quotas);
    let r = cas_update(store, key, CAS_RETRIES, Create::ViaLock { now_ms }, |bytes| {
        let state = bytes.map(LimitState::decode).unwrap_or_default();
        match limiter::lease_take(buckets, quotas, &state, now_ms, 0, 0, back, share()).write {
            Some(next) => Step::Write(next.encode(), ()),
            None => Step::Keep(()),
        }
    });
    match r {
        Ok(()) => e.lease.on_grant(&ask, 0, 0),
        Err(_) => e.lease.on_failure(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::limits::limiter::{evaluate, Denial};
    use crate::core::limits::quota::Period;
    use crate::core::limits::test_support::bucket;
    use crate::core::store::MemStore;
    use std::cell::Cell;

    const K: &str = "km/rl/k/x";
    /// 2024-03-10T12:00:00Z
    const T0: u64 = 1_710_072_000_000;

    fn quota(period: Period, limit: u64) -> Vec<NamedQuota> {
        vec![NamedQuota {
            name: "q".into(),
            period,
            limit,
        }]
    }

    /// What each limit has left in the shared state (nobody's lease counted).
    fn shared(store: &MemStore, b: &[NamedBucket], q: &[NamedQuota], now: u64) -> Vec<u64> {
        let st = store.get(K).0.map(|v| LimitState::decode(&v)).unwrap_or_default();
        evaluate(b, q, &st, now, 0)
            .0
            .views
            .iter()
            .map(|v| v.remaining)
            .collect()
    }

    fn allowed(o: &LimitOutcome) -> bool {
        matches!(o, LimitOutcome::Allowed(_))
    }

    /// A request on one worker, as `decide` makes it: the lease, else one CAS.
    fn request(w: &mut WorkerLeases, s: &MemStore, b: &[NamedBucket], q: &[NamedQuota], now: u64, cost: u64) -> bool {
        if w.spend(K, b, q, now, cost).is_some() {
            return true;
        }
        allowed(&w.take(s, K, b, q, now, cost))
    }

    #[test]
    fn hold_cap_is_ten_ms_of_rate_a_sixteenth_of_burst_and_quota() {
        assert_eq!(share(), 16);
        assert_eq!(hold_cap(&bucket(200, 1000, 50), &[]), 2, "the bench's accuracy plan");
        assert_eq!(hold_cap(&bucket(1000, 1000, 100), &[]), 6);
        assert_eq!(hold_cap(&bucket(100_000_000, 1000, 100_000_000), &[]), MAX_HOLD);
        assert_eq!(
            hold_cap(&bucket(6_000, 60_000, 6_000), &[]),
            1,
            "100/s written per minute"
        );
        assert_eq!(hold_cap(&[], &quota(Period::Month, 1_000_000)), MAX_HOLD);
        assert_eq!(hold_cap(&[], &quota(Period::Day, 100)), 6);
        // Single-token plans: no lease.
        assert_eq!(hold_cap(&bucket(1, 3_600_000, 25), &[]), 0);
        assert_eq!(hold_cap(&bucket(1_000, 1000, 1), &[]), 0, "burst 1");
        assert_eq!(hold_cap(&bucket(99, 1000, 1_000), &[]), 0, "under 100/s");
        assert_eq!(hold_cap(&[], &quota(Period::Day, 15)), 0);
        assert_eq!(
            hold_cap(&bucket(1000, 1000, 1000), &quota(Period::Day, 3)),
            0,
            "the smallest limit rules"
        );
        assert_eq!(hold_cap(&bucket(u64::MAX, 1, u64::MAX), &[]), MAX_HOLD);
    }

    #[test]
    fn validity_stops_at_the_end_of_every_quota_period() {
        assert_eq!(valid_ms(&[], T0), LEASE_MS);
        assert_eq!(valid_ms(&quota(Period::Day, 1000), T0), LEASE_MS);
        let midnight = T0 + 12 * 3_600_000;
        assert_eq!(valid_ms(&quota(Period::Day, 1000), midnight - 20), 20);
        assert_eq!(valid_ms(&quota(Period::Day, 1000), midnight - 1), 1);
        assert_eq!(valid_ms(&quota(Period::Day, 1000), midnight), LEASE_MS);
    }

    /// A single-token plan is decided exactly as without leases: one CAS per request,
    /// nothing tracked, nothing held.
    #[test]
    fn single_token_plans_stay_exact() {
        let s = MemStore::default();
        let mut w = WorkerLeases::default();
        let b = bucket(1, 3_600_000, 3);
        let got: Vec<bool> = (0..5).map(|i| request(&mut w, &s, &b, &[], T0 + i, 1)).collect();
        assert_eq!(got, [true, true, true, false, false]);
        assert!(w.is_empty());
    }

    /// A busy subject: the first request takes its cost only, the next takes a lease
    /// sized by the demand seen (capped), then requests are served with no store call
    /// until the lease runs out; each CAS gives back what is left first.
    #[test]
    fn a_busy_worker_spends_from_its_lease_between_cases() {
        let s = MemStore::default();
        let sets = std::rc::Rc::new(Cell::new(0));
        let n = sets.clone();
        *s.before_set.borrow_mut() = Some(Box::new(move |_| n.set(n.get() + 1)));
        let mut w = WorkerLeases::default();
        let b = bucket(1000, 1000, 1000); // hold cap 10
        assert!(allowed(&w.take(&s, K, &b, &[], T0, 1)));
        assert_eq!(w.held(K), 0, "a subject seen once takes only its cost");
        let LimitOutcome::Allowed(check) = w.take(&s, K, &b, &[], T0, 1) else {
            panic!()
        };
        assert_eq!(w.held(K), 10);
        assert_eq!(check.views[0].remaining, 998, "the worker's units count as remaining");
        assert_eq!(shared(&s, &b, &[], T0), [988]);
        let before = sets.get();
        for i in 0..10 {
            // The views are as of the CAS (refill since then is not seen until the next).
            let served = w.spend(K, &b, &[], T0 + 2, 1).expect("from the lease");
            assert_eq!((served.views[0].remaining, served.held), (988, 9 - i));
            assert_eq!(
                served.headers().unwrap(),
                ("\"b\";q=1000;w=1".to_string(), format!("\"b\";r={};t=0", 997 - i))
            );
        }
        assert_eq!(sets.get(), before, "no store write while the lease serves");
        assert!(w.spend(K, &b, &[], T0 + 2, 1).is_none(), "empty");
        assert!(allowed(&w.take(&s, K, &b, &[], T0 + 2, 1)));
        assert_eq!(sets.get(), before + 1);
        // A lease from another plan's limits is not spent; the next CAS takes one under
        // the new limits, and its RateLimit-Policy says so.
        let b2 = bucket(2000, 1000, 2000);
        assert!(w.spend(K, &b2, &[], T0 + 2, 1).is_none());
        w.take(&s, K, &b2, &[], T0 + 2, 1);
        let served = w.spend(K, &b2, &[], T0 + 2, 1).expect("a lease under the new limits");
        assert_eq!(served.headers().unwrap().0, "\"b\";q=2000;w=1");
    }

    #[test]
    fn route_costs_are_spent_whole_from_the_lease_or_decided_by_cas() {
        let s = MemStore::default();
        let mut w = WorkerLeases::default();
        let b = bucket(1000, 1000, 1000);
        // All at one instant: no refill blurs the count.
        w.take(&s, K, &b, &[], T0, 7);
        w.take(&s, K, &b, &[], T0, 7);
        assert_eq!(w.held(K), 10);
        assert!(w.spend(K, &b, &[], T0, 7).is_some());
        assert!(w.spend(K, &b, &[], T0, 7).is_none(), "3 held < 7: a CAS decides");
        assert!(allowed(&w.take(&s, K, &b, &[], T0, 7)));
        // 4 × 7 spent, 10 held: the shared bucket lost exactly that.
        assert_eq!(shared(&s, &b, &[], T0)[0], 1000 - 28 - w.held(K));
        // A cost beyond the burst is refused as before, not served from a lease.
        let LimitOutcome::Denied(c) = w.take(&s, K, &b, &[], T0, 1001) else {
            panic!()
        };
        assert_eq!(c.denial, Some(Denial::CostExceedsBurst));
    }

    #[test]
    fn expired_units_go_back_at_the_next_cas_or_the_sweep() {
        let s = MemStore::default();
        let mut w = WorkerLeases::default();
        let b = bucket(1000, 3_600_000, 1000); // slow refill: what is back is visible
        let b_cap = bucket(100_000, 1000, 1000);
        // (Use a plan that leases: 10 ms of 100k/s is 1000, burst/16 = 62; the demand
        // seen, 1 unit in 1 ms, is 50 units per lease.)
        w.take(&s, K, &b_cap, &[], T0, 1);
        w.take(&s, K, &b_cap, &[], T0 + 1, 1);
        assert_eq!(w.held(K), 50);
        assert!(
            w.spend(K, &b_cap, &[], T0 + LEASE_MS, 1).is_some(),
            "valid LEASE_MS from its CAS"
        );
        assert!(w.spend(K, &b_cap, &[], T0 + 1 + LEASE_MS, 1).is_none(), "void after");
        // Not given back yet; the sweep does it (the bucket refilled meanwhile: it is
        // full again and the return cannot make it fuller).
        w.sweep(&s, T0 + 1 + LEASE_MS);
        assert_eq!(w.held(K), 0);
        assert_eq!(shared(&s, &b_cap, &[], T0 + 1 + LEASE_MS), [1000]);
        let s = MemStore::default();
        let mut w = WorkerLeases::default();
        let q = quota(Period::Day, 10_000);
        w.take(&s, K, &b, &q, T0, 1);
        assert_eq!(hold_cap(&b, &q), 0, "1000/h: 10 ms of it is 0");
        assert!(w.is_empty());
        w.take(&s, K, &[], &q, T0, 1);
        w.take(&s, K, &[], &q, T0 + 1, 1);
        let held = w.held(K);
        assert!(held > 0);
        assert_eq!(shared(&s, &[], &q, T0 + 1), [10_000 - 3 - held]);
        // Expired: the next CAS of this worker gives it back before it decides.
        assert!(w.spend(K, &[], &q, T0 + 1 + LEASE_MS, 1).is_none());
        w.take(&s, K, &[], &q, T0 + 1 + LEASE_MS + 900, 1);
        assert_eq!(w.held(K), 0, "a long pause means no demand: no new lease");
        assert_eq!(shared(&s, &[], &q, T0 + 2_000), [10_000 - 4]);
        // Idle subjects are forgotten by the sweep.
        w.sweep(&s, T0 + 1 + LEASE_MS + 900 + FORGET_MS);
        assert!(w.is_empty());
    }

    /// Quota units are spent in the period they were counted in: a lease never outlives
    /// the period, and units that expire with it are not credited to the next one.
    #[test]
    fn quota_units_never_cross_a_period_boundary() {
        let s = MemStore::default();
        let mut w = WorkerLeases::default();
        let q = quota(Period::Day, 100_000);
        let midnight = T0 + 12 * 3_600_000;
        w.take(&s, K, &[], &q, midnight - 30, 1);
        w.take(&s, K, &[], &q, midnight - 29, 1);
        assert!(w.held(K) > 0);
        assert!(w.spend(K, &[], &q, midnight - 1, 1).is_some());
        assert!(w.spend(K, &[], &q, midnight, 1).is_none(), "void at midnight");
        assert!(allowed(&w.take(&s, K, &[], &q, midnight, 1)));
        // The new day counts only what was spent in it: the CAS request itself (its
        // lease is not spent yet), nothing carried over or credited.
        assert_eq!(shared(&s, &[], &q, midnight)[0] + w.held(K), 100_000 - 1);
    }

    /// Workers busy across midnight: each day admits at most its limit, and once the
    /// leases are back the new day's count is exactly what was admitted in it (units
    /// leased yesterday are neither spent today nor credited to today).
    #[test]
    fn busy_workers_across_a_period_boundary_count_each_day_exactly() {
        let s = MemStore::default();
        let mut ws: Vec<WorkerLeases> = (0..3).map(|_| WorkerLeases::default()).collect();
        let q = quota(Period::Day, 100_000);
        let midnight = T0 + 12 * 3_600_000;
        let (mut day1, mut day2) = (0u64, 0u64);
        let mut rng = 0x1234_5678_9abc_def1u64;
        let mut now = midnight - 500;
        while now < midnight + 500 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            now += rng % 2;
            let w = &mut ws[(rng % 3) as usize];
            if request(w, &s, &[], &q, now, 1) {
                if now < midnight {
                    day1 += 1;
                } else {
                    day2 += 1;
                }
            }
        }
        assert!(day1 > 100 && day2 > 100, "{day1} {day2}");
        for w in &mut ws {
            w.release_all(&s, now);
        }
        assert_eq!(
            shared(&s, &[], &q, now),
            [100_000 - day2],
            "today counts today's admissions only"
        );
    }

    /// A quota's last `share` units are never leased: at its end every request is one
    /// exact CAS. And what any worker holds is given back on release.
    #[test]
    fn a_quota_is_never_exceeded_and_is_exact_once_leases_are_back() {
        for workers in [1usize, 2, 4] {
            let s = MemStore::default();
            let mut ws: Vec<WorkerLeases> = (0..workers).map(|_| WorkerLeases::default()).collect();
            let q = quota(Period::Month, 5_000);
            let mut admitted = 0u64;
            let mut rng = 0x9e37_79b9_7f4a_7c15u64;
            for step in 0..20_000u64 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let w = &mut ws[(rng % workers as u64) as usize];
                let cost = 1 + (rng >> 20) % 3;
                if request(w, &s, &[], &q, T0 + step / 4, cost) {
                    admitted += cost;
                }
                let held: u64 = ws.iter().map(|w| w.held(K)).sum();
                assert_eq!(
                    shared(&s, &[], &q, T0)[0] + held + admitted,
                    5_000,
                    "units are conserved"
                );
            }
            assert!(admitted <= 5_000);
            assert!(
                admitted >= 5_000 - 2,
                "{workers}: {admitted} (cost up to 3 may not fit)"
            );
            for w in &mut ws {
                w.release_all(&s, T0 + 20_000);
            }
            assert_eq!(
                shared(&s, &[], &q, T0)[0],
                5_000 - admitted,
                "used equals what was admitted"
            );
        }
    }

    /// Requests of cost 1 on `workers` workers sharing one bucket, at random times and
    /// workers, for 3 s; `demand(now_ms)` is the request rate in multiples of the limit's
    /// rate. Returns the admission times (ms from T0) and how many came from a lease.
    fn simulate(workers: u64, b: &[NamedBucket], demand: impl Fn(u64) -> u64) -> (Vec<u64>, u64) {
        let s = MemStore::default();
        let mut ws: Vec<WorkerLeases> = (0..workers).map(|_| WorkerLeases::default()).collect();
        let (mut times, mut from_lease) = (Vec::new(), 0u64);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut now_us = 0u64;
        let rate = b[0].limit.rate;
        while now_us < 3_000_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Mean gap: 1 / (demand × rate).
            let mean_us = 1_000_000 / (rate * demand(now_us / 1000)).max(1);
            now_us += 1 + rng % (2 * mean_us + 1);
            let now = T0 + now_us / 1000;
            let w = &mut ws[((rng >> 32) % workers) as usize];
            if w.spend(K, b, &[], now, 1).is_some() {
                from_lease += 1;
                times.push(now - T0);
            } else if allowed(&w.take(&s, K, b, &[], now, 1)) {
                times.push(now - T0);
            }
            if (rng >> 40).is_multiple_of(64) {
                w.sweep(&s, now);
            }
        }
        (times, from_lease)
    }

    /// Most admissions in any window of `window` ms.
    fn most_in_window(times: &[u64], window: u64) -> u64 {
        let (mut j, mut most) = (0, 0);
        for i in 0..times.len() {
            while j < times.len() && times[j] < times[i] + window {
                j += 1;
            }
            most = most.max(j - i);
        }
        most as u64
    }

    /// The documented skew: in any window T, W workers admit at most `burst + rate × T +
    /// W × hold_cap` of a bucket (the clock is in whole ms: admissions in `[t, t + T)`
    /// see at most T ms of refill). Demand alternates between under and over the rate
    /// every 250 ms, so leases fill up in the quiet phases and are spent into the busy
    /// ones: the worst case for the skew.
    #[test]
    fn rate_skew_stays_within_the_documented_bound() {
        for (workers, rate, burst) in [
            (2u64, 1_000u64, 100u64),
            (2, 200, 50),
            (4, 5_000, 800),
            (8, 20_000, 320),
        ] {
            let b = bucket(rate, 1000, burst);
            let cap = hold_cap(&b, &[]);
            assert!(cap >= 2, "{rate}/{burst}: the plan leases");
            let (times, from_lease) = simulate(workers, &b, |ms| if ms / 250 % 2 == 0 { 1 } else { 4 });
            for window in [1u64, 10, 50, 100, 250, 1_000, 3_000] {
                let max = bounds::rate_admitted_max(rate, 1000, burst, window, workers, cap);
                let most = most_in_window(&times, window);
                assert!(most <= max, "{workers}w {rate}/s: {most} in {window} ms > {max}");
            }
            assert!(
                from_lease * 5 > times.len() as u64,
                "{workers}w {rate}/s: leases used: {from_lease} of {}",
                times.len()
            );
        }
    }

    /// Under-admission: with demand above the rate throughout, nothing is lost for good:
    /// over the run the workers admit at least `burst + rate × T - W × hold_cap` (what
    /// the leases may hold at the end). At a saturated limit the bucket has no spare
    /// tokens to lease, so almost every admission is a CAS, as without leases.
    #[test]
    fn a_saturated_bucket_is_admitted_in_full() {
        for (workers, rate, burst) in [(2u64, 1_000u64, 100u64), (2, 200, 50), (4, 5_000, 800)] {
            let b = bucket(rate, 1000, burst);
            let cap = hold_cap(&b, &[]);
            let (times, _) = simulate(workers, &b, |_| 4);
            let span = *times.last().unwrap();
            let max = bounds::rate_admitted_max(rate, 1000, burst, span + 1, workers, cap);
            let floor = burst + rate * span / 1000 - workers * cap;
            let n = times.len() as u64;
            assert!(
                n + 1 >= floor && n <= max,
                "{workers}w {rate}/s: {n} not in [{floor}, {max}]"
            );
        }
    }

    #[test]
    fn contention_keeps_what_was_held_for_the_next_cas() {
        let s = MemStore::default();
        let mut w = WorkerLeases::default();
        let fast = bucket(100_000, 1000, 1000);
        w.take(&s, K, &fast, &[], T0, 1);
        w.take(&s, K, &fast, &[], T0, 2);
        // Demand 1 unit in (at least) 1 ms: 50 units; 62 is the cap.
        assert_eq!(w.held(K), 50);
        *s.fail_set.borrow_mut() = Some(Box::new(|_| Some(crate::core::store::StoreError::CasMismatch)));
        assert_eq!(w.take(&s, K, &fast, &[], T0, 1000), LimitOutcome::Contended);
        assert_eq!(w.held(K), 0);
        *s.fail_set.borrow_mut() = None;
        // The next CAS returns the 50 before deciding: a request of the whole burst
        // minus the 3 spent fits (no refill: same instant).
        assert!(allowed(&w.take(&s, K, &fast, &[], T0, 997)));
    }

    #[test]
    fn release_all_gives_every_unit_back() {
        let s = MemStore::default();
        let mut w = WorkerLeases::default();
        let q = quota(Period::Month, 1_000_000);
        w.take(&s, K, &[], &q, T0, 1);
        w.take(&s, K, &[], &q, T0 + 1, 1);
        assert!(w.held(K) > 0);
        w.release_all(&s, T0 + 2);
        assert_eq!(w.held(K), 0);
        assert_eq!(shared(&s, &[], &q, T0 + 2), [1_000_000 - 2]);
        assert!(w.is_empty());
    }

    /// Tracked subjects are bounded: beyond CAPACITY new subjects are decided by the exact
    /// CAS (never dropping units a worker holds), and idle ones make room.
    #[test]
    fn the_lease_table_is_bounded_without_dropping_held_units() {
        let s = MemStore::default();
        let mut w = WorkerLeases::default();
        let q = quota(Period::Month, 1_000_000);
        let key = |i: usize| format!("km/rl/k/s{i}");
        for i in 0..CAPACITY {
            w.take(&s, &key(i), &[], &q, T0, 1);
            w.take(&s, &key(i), &[], &q, T0, 1);
        }
        assert_eq!(w.len(), CAPACITY);
        assert!((0..CAPACITY).all(|i| w.held(&key(i)) > 0));
        // Full of subjects holding units: a new one is still decided, exactly, untracked.
        assert!(allowed(&w.take(&s, "km/rl/k/new", &[], &q, T0, 1)));
        assert_eq!(w.len(), CAPACITY);
        assert_eq!(w.held("km/rl/k/new"), 0);
        // Once the leases expired and went back, idle subjects make room.
        w.sweep(&s, T0 + LEASE_MS);
        assert!(allowed(&w.take(&s, "km/rl/k/new", &[], &q, T0 + LEASE_MS, 1)));
        assert_eq!(w.len(), 1);
        let st = LimitState::decode(&s.get(&key(0)).0.unwrap());
        let left = evaluate(&[], &q, &st, T0, 0).0.views[0].remaining;
        assert_eq!(left, 1_000_000 - 2, "the sweep gave the held units back");
    }

    #[test]
    fn bounds_formula() {
        // 200/s, burst 50, 10 s, 2 workers holding 2: 50 + 2000 + 4.
        assert_eq!(bounds::rate_admitted_max(200, 1000, 50, 10_000, 2, 2), 2_054);
        assert_eq!(
            bounds::rate_admitted_max(u64::MAX, 1, u64::MAX, u64::MAX, u64::MAX, u64::MAX),
            u64::MAX
        );
    }

    /// A lease on an external lender (fleet mode) is the fleet node's to settle: the
    /// single-node sweep and unload never write it into shared data as a limit state,
    /// and it is kept until its spend has been reported.
    #[test]
    fn leases_on_external_lenders_are_settled_only_through_their_lender() {
        let s = MemStore::default();
        let b = bucket(1_000, 1_000, 1_000);
        let key = "km/fl/k:x";
        let mut w = WorkerLeases::default();
        let d = w.begin_draw(key, &b, &[], T0).unwrap();
        assert_eq!((d.want, d.spent), (0, 0), "no demand seen yet");
        let drawn = |granted| Drawn {
            granted,
            valid_ms: LEASE_MS,
            admitted: true,
            views: vec![],
        };
        w.end_draw(key, &d, Some(drawn(0)), &b, &[], 1);
        let d = w.begin_draw(key, &b, &[], T0 + 1).unwrap();
        assert_eq!(d.want, 10, "hold_cap");
        w.end_draw(key, &d, Some(drawn(8)), &b, &[], 1);
        assert!(w.spend(key, &b, &[], T0 + 2, 3).is_some());
        assert_eq!((w.held(key), w.take_served(), w.take_served()), (5, 1, 0));
        w.sweep(&s, T0 + 1_000);
        w.release_all(&s, T0 + 1_000);
        assert_eq!(s.len(), 0, "nothing written as a limit state");
        assert_eq!(w.held(key), 5);
        // Due once expired (or at unload); a failed settlement is offered again.
        assert!(w.settlements_due(T0 + 2, false).is_empty());
        let due = w.settlements_due(T0 + 3, true);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].1.spent, due[0].1.ask.returned), (3, 5));
        w.settled(key, &due[0].1, false);
        let due = w.settlements_due(T0 + 2_000, false);
        assert_eq!((due[0].1.spent, due[0].1.ask.returned), (3, 5));
        w.settled(key, &due[0].1, true);
        assert!(w.settlements_due(T0 + 2_001, false).is_empty());
        assert!(w.is_empty(), "settled and idle: forgotten");
    }
}
