//! Admin answers held back until every worker uses the `km/meta` write they report.
//!
//! Workers serve requests from a copy of `km/meta` up to
//! `request::meta_copy::STALE_MS` old, so "200" to a delta, a full push or a staged
//! commit (and a status showing a fresh version) may only go out at
//! `request::meta_copy::visible_at` the write. The adapter pauses such a request, queues
//! its answer here and sends it from the root's tick; nothing blocks.

use crate::core::request::meta_copy::visible_at;

/// A status read taken within this long of the running set's `updated_at` (whole
/// seconds, taken by the writer just before its write) is held too: it may report a
/// version some worker does not use yet. Generous, so a slow writer is covered; a
/// status call outside it is answered at once.
pub const STATUS_RECENT_MS: u64 = 10_000;

/// Whether a status answer that read `km/meta` with `updated_at_s` at `now_ms` must be
/// held (see [`STATUS_RECENT_MS`]).
pub fn status_needs_hold(updated_at_s: i64, now_ms: u64) -> bool {
    let updated_ms = (updated_at_s.max(0) as u64).saturating_mul(1000);
    now_ms < updated_ms.saturating_add(1000 + STATUS_RECENT_MS)
}

/// Answers waiting for their time, per HTTP context id.
#[derive(Debug)]
pub struct HeldReplies<R> {
    held: Vec<(u32, u64, R)>,
}

impl<R> Default for HeldReplies<R> {
    fn default() -> Self {
        HeldReplies { held: Vec::new() }
    }
}

impl<R> HeldReplies<R> {
    /// Holds `reply` for context `ctx` until [`visible_at`]`(written_ms)`; `written_ms`
    /// is a clock reading taken after the `km/meta` write (or read) it reports.
    pub fn hold(&mut self, ctx: u32, written_ms: u64, reply: R) {
        self.held.retain(|(c, ..)| *c != ctx);
        self.held.push((ctx, visible_at(written_ms), reply));
    }

    /// Removes and returns the answers that may go at `now_ms`, oldest first.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<(u32, R)> {
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].1 <= now_ms {
                let (ctx, _, reply) = self.held.remove(i);
                due.push((ctx, reply));
            } else {
                i += 1;
            }
        }
        due
    }

    /// Drops the answer of a context that went away (client reset, Envoy draining).
    pub fn forget(&mut self, ctx: u32) {
        self.held.retain(|(c, ..)| *c != ctx);
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::request::meta_copy::{HOLD_MARGIN_MS, STALE_MS};

    const T: u64 = 1_700_000_000_000;

    #[test]
    fn an_answer_goes_only_once_the_staleness_bound_has_passed() {
        let mut h = HeldReplies::default();
        h.hold(5, T, "delta");
        h.hold(6, T + 4, "push");
        let go = T + STALE_MS + 1 + HOLD_MARGIN_MS;
        assert!(h.take_due(T).is_empty());
        assert!(h.take_due(go - 1).is_empty());
        assert_eq!(h.take_due(go), vec![(5, "delta")]);
        assert_eq!(h.len(), 1);
        assert!(h.take_due(go + 3).is_empty());
        assert_eq!(h.take_due(go + 4), vec![(6, "push")]);
        assert!(h.is_empty());
    }

    #[test]
    fn a_context_that_went_away_is_forgotten_and_a_context_holds_one_answer() {
        let mut h = HeldReplies::default();
        h.hold(1, T, "a");
        h.hold(2, T, "b");
        h.forget(1);
        h.hold(2, T + 1, "b2");
        assert_eq!(h.take_due(u64::MAX), vec![(2, "b2")]);
    }

    #[test]
    fn status_is_held_only_near_an_update() {
        let at = (T / 1000) as i64;
        assert!(status_needs_hold(at, T));
        assert!(status_needs_hold(at, T + STATUS_RECENT_MS));
        assert!(!status_needs_hold(at, T + 1000 + STATUS_RECENT_MS));
        assert!(!status_needs_hold(0, T));
    }
}
