//! Fleet mode, one level down: a worker's lease drawn from its node's lease.
//!
//! The node holds units of a subject leased from the fleet (`core::limits::fleet`, in
//! `km/fl/<subject>`); without this, every request reads and CAS-writes that entry. Here
//! a worker draws a few of the node's units in the same CAS that decides its request
//! ([`decide_drawing`]) and spends them for the following requests of the subject with
//! no host call at all (`core::limits::worker_lease::WorkerLeases::spend`, the very
//! type single-node mode uses against the shared limit state: one lease design with two
//! parents). The node's side is [`Lease::lend`] / [`Lease::settle_child`] plus a small
//! record per worker ([`Loan`]).
//!
//! # Accounting (what the fleet sees stays exact)
//!
//! * **Lent, not spent.** A unit lent to a worker stays in the node's lease as `lent`:
//!   it is part of the `hold` the node declares to the fleet, not of its `spent_total`.
//!   The worker reports what it really spent when it settles (its next draw, or within
//!   [`worker_lease::SWEEP_MS`] of its units' expiry, or at unload) and gives the rest
//!   back: only then does the spend enter `spent_total`, so what the node reports (and
//!   replays after an outage, with its sequence numbers) is what requests admitted,
//!   never units merely lent.
//! * **Within R.** The node never has more than R units spent without the fleet's
//!   acknowledgement, whatever its workers do: its own unreported spend plus every unit
//!   on loan (all of which a worker might have spent) stays ≤ R (`fleet::decide` counts
//!   loans in its R test; [`lend`] lends only up to half of R, where the node reports).
//!   So "min(R, held)
//!   presumed spent" when a killed node's lease expires still covers everything it
//!   admitted.
//! * **Small, and off at the cap.** A worker asks for what it spent in the last
//!   [`worker_lease::LEASE_MS`] (0 for a subject seen now and then), at most
//!   [`worker_lease::hold_cap`] (10 ms of rate, 1/16 of burst and quota, 1024), and gets
//!   at most 1/16 of what the node holds (`lease::chunk_cap` with
//!   [`worker_lease::share`]), and nothing while the node holds fewer than 16 units:
//!   when the node's chunks shrink to 1 near a quota's end, every request is decided
//!   by the node, exactly.
//! * **Short-lived.** Lent units are valid [`worker_lease::LEASE_MS`], never past the
//!   node's own units nor a quota period's end, so the fleet's rate bound is unchanged
//!   (a worker's units are a part of the node's, spent no later). Units given back after
//!   the node's lease expired go up to the fleet (`returned`), not back into the lease.
//! * **Lost workers.** A loan not settled [`ORPHAN_MS`] after its expiry (its worker's
//!   VM was replaced after a crash) is presumed spent: counted in `spent_total`, never
//!   returned (over-count ≤ one worker's loan; never over-admission). A loan whose
//!   units the fleet reclaimed (`hold_void`) is void: what its worker spent is still
//!   reported, what it gives back is dropped (the fleet already has it).

use super::fleet::{self, FleetConfig, FleetEntry, Step, Via};
use super::lease;
use super::plan::{NamedBucket, NamedQuota};
use super::worker_lease::{self, Draw};
use serde::{Deserialize, Serialize};

/// A loan not settled this long after its expiry is presumed spent (its worker is
/// gone: a live worker settles within `SWEEP_MS` plus a tick).
pub const ORPHAN_MS: u64 = 1_000;

/// Units of the node's lease lent to one worker (by its id in the node, `w<n>`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loan {
    pub worker: u32,
    pub units: u64,
    /// The worker's units are void from this instant on.
    pub until_ms: u64,
    /// The fleet reclaimed the node's lease after these units were lent: they are no
    /// longer in the node's `lent` (nor its `hold`); spend on them is still reported.
    pub void: bool,
}

/// What a draw got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Grant {
    pub granted: u64,
    /// From the draw's instant.
    pub valid_ms: u64,
}

/// Every unit on loan, void or not: all of it may have been spent unreported.
pub fn on_loan(entry: &FleetEntry) -> u64 {
    entry.loans.iter().map(|l| l.units).sum()
}

/// Settles `worker`'s loan: `spent` of its units were spent, `back` come back. The loan
/// is closed (a worker settles everything it holds); units it does not account for are
/// presumed spent. Without a loan (presumed spent already) nothing changes.
pub fn settle(entry: &mut FleetEntry, worker: u32, spent: u64, back: u64, now_ms: u64) {
    let Some(i) = entry.loans.iter().position(|l| l.worker == worker) else {
        return;
    };
    let loan = entry.loans.swap_remove(i);
    let spent = spent.min(loan.units);
    let back = back.min(loan.units - spent);
    let unaccounted = loan.units - spent - back;
    if loan.void {
        entry.lease.spent_total = entry.lease.spent_total.saturating_add(spent + unaccounted);
    } else {
        entry.lease.settle_child(spent + unaccounted, back, now_ms);
    }
}

