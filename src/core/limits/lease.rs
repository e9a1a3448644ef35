//! Leases: units of a limit handed down in chunks, so the holder decides locally and
//! only talks to the lender now and then.
//!
//! One type, two levels. A node (one Envoy) leases units of a subject's limits from the
//! fleet (Redis, through `keymeter-limitd`) and spends them per request from shared
//! data; a worker can in the same way lease from its node's lease (a lease with a
//! parent: [`Lease::lend`] on the parent, [`Lease::on_grant`] on the child). A unit is
//! one unit of request cost, good for every limit of the subject at once (a request of
//! cost `c` spends `c` from each of its token buckets and quotas), so one lease per
//! subject is enough.
//!
//! # Protocol, as the holder sees it
//!
//! * Units are taken from the lender *before* they are spent: the holder only admits
//!   what it holds, so the lender never admits more than its limit through its holders.
//! * A grant is valid for `valid_ms` measured from when the holder *sent* the request
//!   (never from when the answer arrived), so the holder always stops spending before the
//!   lender's record of the lease expires, whatever the network delay.
//! * The holder asks again when it is down to its low-water mark (half of its last
//!   chunk) or close to expiry, with one refill in flight at a time. Each ask states what
//!   it still holds (`hold`: the lender resets its record of this holder to that, which
//!   heals lost answers), what it gave up since the last ask (`returned`, for token
//!   buckets) and its cumulative spend (`spent_total`, so a replay after an outage is
//!   idempotent: the lender counts only the growth).
//! * Quota chunks shrink as the lender nears its limit: a grant is at most
//!   `available / share` (at least 1), with `share = 2 × fleet size`, so at the cap
//!   every holder gets single units and the last units are exact. Token-bucket grants
//!   are capped by the tokens in the fleet bucket and by `burst / share` (one holder
//!   cannot lease a whole small burst), but do not shrink with the tokens left (the
//!   bucket refills continuously; that would starve a fast limit whose bucket is always
//!   nearly empty).
//! * A grant smaller than asked comes with a time to wait (the next bucket token, or a
//!   backoff for an exhausted quota): no new ask before then, so the calls per subject
//!   are bounded by the limit's refill rate, not by the request rate.
//!
//! Everything here is pure and clock-injected; the adapter stores the lease in shared
//! data and the limit service applies the same chunk rule in its Lua script.

use serde::{Deserialize, Serialize};

/// How a holder sizes and times its leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasePolicy {
    /// Largest chunk to ask for.
    pub max_chunk: u64,
    /// First ask for a subject, before any spend rate is known.
    pub initial_chunk: u64,
    /// Ask for a renewal this long before the lease expires.
    pub renew_before_ms: u64,
    /// A refill without an answer after this long is given up (the call timed out), so
    /// a new one may start.
    pub refill_timeout_ms: u64,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        LeasePolicy {
            max_chunk: 1000,
            initial_chunk: 10,
            renew_before_ms: 1000,
            refill_timeout_ms: 1000,
        }
    }
}

/// The divisor of the chunk rule for a fleet of `fleet_size` holders: each grant is at
/// most `1 / share` of what is left, so even if every holder refills at once, half of
/// what was left stays with the lender.
pub fn share(fleet_size: u64) -> u64 {
    fleet_size.max(1).saturating_mul(2)
}

/// Largest grant the lender makes when it has `available` units left: `available /
/// share`, but at least 1 while anything is left. This is what makes the chunk shrink
/// to 1 as the subject nears its limit. The limit service's Lua script computes the
/// same.
pub fn chunk_cap(available: u64, share: u64) -> u64 {
    if available == 0 {
        0
    } else {
        (available / share.max(1)).clamp(1, available)
    }
}

/// What a holder that asks for `want` units gets from a lender with `available` left.
pub fn grant_size(want: u64, available: u64, share: u64) -> u64 {
    want.min(chunk_cap(available, share))
}

