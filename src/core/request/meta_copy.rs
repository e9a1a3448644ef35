//! A worker's copy of `km/meta`, so a steady request makes no shared-data call (and
//! takes no process-wide lock), and the rule that keeps "live after the 200" true anyway.
//!
//! The copy is re-read on the worker's tick every [`POLL_MS`] and trusted by a request
//! only while it is at most [`STALE_MS`] old by the host clock the request reads anyway;
//! an older copy (a late or missing tick) is re-read inline, as every request did
//! before. Correctness therefore rests on the shared host clock, not on timers firing.
//!
//! The other half is on the writer's side: the admin API answers a committed key-set
//! change only at [`visible_at`] its `km/meta` write. A request that starts after that
//! answer reads the clock at `t >= written + STALE_MS + 1`, so a copy it may use was
//! read at `t - STALE_MS > written`: after the write. Both times are lower/upper
//! bounds taken on the right side of the shared-data call (the copy's time is read
//! before its `get`, the writer's after its `set`), and milliseconds are truncated the
//! same way on both sides, hence the `+ 1`.

use crate::core::keyset::meta::Meta;

/// How often a worker's tick re-reads `km/meta`.
pub const POLL_MS: u64 = 10;
/// The oldest copy a request may use. Two poll periods: a tick that is a little late
/// costs nothing, one that is very late costs one inline read.
pub const STALE_MS: u64 = 2 * POLL_MS;
/// Slack on top of the bound for a wall clock stepped back by NTP during a hold.
pub const HOLD_MARGIN_MS: u64 = 5;

/// The earliest host time at which an answer reporting a `km/meta` write may go out:
/// `written_ms` is a clock reading taken after the write returned.
pub fn visible_at(written_ms: u64) -> u64 {
    written_ms.saturating_add(STALE_MS + 1 + HOLD_MARGIN_MS)
}

/// The running `km/meta` and its CAS token; `None`: no key set loaded.
pub type MetaRead = Option<(Meta, u32)>;

/// One worker's last read of `km/meta` and when it was taken.
#[derive(Debug, Default, Clone, Copy)]
pub struct MetaCopy {
    /// (what was read, a clock reading taken before the read); `None`: nothing yet.
    last: Option<(MetaRead, u64)>,
}

impl MetaCopy {
    /// The copy if it was read at most [`STALE_MS`] before `now_ms`. A copy from "the
    /// future" (the clock stepped back) is stale too.
    pub fn fresh(&self, now_ms: u64) -> Option<MetaRead> {
        let (read, at) = self.last?;
        (now_ms >= at && now_ms - at <= STALE_MS).then_some(read)
    }

    /// Remembers `read`, taken after the clock said `read_at_ms`.
    pub fn store(&mut self, read: MetaRead, read_at_ms: u64) {
        self.last = Some((read, read_at_ms));
    }

    /// Whether the tick should re-read: the copy is half a poll period old or more (a
    /// request that just read inline spares the tick its read).
    pub fn due(&self, now_ms: u64) -> bool {
        match self.last {
            Some((_, at)) => now_ms < at || now_ms - at >= POLL_MS / 2,
            None => true,
        }
    }

    /// Forgets the copy: the next request reads `km/meta` inline.
    pub fn invalidate(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_700_000_000_000;

    fn meta(version: u64) -> MetaRead {
        Some((
            Meta {
                version,
                ..Default::default()
            },
            7,
        ))
    }

    #[test]
    fn a_copy_is_used_up_to_the_staleness_bound_and_never_from_the_future() {
        let mut c = MetaCopy::default();
        assert_eq!(c.fresh(T), None, "nothing read yet");
        c.store(meta(3), T);
        assert_eq!(c.fresh(T), Some(meta(3)));
        assert_eq!(c.fresh(T + STALE_MS), Some(meta(3)));
        assert_eq!(c.fresh(T + STALE_MS + 1), None);
        assert_eq!(c.fresh(T - 1), None, "clock stepped back: read inline");
        // "No key set" is remembered like any other read.
        c.store(None, T);
        assert_eq!(c.fresh(T + 1), Some(None));
        c.invalidate();
        assert_eq!(c.fresh(T), None);
    }

    #[test]
    fn the_tick_rereads_a_copy_half_a_period_old() {
        let mut c = MetaCopy::default();
        assert!(c.due(T));
        c.store(meta(1), T);
        assert!(!c.due(T + POLL_MS / 2 - 1));
        assert!(c.due(T + POLL_MS / 2));
        assert!(c.due(T - 1));
    }

    /// The contract between the two sides, over every offset of the copy's read and
    /// every request start around the answer: a request that starts at or after the
    /// answer never uses a copy read before the write.
    #[test]
    fn no_request_after_a_held_answer_uses_a_copy_read_before_the_write() {
        let written = T + 3; // a clock reading taken after the write
        let answer = visible_at(written);
        assert!(answer - written > STALE_MS, "held longer than the staleness bound");
        // Every copy read at or before the write (its clock reading taken before the
        // read, so at most `written`).
        for read_at in written - 3 * STALE_MS..=written {
            let mut c = MetaCopy::default();
            c.store(meta(1), read_at);
            for start in answer..answer + 3 * STALE_MS {
                assert_eq!(c.fresh(start), None, "read at {read_at}, request at {start}");
            }
        }
        // Whereas a request just before the answer may still use it: the hold is needed.
        let mut c = MetaCopy::default();
        c.store(meta(1), written);
        assert!(c.fresh(written + STALE_MS).is_some());
    }
}