/// Presumes spent the loans of workers that did not settle within [`ORPHAN_MS`] of
/// their expiry.
pub fn reclaim_orphans(entry: &mut FleetEntry, now_ms: u64) {
    while let Some(i) = entry
        .loans
        .iter()
        .position(|l| now_ms >= l.until_ms.saturating_add(ORPHAN_MS))
    {
        let loan = entry.loans.swap_remove(i);
        if loan.void {
            entry.lease.spent_total = entry.lease.spent_total.saturating_add(loan.units);
        } else {
            entry.lease.settle_child(loan.units, 0, now_ms);
        }
    }
}

/// The fleet reclaimed the node's lease (`hold_void`): the loans' units are not the
/// node's any more.
pub fn void_all(entry: &mut FleetEntry) {
    for l in entry.loans.iter_mut().filter(|l| !l.void) {
        entry.lease.lent = entry.lease.lent.saturating_sub(l.units);
        l.void = true;
    }
}

/// Lends `worker` up to `want` units of the node's valid lease: at most 1/16 of what the
/// node holds, none while it holds fewer than 16 (exact at the cap), with its unreported
/// spend and every loan at most half of R, valid [`worker_lease::LEASE_MS`] at most and never past the node's units or a
/// quota period.
pub fn lend(
    entry: &mut FleetEntry,
    worker: u32,
    want: u64,
    quotas: &[NamedQuota],
    cfg: &FleetConfig,
    now_ms: u64,
) -> Grant {
    let share = worker_lease::share();
    entry.lease.expire(now_ms);
    if want == 0 || entry.lease.available < share {
        return Grant::default();
    }
    // Loans and unreported spend together stay within half of R (where the node reports),
    // so the node's own requests keep the other half and are not sent to take calls by
    // units its workers hold.
    let room = cfg.unreported_max(quotas).map_or(u64::MAX, |r| {
        lease::bounds::report_at(r).saturating_sub(entry.lease.unreported().saturating_add(on_loan(entry)))
    });
    let want = want.min(room).min(lease::chunk_cap(entry.lease.available, share));
    if want == 0 {
        return Grant::default();
    }
    let valid_ms = entry
        .lease
        .expires_at_ms
        .saturating_sub(now_ms)
        .min(worker_lease::valid_ms(quotas, now_ms));
    if valid_ms == 0 {
        return Grant::default();
    }
    let (granted, _) = entry.lease.lend(want, share, now_ms);
    let until_ms = now_ms.saturating_add(valid_ms);
    match entry.loans.iter_mut().find(|l| l.worker == worker && !l.void) {
        Some(l) => {
            l.units += granted;
            l.until_ms = l.until_ms.max(until_ms);
        }
        None => entry.loans.push(Loan {
            worker,
            units: granted,
            until_ms,
            void: false,
        }),
    }
    Grant { granted, valid_ms }
}

/// The node's side of a request its worker's lease could not serve, in one CAS of the
/// node's entry: settles the worker's previous loan (`draw`), decides the request
/// (`fleet::decide`) and, if the node's lease admitted it, lends the worker what it
/// asked for.
#[allow(clippy::too_many_arguments)]
pub fn decide_drawing(
    entry: &mut FleetEntry,
    worker: u32,
    draw: Option<&Draw>,
    buckets: &[NamedBucket],
    quotas: &[NamedQuota],
    cfg: &FleetConfig,
    now_ms: u64,
    cost: u64,
    connected: bool,
) -> (Step, Grant) {
    if let Some(d) = draw {
        settle(entry, worker, d.spent, d.ask.returned, now_ms);
    }
    let step = fleet::decide(entry, buckets, quotas, cfg, now_ms, cost, connected);
    let grant = match (&step, draw) {
        (Step::Decided(v), Some(d)) if v.denial.is_none() && v.via == Via::Lease => {
            lend(entry, worker, d.want, quotas, cfg, now_ms)
        }
        _ => Grant::default(),
    };
    (step, grant)
}

/// Accuracy bounds of the worker level, as documented in the README and checked by the
/// tests (on top of the node level's, `lease::bounds`, which stay as they are).
pub mod bounds {
    /// Most units of a subject parked in the worker leases of one node (`workers`
    /// workers, each holding at most `hold_cap`): requests on another worker of that node
    /// may be decided by the node (or a take) while these sit unspent, for at most
    /// `LEASE_MS + SWEEP_MS`. They are a part of the node's lease: the fleet-wide
    /// under-admission bound (`lease::bounds::outstanding_max`) already counts them.
    pub fn parked_max(workers: u64, hold_cap: u64) -> u64 {
        workers.saturating_mul(hold_cap)
    }