/// One refill request, as the holder sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask {
    /// Units wanted on top of what is held.
    pub want: u64,
    /// Units still held and valid, after this ask's expiry check.
    pub hold: u64,
    /// Units given up (expired, released) since the last acknowledged ask.
    pub returned: u64,
    /// Cumulative units spent under this lease since the holder started.
    pub spent_total: u64,
    /// Holder's clock when the ask was made: a grant's validity counts from here.
    pub sent_at_ms: u64,
}

/// A holder's lease on one subject. Small and `Copy`, so it fits a shared-data entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Units held and not spent (valid until `expires_at_ms`).
    pub available: u64,
    /// Holder's clock; the held units are void from this instant on. 0: nothing held.
    pub expires_at_ms: u64,
    /// Size of the last grant: the low-water mark is half of it.
    pub last_grant: u64,
    /// Units spent since the last grant, to size the next ask.
    pub spent_since_grant: u64,
    /// Cumulative units spent (reported to the lender as `spent_total`).
    pub spent_total: u64,
    /// The largest `spent_total` the lender has acknowledged.
    pub reported_total: u64,
    /// Units lent to children (as a parent) and not yet reported back.
    pub lent: u64,
    /// Units given up and not yet told to the lender.
    pub returned_pending: u64,
    /// When the refill in flight was sent; 0 when none is.
    pub refill_sent_ms: u64,
    /// No new ask before this instant (the lender said to wait).
    pub retry_at_ms: u64,
}

impl Lease {
    /// Drops the held units if the lease has expired at `now_ms`; returns how many.
    pub fn expire(&mut self, now_ms: u64) -> u64 {
        if self.available > 0 && now_ms >= self.expires_at_ms {
            let dropped = self.available;
            self.available = 0;
            self.returned_pending = self.returned_pending.saturating_add(dropped);
            dropped
        } else {
            0
        }
    }

    /// Spends `cost` units if they are held and valid. A refusal changes nothing but the
    /// expiry of stale units.
    pub fn try_spend(&mut self, cost: u64, now_ms: u64) -> bool {
        self.expire(now_ms);
        if cost == 0 {
            return true;
        }
        if self.available < cost {
            return false;
        }
        self.available -= cost;
        self.spent_total = self.spent_total.saturating_add(cost);
        self.spent_since_grant = self.spent_since_grant.saturating_add(cost);
        true
    }

    /// Counts `cost` units spent without a lease (the bounded overdraft while the lender
    /// is unreachable): they are reported with the next ask like any other spend.
    pub fn record_overdraft(&mut self, cost: u64) {
        self.spent_total = self.spent_total.saturating_add(cost);
        self.spent_since_grant = self.spent_since_grant.saturating_add(cost);
    }

    /// Refill when down to half the last chunk (at least 1 unit), or close to expiry.
    pub fn low_water(&self) -> u64 {
        (self.last_grant / 2).max(1)
    }

    pub fn needs_refill(&self, now_ms: u64, policy: &LeasePolicy) -> bool {
        self.available <= self.low_water()
            || self.expires_at_ms.saturating_sub(now_ms) <= policy.renew_before_ms
            || self.returned_pending > 0
    }

    /// Units spent and not yet acknowledged by the lender (what it would not know of if
    /// this holder died now).
    pub fn unreported(&self) -> u64 {
        self.spent_total.saturating_sub(self.reported_total)
    }

    /// Whether the lender knows everything: nothing held, given up or spent unreported.
    /// Only then may a holder forget the lease.
    pub fn settled(&self) -> bool {
        self.available == 0 && self.lent == 0 && self.returned_pending == 0 && self.spent_total == self.reported_total
    }

    /// Whether a refill is in flight (one at a time); a stale one does not count.
    pub fn refill_in_flight(&self, now_ms: u64, policy: &LeasePolicy) -> bool {
        self.refill_sent_ms != 0 && now_ms.saturating_sub(self.refill_sent_ms) < policy.refill_timeout_ms
    }

    /// Units to ask for: twice what was spent since the last grant (the demand of one
    /// lease period, with headroom), within `[1, max_chunk]`; `initial_chunk` first.
    pub fn want(&self, policy: &LeasePolicy) -> u64 {
        let max = policy.max_chunk.max(1);
        if self.last_grant == 0 && self.spent_since_grant == 0 {
            return policy.initial_chunk.clamp(1, max);
        }
        self.spent_since_grant.saturating_mul(2).clamp(1, max)
    }

    /// Starts a refill at `now_ms` unless one is in flight; the caller sends the `Ask`.
    pub fn begin_refill(&mut self, now_ms: u64, policy: &LeasePolicy) -> Option<Ask> {
        if self.refill_in_flight(now_ms, policy) || now_ms < self.retry_at_ms {
            return None;
        }
        self.expire(now_ms);
        self.refill_sent_ms = now_ms.max(1);
        Some(self.ask(self.want(policy), now_ms))
    }

    /// Starts a report (an ask for nothing more) at `now_ms` unless a call is in flight:
    /// unlike a refill it may go while the lender said to wait, since it only tells the
    /// lender what was spent.
    pub fn begin_report(&mut self, now_ms: u64, policy: &LeasePolicy) -> Option<Ask> {
        if self.refill_in_flight(now_ms, policy) {
            return None;
        }
        self.expire(now_ms);
        self.refill_sent_ms = now_ms.max(1);
        Some(self.ask(0, now_ms))
    }

    /// An ask that gives everything back and wants nothing (shutdown, reload, idle).
    pub fn release(&mut self, now_ms: u64) -> Ask {
        self.returned_pending = self.returned_pending.saturating_add(self.available);
        self.available = 0;
        self.expires_at_ms = 0;
        self.ask(0, now_ms)
    }

    fn ask(&self, want: u64, now_ms: u64) -> Ask {
        Ask {
            want,
            hold: self.available.saturating_add(self.lent),
            returned: self.returned_pending,
            spent_total: self.spent_total,
            sent_at_ms: now_ms,
        }
    }

    /// Applies the lender's answer to `ask`: `granted` units, all held units valid for
    /// `valid_ms` from when the ask was sent.
    pub fn on_grant(&mut self, ask: &Ask, granted: u64, valid_ms: u64) {
        self.returned_pending = self.returned_pending.saturating_sub(ask.returned);
        self.reported_total = self.reported_total.max(ask.spent_total);
        self.refill_sent_ms = 0;
        let expires = ask.sent_at_ms.saturating_add(valid_ms);
        // The lender extended everything we said we held up to `expires`; units we still
        // hold past their own old expiry are covered by the new one.
        self.available = self.available.saturating_add(granted);
        self.expires_at_ms = if self.available > 0 { expires } else { 0 };
        if granted > 0 {
            self.last_grant = granted;
            self.spent_since_grant = 0;
        }
    }

    /// The lender had less than asked: ask again no earlier than `until_ms`.
    pub fn back_off(&mut self, until_ms: u64) {
        self.retry_at_ms = until_ms;
    }

    /// The ask failed (timeout, error): held units stay valid until their own expiry and
    /// nothing that was reported counts as acknowledged, so the next ask repeats it.
    pub fn on_failure(&mut self) {
        self.refill_sent_ms = 0;
    }

    /// As a parent: lends a child up to `want` units under the chunk rule; returns the
    /// units and the expiry the child must respect (never later than the parent's).
    pub fn lend(&mut self, want: u64, share: u64, now_ms: u64) -> (u64, u64) {
        self.expire(now_ms);
        let g = grant_size(want, self.available, share);
        self.available -= g;
        self.lent = self.lent.saturating_add(g);
        (g, self.expires_at_ms)
    }

    /// As a parent: a child reports `spent` of its lent units spent and gives `back`
    /// unused ones (dropped if the parent's own lease has expired meanwhile).
    pub fn settle_child(&mut self, spent: u64, back: u64, now_ms: u64) {
        let spent = spent.min(self.lent);
        self.lent -= spent;
        self.spent_total = self.spent_total.saturating_add(spent);
        self.spent_since_grant = self.spent_since_grant.saturating_add(spent);
        let back = back.min(self.lent);
        self.lent -= back;
        if now_ms < self.expires_at_ms {
            self.available = self.available.saturating_add(back);
        } else {
            self.returned_pending = self.returned_pending.saturating_add(back);
        }
    }
}