    /// Most consumption over-counted for a worker lost without settling (its VM
    /// replaced): its whole loan, at most `hold_cap`, is presumed spent.
    pub fn lost_worker_overcount_max(hold_cap: u64) -> u64 {
        hold_cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::limits::fleet::{apply_lease, apply_take, begin_lease, FleetDoc, Subject};
    use crate::core::limits::lease::bounds as node_bounds;
    use crate::core::limits::test_support::{bucket, monthly};
    use crate::core::limits::worker_lease::{hold_cap, Drawn, WorkerLeases, LEASE_MS, SWEEP_MS};
    use crate::core::remote::fleet_protocol::{BucketView, LeaseResponse, QuotaView, TakeResponse};

    const KEY: &str = "km/fl/k:a";
    /// 2024-03-10T12:00:00Z: far from a period's end.
    const T0: u64 = 1_710_072_000_000;

    fn cfg(extra: &str) -> FleetConfig {
        let doc: FleetDoc = serde_json::from_str(&format!(r#"{{"cluster":"limitd","fleet_size":3{extra}}}"#)).unwrap();
        doc.validate().unwrap()
    }

    /// A node entry holding `units` valid for `valid_ms` from `now`.
    fn holding(units: u64, now: u64, valid_ms: u64) -> FleetEntry {
        let mut e = FleetEntry::default();
        e.lease.available = units;
        e.lease.expires_at_ms = now + valid_ms;
        e.lease.last_grant = units;
        e
    }

    /// One request on worker `id`, as the filter makes it: the worker's lease
    /// (`core::request`), else one CAS of the node entry (`adapter::fleet`).
    #[allow(clippy::too_many_arguments)]
    fn request(
        node: &mut FleetEntry,
        w: &mut WorkerLeases,
        id: u32,
        b: &[NamedBucket],
        q: &[NamedQuota],
        c: &FleetConfig,
        now: u64,
        cost: u64,
    ) -> Result<Via, Step> {
        if w.spend(KEY, b, q, now, cost).is_some() {
            return Ok(Via::Lease);
        }
        let draw = w.begin_draw(KEY, b, q, now);
        let (step, grant) = decide_drawing(node, id, draw.as_ref(), b, q, c, now, cost, true);
        let admitted = matches!(&step, Step::Decided(v) if v.denial.is_none());
        if let Some(d) = draw {
            let drawn = Drawn {
                granted: grant.granted,
                valid_ms: grant.valid_ms,
                admitted,
                views: vec![],
            };
            w.end_draw(KEY, &d, Some(drawn), b, q, cost);
        }
        match step {
            Step::Decided(v) if v.denial.is_none() => Ok(v.via),
            s => Err(s),
        }
    }

    /// A worker's settlement tick (`adapter::fleet`, every `SWEEP_MS`).
    fn sweep(node: &mut FleetEntry, w: &mut WorkerLeases, id: u32, now: u64, all: bool) {
        for (k, d) in w.settlements_due(now, all) {
            settle(node, id, d.spent, d.ask.returned, now);
            w.settled(&k, &d, true);
        }
    }

    /// The node's lease invariants: `lent` is the non-void loans; loans plus the node's
    /// unreported spend stay within R.
    fn check(node: &FleetEntry, q: &[NamedQuota], c: &FleetConfig) {
        let live: u64 = node.loans.iter().filter(|l| !l.void).map(|l| l.units).sum();
        assert_eq!(node.lease.lent, live, "{node:?}");
        if let Some(r) = c.unreported_max(q) {
            assert!(node.lease.unreported() + on_loan(node) <= r, "R = {r}: {node:?}");
        }
    }

    #[test]
    fn a_worker_draws_a_small_share_and_lent_units_are_not_spent() {
        let c = cfg("");
        let q = monthly(100_000); // R = 1 % = 1000, reported at 500
        assert_eq!(c.unreported_max(&q), Some(1_000));
        let mut node = holding(800, T0, 30_000);
        let mut w = WorkerLeases::default();
        // First request of the subject on this worker: decided by the node, no lease
        // (nothing known of its demand).
        assert_eq!(request(&mut node, &mut w, 1, &[], &q, &c, T0, 1), Ok(Via::Lease));
        assert_eq!((w.held(KEY), node.lease.lent, node.lease.spent_total), (0, 0, 1));
        // 1 ms later: a demand of 50 per lease period; the node lends 1/16 of the 799
        // it holds after this request.
        assert_eq!(request(&mut node, &mut w, 1, &[], &q, &c, T0 + 1, 1), Ok(Via::Lease));
        assert_eq!(w.held(KEY), 49);
        assert_eq!(
            (node.lease.available, node.lease.lent, node.lease.spent_total),
            (749, 49, 2)
        );
        assert_eq!(
            node.loans,
            vec![Loan {
                worker: 1,
                units: 49,
                until_ms: T0 + 1 + LEASE_MS,
                void: false
            }]
        );
        check(&node, &q, &c);
        // Lent units stay in what the node declares it holds, not in what it spent.
        let s = Subject {
            name: "k:a",
            buckets: &[],
            quotas: &q,
        };
        let mut probe = node.clone();
        probe.lease.last_grant = 0;
        let (_, req) = begin_lease(&mut probe, "n", &s, &c, T0 + 2, true).unwrap();
        assert_eq!((req.hold, req.returned, req.spent_total), (49, 749, 2));
        // Ten requests from the worker's lease: the node's entry does not change.
        let before = node.clone();
        for _ in 0..10 {
            assert!(w.spend(KEY, &[], &q, T0 + 3, 1).is_some());
        }
        assert_eq!(node, before);
        // Not due before expiry; once expired, the worker settles: 10 spent, 39 back.
        assert!(w.settlements_due(T0 + 20, false).is_empty());
        sweep(&mut node, &mut w, 1, T0 + 1 + LEASE_MS, false);
        assert_eq!(
            (node.lease.available, node.lease.lent, node.lease.spent_total),
            (788, 0, 12)
        );
        assert!(node.loans.is_empty());
        check(&node, &q, &c);
        // Settled: nothing more to settle; forgotten once idle.
        assert!(w.settlements_due(T0 + 200, false).is_empty());
        assert_eq!(w.len(), 1);
        assert!(w.settlements_due(T0 + 2_000, false).is_empty());
        assert!(w.is_empty(), "forgotten once settled and idle");
    }

    #[test]
    fn sizes_follow_hold_cap_and_a_sixteenth_of_the_node_and_never_the_whole_lease() {
        let c = cfg("");
        // 10 ms of rate: 1000/s -> 10.
        let b = bucket(1_000, 1_000, 1_000);
        assert_eq!(hold_cap(&b, &[]), 10);
        let mut node = holding(1_000, T0, 1_000);
        let mut w = WorkerLeases::default();
        request(&mut node, &mut w, 1, &b, &[], &c, T0, 1).unwrap();
        request(&mut node, &mut w, 1, &b, &[], &c, T0 + 1, 1).unwrap();
        assert_eq!(w.held(KEY), 10, "hold_cap");
        // A node holding 40: at most 40/16 = 2 lent (a busy quota: cap 625).
        let q = monthly(10_000);
        let mut node = holding(41, T0, 30_000);
        let mut w = WorkerLeases::default();
        request(&mut node, &mut w, 1, &[], &q, &c, T0, 1).unwrap();
        request(&mut node, &mut w, 1, &[], &q, &c, T0 + 1, 1).unwrap();
        assert_eq!((w.held(KEY), node.lease.available), (2, 37));
        // Within half of R: R = 100 (1 % of 10 000), loans up to 50 with nothing unreported.
        let mut node = holding(10_000, T0, 30_000);
        let mut w = WorkerLeases::default();
        request(&mut node, &mut w, 1, &[], &q, &c, T0, 1).unwrap();
        request(&mut node, &mut w, 1, &[], &q, &c, T0 + 1, 1).unwrap();
        assert_eq!(w.held(KEY), 48, "R/2 = 50 less the 2 unreported");
        // Validity: LEASE_MS, never past the node's lease.
        let mut node = holding(1_000, T0, 30);
        let mut w = WorkerLeases::default();
        request(&mut node, &mut w, 1, &[], &q, &c, T0, 1).unwrap();
        request(&mut node, &mut w, 1, &[], &q, &c, T0 + 1, 1).unwrap();
        assert_eq!(node.loans[0].until_ms, T0 + 30);
        assert!(w.spend(KEY, &[], &q, T0 + 29, 1).is_some());
        assert!(
            w.spend(KEY, &[], &q, T0 + 30, 1).is_none(),
            "void with the node's units"
        );
    }

    /// Near a quota's end the node's chunks shrink to 1: no worker holds anything, every
    /// request is decided by the node's lease, exactly.
    #[test]
    fn exact_at_the_cap_workers_hold_nothing() {
        let c = cfg("");
        let q = monthly(100_000);
        for held in [1u64, 2, 15] {
            let mut node = holding(held, T0, 30_000);
            let mut w = WorkerLeases::default();
            for i in 0..held {
                assert_eq!(request(&mut node, &mut w, 1, &[], &q, &c, T0 + i, 1), Ok(Via::Lease));
                assert_eq!(w.held(KEY), 0, "node held {held}");
                assert!(node.loans.is_empty());
            }
            assert_eq!(
                request(&mut node, &mut w, 1, &[], &q, &c, T0 + held, 1),
                Err(Step::Take)
            );
            assert_eq!(node.lease.spent_total, held);
        }
        // At 16 the share is 1 unit.
        let mut node = holding(17, T0, 30_000);
        let mut w = WorkerLeases::default();
        request(&mut node, &mut w, 1, &[], &q, &c, T0, 1).unwrap();
        request(&mut node, &mut w, 1, &[], &q, &c, T0 + 1, 1).unwrap();
        assert_eq!(w.held(KEY), 0, "15 left after the request: off");
        let mut node = holding(18, T0, 30_000);
        let mut w = WorkerLeases::default();
        request(&mut node, &mut w, 1, &[], &q, &c, T0, 1).unwrap();
        request(&mut node, &mut w, 1, &[], &q, &c, T0 + 1, 1).unwrap();
        assert_eq!(w.held(KEY), 1, "16 left: 1");
        // A small quota: no worker lease at all (hold_cap 0).
        assert_eq!(hold_cap(&[], &monthly(15)), 0);
    }

    #[test]
    fn expired_units_go_back_to_the_node_or_up_to_the_fleet() {
        let c = cfg("");
        let q = monthly(100_000);
        // The node's lease outlives the worker's: back into the node's lease.
        let mut node = holding(800, T0, 30_000);
        let mut w = WorkerLeases::default();
        request(&mut node, &mut w, 7, &[], &q, &c, T0, 1).unwrap();
        request(&mut node, &mut w, 7, &[], &q, &c, T0 + 1, 1).unwrap();
        let lent = w.held(KEY);
        assert!(lent > 0);
        sweep(&mut node, &mut w, 7, T0 + 1 + LEASE_MS, false);
        assert_eq!((node.lease.available, node.lease.returned_pending), (798, 0));
        // Expired with the node's lease: given up to the fleet (`returned`), not revived.
        let mut node = holding(800, T0, 40);
        let mut w = WorkerLeases::default();
        request(&mut node, &mut w, 7, &[], &q, &c, T0, 1).unwrap();
        request(&mut node, &mut w, 7, &[], &q, &c, T0 + 1, 1).unwrap();
        let lent = w.held(KEY);
        assert!(w.spend(KEY, &[], &q, T0 + 2, 1).is_some());
        sweep(&mut node, &mut w, 7, T0 + 40 + SWEEP_MS, false);
        assert_eq!(node.lease.returned_pending, lent - 1, "the worker's unspent units");
        node.lease.expire(T0 + 40 + SWEEP_MS);
        assert_eq!(node.lease.available, 0);
        assert_eq!(node.lease.returned_pending, 798 - 1, "the node's own and the worker's");
        assert_eq!(node.lease.spent_total, 3);
        // A settlement that fails (CAS contended) is repeated, exactly once applied.
        let mut node = holding(800, T0, 30_000);
        let mut w = WorkerLeases::default();
        request(&mut node, &mut w, 7, &[], &q, &c, T0, 1).unwrap();
        request(&mut node, &mut w, 7, &[], &q, &c, T0 + 1, 1).unwrap();
        assert!(w.spend(KEY, &[], &q, T0 + 2, 1).is_some());
        let due = w.settlements_due(T0 + 1 + LEASE_MS, false);
        assert_eq!(due.len(), 1);
        w.settled(KEY, &due[0].1, false);
        sweep(&mut node, &mut w, 7, T0 + 1 + LEASE_MS + SWEEP_MS, false);
        assert_eq!(
            (node.lease.available, node.lease.spent_total, node.lease.lent),
            (797, 3, 0)
        );
        // Unload: everything held goes back at once, before the node returns its lease.
        let mut node = holding(800, T0, 30_000);
        let mut w = WorkerLeases::default();
        request(&mut node, &mut w, 7, &[], &q, &c, T0, 1).unwrap();
        request(&mut node, &mut w, 7, &[], &q, &c, T0 + 1, 1).unwrap();
        sweep(&mut node, &mut w, 7, T0 + 2, true);
        assert_eq!((node.lease.available, node.lease.lent, w.held(KEY)), (798, 0, 0));
        let s = Subject {
            name: "k:a",
            buckets: &[],
            quotas: &q,
        };
        let (_, req) = begin_lease(&mut node, "n", &s, &c, T0 + 3, true).unwrap();
        assert_eq!((req.hold, req.returned, req.spent_total), (0, 798, 2));
    }

    #[test]
    fn lost_workers_are_presumed_spent_and_void_loans_report_spend_only() {
        let c = cfg("");
        let q = monthly(100_000);
        let mut node = holding(800, T0, 30_000);
        let mut w = WorkerLeases::default();
        request(&mut node, &mut w, 3, &[], &q, &c, T0, 1).unwrap();
        request(&mut node, &mut w, 3, &[], &q, &c, T0 + 1, 1).unwrap();
        let lent = node.lease.lent;
        // The worker's VM is gone: its loan is presumed spent after ORPHAN_MS.
        drop(w);
        let until = node.loans[0].until_ms;
        reclaim_orphans(&mut node, until + ORPHAN_MS - 1);
        assert_eq!(node.lease.lent, lent);
        reclaim_orphans(&mut node, until + ORPHAN_MS);
        assert_eq!((node.lease.lent, node.lease.spent_total), (0, 2 + lent));
        assert!(lent <= bounds::lost_worker_overcount_max(hold_cap(&[], &q)));
        // A late settlement of a presumed loan changes nothing.
        let before = node.clone();
        settle(&mut node, 3, 1, lent - 1, until + ORPHAN_MS + 1);
        assert_eq!(node, before);
        // The fleet reclaimed the node's lease (a late answer, hold_void): the loans are
        // void; the worker's spend is still reported, its units are not taken back.
        let mut node = holding(800, T0, 30_000);
        let mut w = WorkerLeases::default();
        request(&mut node, &mut w, 3, &[], &q, &c, T0, 1).unwrap();
        request(&mut node, &mut w, 3, &[], &q, &c, T0 + 1, 1).unwrap();
        let lent = w.held(KEY);
        assert!(w.spend(KEY, &[], &q, T0 + 2, 1).is_some());
        let s = Subject {
            name: "k:a",
            buckets: &[],
            quotas: &q,
        };
        node.lease.refill_sent_ms = 0;
        let (ask, req) = begin_lease(&mut node, "n", &s, &c, T0 + 3, false).unwrap();
        assert_eq!(req.hold, node.lease.available + lent);
        let void = LeaseResponse {
            applied: true,
            granted: 5,
            valid_ms: 30_000,
            hold_void: true,
            now_ms: 0,
            buckets: vec![],
            quotas: vec![],
            settled: Vec::new(),
        };
        apply_lease(&mut node, &ask, &void, &[], T0 + 4, &c);
        assert_eq!((node.lease.available, node.lease.lent), (5, 0));
        check(&node, &q, &c);
        sweep(&mut node, &mut w, 3, T0 + 1 + LEASE_MS, false);
        assert_eq!(
            (node.lease.available, node.lease.spent_total),
            (5, 3),
            "spend reported, units dropped"
        );
        assert!(node.loans.is_empty());
    }

    /// Partitioned (the breaker open): the node's lease and its workers' leases are
    /// spent first, then the bounded overdraft; everything admitted, on whichever
    /// level, is in the cumulative spend the node replays once the fleet is back.
    #[test]
    fn partitioned_worker_leases_are_spent_then_the_overdraft_and_all_of_it_is_replayed() {
        let c = cfg(r#","overdraft":5"#);
        let q = monthly(100_000);
        let mut node = holding(40, T0, 30_000);
        let mut w = WorkerLeases::default();
        let partitioned = |node: &mut FleetEntry, w: &mut WorkerLeases, now: u64| {
            if w.spend(KEY, &[], &q, now, 1).is_some() {
                return Some(Via::Lease);
            }
            let draw = w.begin_draw(KEY, &[], &q, now);
            let (step, grant) = decide_drawing(node, 1, draw.as_ref(), &[], &q, &c, now, 1, false);
            let admitted = matches!(&step, Step::Decided(v) if v.denial.is_none());
            if let Some(d) = draw {
                let drawn = Drawn {
                    granted: grant.granted,
                    valid_ms: grant.valid_ms,
                    admitted,
                    views: vec![],
                };
                w.end_draw(KEY, &d, Some(drawn), &[], &q, 1);
            }
            match step {
                Step::Decided(v) if v.denial.is_none() => Some(v.via),
                _ => None,
            }
        };
        let (mut vias, mut worker_held) = (Vec::new(), 0);
        while let Some(via) = partitioned(&mut node, &mut w, T0 + vias.len() as u64) {
            vias.push(via);
            worker_held = worker_held.max(w.held(KEY));
            assert!(vias.len() <= 45);
        }
        assert!(worker_held > 0, "the worker drew from the node while partitioned");
        assert_eq!(vias.len(), 45, "40 leased units, then an overdraft of 5");
        assert_eq!(vias.iter().filter(|v| **v == Via::Fallback).count(), 5);
        assert!(w.held(KEY) == 0 && node.lease.available == 0);
        // The worker settles (its units were all spent); the node replays 45.
        sweep(&mut node, &mut w, 1, T0 + 1_000, false);
        assert_eq!((node.lease.spent_total, node.lease.lent), (45, 0));
        let s = Subject {
            name: "k:a",
            buckets: &[],
            quotas: &q,
        };
        let (_, req) = begin_lease(&mut node, "n", &s, &c, T0 + 1_001, false).unwrap();
        assert_eq!(req.spent_total, 45);
    }

    /// A fleet quota as the limit service keeps it: consumed (reported spend) and what
    /// the node holds.
    struct FakeFleet {
        limit: u64,
        consumed: u64,
        seen: u64,
        held: u64,
    }

    impl FakeFleet {
        fn available(&self) -> u64 {
            self.limit - self.consumed - self.held
        }

        fn lease(&mut self, node: &mut FleetEntry, s: &Subject<'_>, c: &FleetConfig, now: u64, release: bool) {
            let Some((ask, req)) = begin_lease(node, "n", s, c, now, release) else {
                return;
            };
            self.consumed += req.spent_total - self.seen;
            self.seen = req.spent_total;
            self.held = req.hold;
            let avail = self.available();
            let granted = lease::grant_size(req.want, avail, lease::share(c.fleet_size));
            self.held += granted;
            let quotas = vec![QuotaView {
                name: "m".into(),
                period_start: 0,
                period_end: 1 << 40,
                consumed: self.consumed,
                outstanding: self.held,
                available: self.available(),
            }];
            let resp = LeaseResponse {
                applied: true,
                granted,
                valid_ms: c.lease_ttl_ms,
                hold_void: false,
                now_ms: now,
                buckets: vec![],
                quotas,
                settled: Vec::new(),
            };
            apply_lease(node, &ask, &resp, &[], now, c);
        }

        fn take(&mut self, node: &mut FleetEntry, c: &FleetConfig, now: u64) -> bool {
            let admitted = self.available() >= 1;
            if admitted {
                self.consumed += 1;
            }
            let resp = TakeResponse {
                admitted,
                now_ms: now,
                buckets: vec![],
                quotas: vec![QuotaView {
                    name: "m".into(),
                    period_start: 0,
                    period_end: 1 << 40,
                    consumed: self.consumed,
                    outstanding: self.held,
                    available: self.available(),
                }],
            };
            apply_take(node, &resp, &[], c, now, 1).denial.is_none()
        }
    }

    /// Four workers hammering one quota through the node: never more than the quota is
    /// admitted, the node's bound R holds throughout, and once every lease is back what
    /// the fleet counts as consumed is exactly what was admitted (lent units never
    /// counted), and the whole quota was admitted.
    #[test]
    fn a_quota_through_worker_leases_is_never_exceeded_and_counts_exactly() {
        const W: u32 = 4;
        let c = cfg(r#","unreported_pct":2"#);
        let q = monthly(10_000);
        let s = Subject {
            name: "k:a",
            buckets: &[],
            quotas: &q,
        };
        let mut fleet = FakeFleet {
            limit: 10_000,
            consumed: 0,
            seen: 0,
            held: 0,
        };
        let mut node = FleetEntry::default();
        let mut workers: Vec<WorkerLeases> = (0..W).map(|_| WorkerLeases::default()).collect();
        let (mut admitted, mut served_by_workers, mut parked_max) = (0u64, 0u64, 0u64);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let cap = hold_cap(&[], &q);
        for step in 0..30_000u64 {
            let now = T0 + step;
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let id = (rng % u64::from(W)) as u32;
            let w = &mut workers[id as usize];
            match request(&mut node, w, id, &[], &q, &c, now, 1) {
                Ok(via) => {
                    admitted += 1;
                    served_by_workers +=
                        u64::from(via == Via::Lease && node.lease.spent_total + on_loan(&node) < admitted);
                }
                Err(Step::Take) => admitted += u64::from(fleet.take(&mut node, &c, now)),
                Err(_) => {}
            }
            check(&node, &q, &c);
            let parked: u64 = workers.iter().map(|w| w.held(KEY)).sum();
            assert!(workers.iter().all(|w| w.held(KEY) <= cap));
            parked_max = parked_max.max(parked);
            assert!(parked <= bounds::parked_max(u64::from(W), cap));
            // What the fleet knows of, plus what the node may have spent unreported
            // (its own and every loan: R), covers what was admitted; never above the quota.
            assert!(admitted <= fleet.limit, "step {step}");
            assert!(fleet.consumed + node.lease.unreported() + on_loan(&node) >= admitted);
            if step % u64::from(W) == 0 {
                for (i, w) in workers.iter_mut().enumerate() {
                    if (step / u64::from(W)) % (SWEEP_MS / u64::from(W)) == i as u64 {
                        sweep(&mut node, w, i as u32, now, false);
                    }
                }
            }
            if step % c.refill_tick_ms == 0 {
                fleet.lease(&mut node, &s, &c, now, false);
            }
        }
        assert!(served_by_workers > 0 && parked_max > 0, "workers held and served units");
        // Unload: the workers settle into the node, then the node returns its lease.
        let end = T0 + 30_000;
        for (i, w) in workers.iter_mut().enumerate() {
            sweep(&mut node, w, i as u32, end, true);
        }
        node.lease.refill_sent_ms = 0;
        fleet.lease(&mut node, &s, &c, end, true);
        assert_eq!((fleet.held, node.lease.lent, node.lease.available), (0, 0, 0));
        assert_eq!(
            fleet.consumed, admitted,
            "reported consumption is what was admitted, exactly"
        );
        assert_eq!(admitted, fleet.limit, "demand was three times the quota");
    }

    /// Reload on two workers: the first worker to unload settles its
    /// lease and returns the node's (the other worker's loan stays in the `hold`); the
    /// second settles into the returned lease (its units go up as `returned`) and
    /// returns again. The fleet ends holding nothing, having counted exactly what was
    /// admitted.
    #[test]
    fn unload_on_two_workers_returns_everything_when_one_settles_after_the_node_returned() {
        let c = cfg("");
        let q = monthly(100_000);
        let s = Subject {
            name: "k:a",
            buckets: &[],
            quotas: &q,
        };
        let mut fleet = FakeFleet {
            limit: 100_000,
            consumed: 0,
            seen: 0,
            held: 0,
        };
        let mut node = FleetEntry::default();
        fleet.lease(&mut node, &s, &c, T0, false);
        let mut ws = [WorkerLeases::default(), WorkerLeases::default()];
        let (mut admitted, mut now) = (0, T0);
        for t in 0..400u64 {
            now = T0 + 1 + t / 4;
            let i = (t % 2) as usize;
            match request(&mut node, &mut ws[i], i as u32 + 1, &[], &q, &c, now, 1) {
                Ok(_) => admitted += 1,
                Err(Step::Take) => admitted += u64::from(fleet.take(&mut node, &c, now)),
                Err(s) => panic!("{s:?}"),
            }
            if t % 80 == 0 {
                fleet.lease(&mut node, &s, &c, now, false);
            }
            if t > 40 && ws.iter().all(|w| w.held(KEY) > 0) {
                break;
            }
        }
        let now = now + 1;
        assert!(ws.iter().all(|w| w.held(KEY) > 0), "both workers hold valid units");
        // Worker 1 unloads: settles, then returns the node's lease.
        sweep(&mut node, &mut ws[0], 1, now, true);
        node.lease.refill_sent_ms = 0;
        fleet.lease(&mut node, &s, &c, now, true);
        assert_eq!(fleet.held, node.lease.lent, "worker 2's loan is still held");
        assert!(fleet.held > 0);
        // Worker 2 unloads after it.
        sweep(&mut node, &mut ws[1], 2, now + 1, true);
        assert_eq!((node.lease.lent, node.lease.available), (0, 0));
        node.lease.refill_sent_ms = 0;
        fleet.lease(&mut node, &s, &c, now + 1, true);
        assert_eq!(fleet.held, 0);
        assert_eq!(fleet.consumed, admitted, "exactly what was admitted");
        assert!(node.lease.settled() && node.loans.is_empty());
    }

    /// Token buckets: workers' units are a part of the node's, valid no longer, so the
    /// fleet's rate bound `burst + rate × (window + rate_lease_ms) / interval` holds as it
    /// is, and what workers park is at most `workers × hold_cap`.
    #[test]
    fn rate_skew_stays_within_the_node_bound() {
        const W: u32 = 4;
        let c = cfg(r#","rate_lease_ms":100"#);
        let b = bucket(2_000, 1_000, 400); // 2/ms, hold_cap min(20, 25) = 20
        let cap = hold_cap(&b, &[]);
        assert_eq!(cap, 20);
        let s = Subject {
            name: "k:a",
            buckets: &b,
            quotas: &[],
        };
        let mut node = FleetEntry::default();
        let mut workers: Vec<WorkerLeases> = (0..W).map(|_| WorkerLeases::default()).collect();
        // The fleet bucket, in tokens (2 per ms, up to 400).
        let (mut tokens, mut last) = (400u64, T0);
        let mut times = Vec::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for step in 0..20_000u64 {
            let now = T0 + step;
            tokens = (tokens + 2 * (now - last)).min(400);
            last = now;
            for _ in 0..4 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let id = (rng % u64::from(W)) as u32;
                match request(&mut node, &mut workers[id as usize], id, &b, &[], &c, now, 1) {
                    Ok(_) => times.push(now),
                    Err(Step::Take) if tokens > 0 => {
                        tokens -= 1;
                        times.push(now);
                        node.denied_until_ms = 0;
                    }
                    Err(_) => {}
                }
            }
            let parked: u64 = workers.iter().map(|w| w.held(KEY)).sum();
            assert!(parked <= bounds::parked_max(u64::from(W), cap));
            if step % SWEEP_MS == 0 {
                for (i, w) in workers.iter_mut().enumerate() {
                    sweep(&mut node, w, i as u32, now, false);
                }
            }
            if step % c.refill_tick_ms == 0 {
                if let Some((ask, req)) = begin_lease(&mut node, "n", &s, &c, now, false) {
                    tokens = (tokens + req.returned).min(400);
                    let granted = req.want.min(tokens).min(400 / lease::share(c.fleet_size));
                    tokens -= granted;
                    let resp = LeaseResponse {
                        applied: true,
                        granted,
                        valid_ms: c.rate_lease_ms,
                        hold_void: false,
                        now_ms: now,
                        buckets: vec![BucketView {
                            name: "b".into(),
                            tokens,
                            wait_ms: 0,
                        }],
                        quotas: vec![],
                        settled: Vec::new(),
                    };
                    apply_lease(&mut node, &ask, &resp, &b, now, &c);
                }
            }
        }
        assert!(workers.iter().map(WorkerLeases::len).sum::<usize>() > 0);
        let window = 1_000u64;
        let bound = node_bounds::rate_admitted_max(2_000, 1_000, 400, window, c.rate_lease_ms);
        let mut lo = 0;
        let mut worst = 0;
        for hi in 0..times.len() {
            while times[hi] - times[lo] >= window {
                lo += 1;
            }
            worst = worst.max(hi - lo + 1);
        }
        assert!(worst as u64 <= bound, "{worst} > {bound}");
        assert!(worst as u64 >= 2_000 * 9 / 10, "the rate is reached: {worst}");
    }

    /// The README's worker-level figures.
    #[test]
    fn readme_bounds() {
        // 2 workers, the bench's 1000/s plan: hold_cap 10, at most 20 units parked.
        let cap = hold_cap(&bucket(1_000, 1_000, 1_000), &[]);
        assert_eq!((cap, bounds::parked_max(2, cap)), (10, 20));
        // A 1 000 000 / month quota: hold_cap 1024 (the largest), 8 workers park 8192.
        let cap = hold_cap(&[], &monthly(1_000_000));
        assert_eq!((cap, bounds::parked_max(8, cap)), (1_024, 8_192));
        assert_eq!(bounds::lost_worker_overcount_max(cap), 1_024);
        // ... but with the default R (1 %, at most max_chunk 1 000) loans stay within 500.
        assert_eq!(
            node_bounds::report_at(node_bounds::unreported_max(1_000_000, 1, 1_000)),
            500
        );
        let c = cfg("");
        let q = monthly(1_000_000);
        let mut node = holding(100_000, T0, 30_000);
        let mut w = WorkerLeases::default();
        request(&mut node, &mut w, 1, &[], &q, &c, T0, 1).unwrap();
        request(&mut node, &mut w, 1, &[], &q, &c, T0 + 1, 1).unwrap();
        assert_eq!(w.held(KEY), 50, "demand: 1 unit in 1 ms is 50 per lease period");
        for i in 0..100 {
            request(&mut node, &mut w, 1, &[], &q, &c, T0 + 2, 1).unwrap();
            assert!(on_loan(&node) + node.lease.unreported() <= 500, "{i}");
        }
        // The monthly 1 000 of the fleet tests: hold_cap 62, but R = 10 (1 %) caps the
        // loans at R/2 = 5, and a node holding fewer than 16 lends nothing.
        assert_eq!(hold_cap(&[], &monthly(1_000)), 62);
        assert_eq!(node_bounds::report_at(node_bounds::unreported_max(1_000, 1, 1_000)), 5);
    }
}