/// Accuracy bounds, as documented in the README and checked by the tests.
pub mod bounds {
    /// Most units of a token bucket (`rate` per `interval_ms`, capacity `burst`) a fleet
    /// admits in any window of `window_ms`, when leased units stay valid `lease_ms`:
    /// `burst + rate × (window + lease) / interval`. Units are taken from the one fleet
    /// bucket before they are spent, and a unit taken before the window can be spent in
    /// it for at most `lease_ms`.
    pub fn rate_admitted_max(rate: u64, interval_ms: u64, burst: u64, window_ms: u64, lease_ms: u64) -> u64 {
        let refill = u128::from(rate) * u128::from(window_ms.saturating_add(lease_ms)) / u128::from(interval_ms.max(1));
        u64::try_from(u128::from(burst) + refill).unwrap_or(u64::MAX)
    }

    /// Most units that can sit unspent in the leases of `fleet_size` holders at once
    /// (what the fleet can under-admit while leases are outstanding): each holder holds
    /// at most its low-water remainder (half a chunk, at least 1) plus one new chunk, and a chunk is
    /// at most `max_chunk` and at most `limit / share`. Returned leases (expiry,
    /// shutdown, reload) bring it back to 0.
    pub fn outstanding_max(limit: u64, fleet_size: u64, max_chunk: u64) -> u64 {
        let chunk = max_chunk.min(super::chunk_cap(limit, super::share(fleet_size)));
        let per_holder = chunk.saturating_add((chunk / 2).max(1));
        per_holder.saturating_mul(fleet_size.max(1)).min(limit)
    }

    /// Most a quota can be exceeded by while holders are cut off from the lender:
    /// `overdraft` per holder and subject, on top of the quota; 0 when connected.
    pub fn partition_overdraft_max(fleet_size: u64, overdraft: u64) -> u64 {
        fleet_size.saturating_mul(overdraft)
    }

    /// R, the most a holder may have spent of a subject without the lender's
    /// acknowledgement: `pct` % of the quota's `limit`, at least 1 and at most
    /// `max_chunk`. The holder reports (off the request path) once its unreported spend
    /// reaches [`report_at`], and stops spending its lease locally (a request then takes
    /// its cost from the lender directly) while one more request would take it above R.
    /// A subject with several quotas uses the smallest R.
    pub fn unreported_max(limit: u64, pct: u64, max_chunk: u64) -> u64 {
        let r = u128::from(limit) * u128::from(pct) / 100;
        u64::try_from(r).unwrap_or(u64::MAX).clamp(1, max_chunk.max(1))
    }

    /// Unreported spend at which a holder reports it: half of R, at least 1.
    pub fn report_at(r: u64) -> u64 {
        r.div_ceil(2).max(1)
    }

    /// Most a quota is under-admitted for good because `dead` holders died (SIGKILL,
    /// crash) holding leases: when such a lease expires, the lender counts R' = min(R,
    /// held) as consumed, since the holder may have spent up to that much unreported, and
    /// the rest of the lease comes back. The holder really spent between 0 and R' of it,
    /// so the fleet never admits more than the quota and loses at most R per dead lease.
    pub fn crash_under_admission_max(dead: u64, r: u64) -> u64 {
        dead.saturating_mul(r)
    }

    /// How often a node refills a subject held at its rate cap (the fleet bucket was
    /// empty, or held less than one node's grant, at its last call): every `fleet_size`
    /// token times (the time in which the fleet bucket gains one token per node), but at
    /// most half the time the bucket takes to fill its burst (so tokens are never lost to
    /// a full bucket between two refills of one node) and at least one refill tick.
    /// Between refills the node answers 429 itself.
    pub fn cap_refill_interval_ms(rate: u64, interval_ms: u64, burst: u64, fleet_size: u64, tick_ms: u64) -> u64 {
        let per_token = |n: u64| u128::from(n) * u128::from(interval_ms) / u128::from(rate.max(1));
        let fleet_share = per_token(fleet_size.max(1));
        let half_fill = per_token(burst) / 2;
        u64::try_from(fleet_share.min(half_fill))
            .unwrap_or(u64::MAX)
            .max(tick_ms)
    }

    /// Most calls a node makes for one subject held at its rate cap during `window_ms`,
    /// whatever the request rate: one refill per `cap_refill_interval_ms`, plus the
    /// paused take of its first request and the call that finds the bucket empty.
    pub fn cap_calls_max(window_ms: u64, refill_interval_ms: u64) -> u64 {
        window_ms / refill_interval_ms.max(1) + 2
    }

    /// A rate limit's local share while partitioned: `limit / fleet_size`, rounded up so
    /// that a limit smaller than the fleet still admits on every node.
    pub fn local_share(limit: u64, fleet_size: u64) -> u64 {
        limit.div_ceil(fleet_size.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: LeasePolicy = LeasePolicy {
        max_chunk: 100,
        initial_chunk: 10,
        renew_before_ms: 500,
        refill_timeout_ms: 200,
    };

    #[test]
    fn chunk_shrinks_to_one_near_the_limit() {
        let s = share(3); // 6
        assert_eq!(s, 6);
        assert_eq!(chunk_cap(1000, s), 166);
        assert_eq!(chunk_cap(60, s), 10);
        assert_eq!(chunk_cap(11, s), 1);
        assert_eq!(chunk_cap(5, s), 1);
        assert_eq!(chunk_cap(1, s), 1);
        assert_eq!(chunk_cap(0, s), 0);
        assert_eq!(grant_size(50, 1000, s), 50);
        assert_eq!(grant_size(500, 1000, s), 166);
        assert_eq!(grant_size(0, 1000, s), 0);
        assert_eq!(share(0), 2, "a fleet of 0 is treated as 1");
        assert_eq!(chunk_cap(7, 0), 7, "share 0 is treated as 1");
    }

    #[test]
    fn spend_refill_trigger_and_grant_from_send_time() {
        let mut l = Lease::default();
        assert!(!l.try_spend(1, 0), "nothing held");
        assert!(l.try_spend(0, 0), "cost 0 always passes");
        assert!(l.needs_refill(0, &P));
        let ask = l.begin_refill(1_000, &P).unwrap();
        assert_eq!(
            ask,
            Ask {
                want: 10,
                hold: 0,
                returned: 0,
                spent_total: 0,
                sent_at_ms: 1_000
            }
        );
        assert!(l.begin_refill(1_050, &P).is_none(), "one refill in flight");
        // The answer arrives 40 ms later; validity counts from the send time.
        l.on_grant(&ask, 10, 3_000);
        assert_eq!((l.available, l.expires_at_ms, l.low_water()), (10, 4_000, 5));
        assert!(!l.needs_refill(1_040, &P));
        for _ in 0..5 {
            assert!(l.try_spend(1, 1_100));
        }
        assert!(l.needs_refill(1_100, &P), "at the low-water mark (half the chunk)");
        assert!(l.try_spend(5, 1_100));
        assert!(!l.try_spend(1, 1_100));
        assert_eq!(l.spent_total, 10);
        // Demand since the grant was 10: ask for twice that.
        let ask = l.begin_refill(1_200, &P).unwrap();
        assert_eq!((ask.want, ask.hold, ask.spent_total), (20, 0, 10));
        // Only 3 of 20 granted, the lender says wait 30 ms: no ask before then.
        l.on_grant(&ask, 3, 3_000);
        l.back_off(1_230);
        assert!(l.try_spend(3, 1_201));
        assert!(l.begin_refill(1_229, &P).is_none());
        assert!(l.begin_refill(1_230, &P).is_some());
    }

    #[test]
    fn renewal_is_asked_before_expiry_and_expired_units_are_returned() {
        let mut l = Lease::default();
        let ask = l.begin_refill(0, &P).unwrap();
        l.on_grant(&ask, 10, 2_000);
        assert!(!l.needs_refill(1_499, &P));
        assert!(l.needs_refill(1_500, &P), "renew_before_ms before expiry");
        assert!(l.try_spend(1, 1_999));
        assert!(!l.try_spend(1, 2_000), "void at the expiry instant");
        assert_eq!(l.available, 0);
        assert_eq!(l.returned_pending, 9);
        let ask = l.begin_refill(2_000, &P).unwrap();
        assert_eq!((ask.hold, ask.returned), (0, 9));
        l.on_grant(&ask, 4, 2_000);
        assert_eq!((l.returned_pending, l.available, l.expires_at_ms), (0, 4, 4_000));
    }

    #[test]
    fn a_renewal_extends_the_units_still_held() {
        let mut l = Lease::default();
        let ask = l.begin_refill(0, &P).unwrap();
        l.on_grant(&ask, 10, 1_000);
        let ask = l.begin_refill(600, &P).unwrap();
        assert_eq!(ask.hold, 10);
        l.on_grant(&ask, 0, 1_000); // nothing more, but the 10 held are extended
        assert_eq!((l.available, l.expires_at_ms), (10, 1_600));
        assert!(l.try_spend(10, 1_599));
    }

    #[test]
    fn failures_keep_reports_for_the_next_ask_and_stale_refills_are_given_up() {
        let mut l = Lease::default();
        let ask = l.begin_refill(0, &P).unwrap();
        l.on_grant(&ask, 10, 10_000);
        assert!(l.try_spend(7, 10));
        let a1 = l.begin_refill(20, &P).unwrap();
        assert!(l.begin_refill(219, &P).is_none());
        // No answer within refill_timeout_ms: the next ask may go, repeating the report.
        let a2 = l.begin_refill(220, &P).unwrap();
        assert_eq!(a1.spent_total, a2.spent_total);
        l.on_failure();
        l.record_overdraft(2);
        let a3 = l.begin_refill(300, &P).unwrap();
        assert_eq!(a3.spent_total, 9, "overdraft is reported like any spend");
    }

    #[test]
    fn release_gives_everything_back() {
        let mut l = Lease::default();
        let ask = l.begin_refill(0, &P).unwrap();
        l.on_grant(&ask, 10, 10_000);
        assert!(l.try_spend(3, 1));
        let r = l.release(2);
        assert_eq!(
            r,
            Ask {
                want: 0,
                hold: 0,
                returned: 7,
                spent_total: 3,
                sent_at_ms: 2
            }
        );
        assert!(!l.try_spend(1, 3));
        l.on_grant(&r, 0, 10_000);
        assert_eq!((l.available, l.returned_pending, l.expires_at_ms), (0, 0, 0));
    }

    #[test]
    fn want_adapts_to_demand_within_bounds() {
        let mut l = Lease::default();
        assert_eq!(l.want(&P), 10);
        l.last_grant = 10;
        l.spent_since_grant = 0;
        assert_eq!(l.want(&P), 1, "idle subject asks for a single unit");
        l.spent_since_grant = 30;
        assert_eq!(l.want(&P), 60);
        l.spent_since_grant = 1_000;
        assert_eq!(l.want(&P), 100, "capped at max_chunk");
    }

    #[test]
    fn a_child_lease_never_outlives_its_parent() {
        let mut node = Lease::default();
        let ask = node.begin_refill(0, &P).unwrap();
        node.on_grant(&ask, 40, 5_000);
        // A worker leases from its node with the same type.
        let mut worker = Lease::default();
        let wask = worker.begin_refill(100, &P).unwrap();
        let (g, parent_expiry) = node.lend(wask.want, share(2), 100);
        assert_eq!((g, parent_expiry), (10, 5_000));
        worker.on_grant(&wask, g, parent_expiry - wask.sent_at_ms);
        assert_eq!(worker.expires_at_ms, 5_000);
        assert_eq!(node.available + node.lent, 40, "the node still holds what it lent");
        assert!(worker.try_spend(4, 200));
        // The worker settles: 4 spent, 6 back.
        let r = worker.release(300);
        node.settle_child(r.spent_total, r.returned, 300);
        assert_eq!((node.available, node.lent, node.spent_total), (36, 0, 4));
        // The node's ask to the fleet reports the child's spend and holds the rest.
        let fleet_ask = node.begin_refill(400, &P).unwrap();
        assert_eq!((fleet_ask.hold, fleet_ask.spent_total), (36, 4));
        // Units given back after the parent's expiry are returned upwards, not revived.
        let mut node2 = Lease {
            available: 5,
            expires_at_ms: 1_000,
            ..Lease::default()
        };
        let (g, _) = node2.lend(5, 1, 0);
        node2.settle_child(0, g, 1_000);
        assert_eq!((node2.available, node2.returned_pending), (0, 5));
    }

    /// A fleet of leases drawing from one quota (a parent `Lease` standing in for Redis):
    /// never more than the quota is admitted, chunks shrink to 1 at the end, and once
    /// every holder has returned its lease the whole quota is admitted exactly.
    #[test]
    fn fleet_simulation_never_exceeds_and_ends_exact() {
        const LIMIT: u64 = 1_000;
        const FLEET: u64 = 3;
        let mut fleet = Lease {
            available: LIMIT,
            expires_at_ms: u64::MAX,
            ..Lease::default()
        };
        let mut nodes = [Lease::default(); FLEET as usize];
        let mut admitted = 0u64;
        let mut chunks = Vec::new();
        let mut rng = 0x1234_5678_9abc_def0u64;
        for step in 0..20_000u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let n = (rng % FLEET) as usize;
            let now = step;
            let node = &mut nodes[n];
            if node.needs_refill(now, &P) {
                if let Some(ask) = node.begin_refill(now, &P) {
                    let (g, _) = fleet.lend(ask.want, share(FLEET), now);
                    chunks.push(g);
                    node.on_grant(&ask, g, 10_000);
                }
            }
            if node.try_spend(1, now) {
                admitted += 1;
            }
            assert!(admitted <= LIMIT);
        }
        for node in &mut nodes {
            let r = node.release(20_000);
            fleet.settle_child(r.spent_total.min(fleet.lent), r.returned, 0);
        }
        assert_eq!(admitted, LIMIT, "demand was far above the quota");
        assert_eq!(fleet.available, 0);
        assert!(
            chunks.iter().rev().take(5).all(|&c| c <= 1),
            "last chunks are single units: {chunks:?}"
        );
        assert!(chunks.iter().any(|&c| c >= 20), "early chunks are large: {chunks:?}");
    }

    #[test]
    fn bounds_formulas() {
        // 100/s, burst 200, 10 s window, 1 s lease: 200 + 100 × 11.
        assert_eq!(bounds::rate_admitted_max(100, 1_000, 200, 10_000, 1_000), 1_300);
        assert_eq!(bounds::rate_admitted_max(u64::MAX, 1, u64::MAX, u64::MAX, 1), u64::MAX);
        // 1000/month, 3 nodes, max chunk 100: chunk = min(100, 1000/6 = 166) = 100,
        // 150 per node, 450 in all.
        assert_eq!(bounds::outstanding_max(1_000, 3, 100), 450);
        assert_eq!(bounds::outstanding_max(10, 3, 100), 6, "chunk 1 near small limits");
        assert_eq!(bounds::partition_overdraft_max(3, 5), 15);
        assert_eq!(bounds::local_share(100, 3), 34);
        assert_eq!(bounds::local_share(1, 3), 1);
        // R: 1 % of the quota, within [1, max_chunk].
        assert_eq!(bounds::unreported_max(1_000, 1, 100), 10);
        assert_eq!(bounds::unreported_max(60, 10, 20), 6);
        assert_eq!(bounds::unreported_max(60, 1, 20), 1, "at least 1");
        assert_eq!(bounds::unreported_max(10_000_000, 1, 1_000), 1_000, "at most max_chunk");
        assert_eq!(bounds::unreported_max(u64::MAX, 100, u64::MAX), u64::MAX);
        assert_eq!(
            (bounds::report_at(10), bounds::report_at(1), bounds::report_at(5)),
            (5, 1, 3)
        );
        assert_eq!(bounds::crash_under_admission_max(2, 10), 20);
        // 40/s, burst 40, 3 nodes, tick 20: 3 token times = 75 ms (half fill is 500 ms).
        assert_eq!(bounds::cap_refill_interval_ms(40, 1_000, 40, 3, 20), 75);
        // 1/s, burst 2, 3 nodes: half the fill time (1 s), not 3 s.
        assert_eq!(bounds::cap_refill_interval_ms(1, 1_000, 2, 3, 20), 1_000);
        // 1000/s: one tick.
        assert_eq!(bounds::cap_refill_interval_ms(1_000, 1_000, 1_000, 3, 20), 20);
        assert_eq!(bounds::cap_calls_max(6_000, 75), 82);
    }

    /// A holder that never spends beyond R unreported, its reports answered only some
    /// requests later, dying at any point: what the lender has counted plus what it
    /// presumes spent (min(R, held)) always covers what was admitted, and exceeds it by at
    /// most R.
    #[test]
    fn a_dead_holders_presumed_spend_covers_what_it_admitted() {
        let r = bounds::unreported_max(60, 10, 40);
        assert_eq!(r, 6);
        for delay in 0..6u64 {
            let mut l = Lease::default();
            let ask = l.begin_refill(0, &P).unwrap();
            l.on_grant(&ask, 40, 1_000_000);
            // The lender's record: reported spend and the hold of the last applied call.
            let (mut counted, mut held) = (0u64, 40u64);
            let mut in_flight: Option<(Ask, u64)> = None;
            let mut admitted = 0u64;
            for step in 1..200u64 {
                if l.unreported() < r && l.try_spend(1, step) {
                    admitted += 1;
                }
                if in_flight.is_none() && l.unreported() >= bounds::report_at(r) {
                    let ask = l.begin_refill(step, &P).unwrap();
                    in_flight = Some((ask, step + delay));
                }
                if let Some((ask, at)) = in_flight {
                    if step >= at {
                        // Applied and answered (no more units granted).
                        counted = ask.spent_total;
                        held = ask.hold;
                        l.on_grant(&ask, 0, 1_000_000);
                        in_flight = None;
                    }
                }
                // Dies now: is the presumption enough, and not too much?
                let presumed = r.min(held);
                assert!(counted + presumed >= admitted, "delay {delay} step {step}");
                assert!(counted + presumed - admitted <= bounds::crash_under_admission_max(1, r));
            }
            assert_eq!(admitted, 40, "the whole lease is spent, R/2 at a time");
        }
    }

    #[test]
    fn outstanding_bound_holds_in_simulation() {
        // Holders that refill eagerly and then go idle hold at most `outstanding_max`.
        for (limit, fleet, max_chunk) in [(1_000u64, 3u64, 100u64), (50, 3, 100), (100_000, 5, 1_000)] {
            let policy = LeasePolicy {
                max_chunk,
                initial_chunk: max_chunk,
                ..P
            };
            let mut parent = Lease {
                available: limit,
                expires_at_ms: u64::MAX,
                ..Lease::default()
            };
            let mut nodes = vec![Lease::default(); fleet as usize];
            for (i, node) in nodes.iter_mut().enumerate() {
                let ask = node.begin_refill(i as u64, &policy).unwrap();
                let (g, _) = parent.lend(ask.want, share(fleet), 0);
                node.on_grant(&ask, g, 100_000);
                // Spend down to the low-water mark, then refill once more.
                let spend = node.available - node.low_water();
                assert!(node.try_spend(spend, 1));
                let mut ask = node.begin_refill(1_000, &policy).unwrap();
                ask.want = max_chunk;
                let (g, _) = parent.lend(ask.want, share(fleet), 0);
                node.on_grant(&ask, g, 100_000);
            }
            let held: u64 = nodes.iter().map(|n| n.available).sum();
            assert!(
                held <= bounds::outstanding_max(limit, fleet, max_chunk),
                "{limit}/{fleet}/{max_chunk}: {held}"
            );
        }
    }
}
