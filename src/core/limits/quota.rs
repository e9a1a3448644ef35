//! Period quotas ("1000 requests per day") that reset on UTC calendar boundaries.
//!
//! Unlike the token bucket, a quota is a billing-style allowance: customers expect it to
//! reset at midnight UTC, on Monday, or on the 1st of the month, not on a rolling window.
//! The state is two integers so workers can share it with compare-and-swap like the
//! bucket state; [`consume`] is pure and allocation-free.

use serde::{Deserialize, Serialize};

use crate::core::time::{civil_from_days, days_from_civil, SECS_PER_DAY};

/// Calendar period a quota resets on, all in UTC.
///
/// Serialized lowercase (`"day"`, `"week"`, `"month"`) for plan documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// 00:00:00 UTC to the next 00:00:00 UTC.
    Day,
    /// ISO 8601 week: Monday 00:00 UTC to the next Monday 00:00 UTC.
    Week,
    /// Calendar month: the 1st 00:00 UTC to the 1st of the next month.
    Month,
}

/// The `[start, end)` unix-second bounds of the `period` containing `now_secs`.
///
/// Quota state is keyed by the period start, and `end - now` is the reset time sent to
/// clients. Defined for every `i64`; at the extreme ends of the range the bounds saturate
/// at `i64::MIN` / `i64::MAX` instead of overflowing.
pub fn period_bounds(period: Period, now_secs: i64) -> (i64, i64) {
    let today = now_secs.div_euclid(SECS_PER_DAY);
    let (start_day, end_day) = match period {
        Period::Day => (today, today.saturating_add(1)),
        Period::Week => {
            // 1970-01-01 was a Thursday: day 0 is 3 days after a Monday.
            let monday = today - (today + 3).rem_euclid(7);
            (monday, monday.saturating_add(7))
        }
        Period::Month => {
            let (y, m, _) = civil_from_days(today);
            let (ny, nm) = if m == 12 { (y.saturating_add(1), 1) } else { (y, m + 1) };
            (days_from_civil(y, m, 1), days_from_civil(ny, nm, 1))
        }
    };
    (
        start_day.saturating_mul(SECS_PER_DAY),
        end_day.saturating_mul(SECS_PER_DAY),
    )
}

/// Shared per-key quota state: how much was used in the period starting at
/// `period_start`.
///
/// The default (zero) state is from 1970, so it rolls over to an unused current period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaState {
    /// Start (unix seconds) of the period `used` belongs to.
    pub period_start: i64,
    /// Units consumed in that period.
    pub used: u64,
}

/// Outcome of [`consume`], with what `RateLimit` headers need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaDecision {
    /// Whether the request fits in the quota (its cost has been counted).
    pub allowed: bool,
    /// Units left in the period after this request.
    pub remaining: u64,
    /// Seconds until the period of the (returned) state ends and the quota resets.
    pub reset_secs: u64,
}

/// Counts `cost` units against a quota of `limit` per `period` at `now_secs`, returning
/// the decision and the state to store.
///
/// * A state from an earlier period rolls over to zero use in the current period.
/// * A state from a later period (the clock went back) is kept as is and its use still
///   counts: resetting would hand out a free quota, and the clock will catch up. Its
///   `reset_secs` is measured to the end of that later period.
/// * A request is allowed when `used + cost <= limit`; cost 0 is always allowed. Denied
///   requests do not count, but the returned state may still be the rolled-over one
///   (storing it is harmless).
pub fn consume(
    limit: u64,
    period: Period,
    state: &QuotaState,
    now_secs: i64,
    cost: u64,
) -> (QuotaDecision, QuotaState) {
    let (start, end) = period_bounds(period, now_secs);
    let (current, end) = if state.period_start < start {
        (
            QuotaState {
                period_start: start,
                used: 0,
            },
            end,
        )
    } else if state.period_start < end {
        (*state, end)
    } else {
        (*state, period_bounds(period, state.period_start).1)
    };
    let reset_secs = u64::try_from(end.saturating_sub(now_secs)).unwrap_or(0);

    let total = current.used.checked_add(cost).filter(|&t| t <= limit);
    let (allowed, next) = match total {
        Some(used) => (
            true,
            QuotaState {
                period_start: current.period_start,
                used,
            },
        ),
        None => (false, current),
    };
    let decision = QuotaDecision {
        allowed,
        remaining: limit.saturating_sub(next.used),
        reset_secs,
    };
    (decision, next)
}

/// Gives back `units` counted at `taken_at_secs` and never spent (a worker's lease
/// returning what it did not use). Only into the period they were counted in: units of
/// an earlier period are simply dropped (that period is over; crediting them to the
/// current one would hand out units nobody paid for).
pub fn give_back(period: Period, state: &QuotaState, taken_at_secs: i64, units: u64) -> QuotaState {
    if state.period_start != period_bounds(period, taken_at_secs).0 {
        return *state;
    }
    QuotaState {
        period_start: state.period_start,
        used: state.used.saturating_sub(units),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::time::parse_rfc3339;

    #[test]
    fn units_go_back_only_into_their_own_period() {
        let d1 = t("2024-03-10T12:00:00Z");
        let (_, s) = consume(10, Period::Day, &QuotaState::default(), d1, 7);
        assert_eq!(give_back(Period::Day, &s, d1 + 5, 3).used, 4);
        assert_eq!(give_back(Period::Day, &s, d1, 100).used, 0, "never below zero");
        // Taken yesterday: dropped, whatever today's state says.
        assert_eq!(give_back(Period::Day, &s, d1 - 86_400, 3), s);
        let (_, next_day) = consume(10, Period::Day, &s, d1 + 86_400, 1);
        assert_eq!(give_back(Period::Day, &next_day, d1, 3), next_day);
    }

    fn t(s: &str) -> i64 {
        parse_rfc3339(s).unwrap()
    }

    fn bounds(period: Period, now: &str) -> (i64, i64) {
        period_bounds(period, t(now))
    }

    fn qd(allowed: bool, remaining: u64, reset_secs: u64) -> QuotaDecision {
        QuotaDecision {
            allowed,
            remaining,
            reset_secs,
        }
    }

    #[test]
    fn serde_names_are_lowercase() {
        assert_eq!(serde_json::to_string(&Period::Day).unwrap(), "\"day\"");
        assert_eq!(serde_json::to_string(&Period::Week).unwrap(), "\"week\"");
        assert_eq!(serde_json::to_string(&Period::Month).unwrap(), "\"month\"");
        assert_eq!(serde_json::from_str::<Period>("\"month\"").unwrap(), Period::Month);
        assert!(serde_json::from_str::<Period>("\"Month\"").is_err());
        assert!(serde_json::from_str::<Period>("\"year\"").is_err());
    }

    #[test]
    fn day_bounds() {
        let day = (t("2024-03-10T00:00:00Z"), t("2024-03-11T00:00:00Z"));
        assert_eq!(bounds(Period::Day, "2024-03-10T00:00:00Z"), day);
        assert_eq!(bounds(Period::Day, "2024-03-10T13:14:15Z"), day);
        assert_eq!(bounds(Period::Day, "2024-03-10T23:59:59Z"), day);
        assert_eq!(
            bounds(Period::Day, "2024-02-29T12:00:00Z"),
            (t("2024-02-29T00:00:00Z"), t("2024-03-01T00:00:00Z"))
        );
        assert_eq!(bounds(Period::Day, "1969-12-31T23:59:59Z"), (-86_400, 0));
    }

    #[test]
    fn week_bounds_are_iso_weeks() {
        // 2024-03-10 is a Sunday: its week began Monday 2024-03-04.
        let w = (t("2024-03-04T00:00:00Z"), t("2024-03-11T00:00:00Z"));
        assert_eq!(bounds(Period::Week, "2024-03-04T00:00:00Z"), w);
        assert_eq!(bounds(Period::Week, "2024-03-07T12:00:00Z"), w);
        assert_eq!(bounds(Period::Week, "2024-03-10T23:59:59Z"), w);
        assert_eq!(bounds(Period::Week, "2024-03-11T00:00:00Z").0, w.1);
        // Across the year end: 2020-W53 runs Mon 2020-12-28 to Sun 2021-01-03.
        let w53 = (t("2020-12-28T00:00:00Z"), t("2021-01-04T00:00:00Z"));
        assert_eq!(bounds(Period::Week, "2020-12-31T10:00:00Z"), w53);
        assert_eq!(bounds(Period::Week, "2021-01-01T00:00:00Z"), w53);
        assert_eq!(bounds(Period::Week, "2021-01-03T23:59:59Z"), w53);
        // 2025-W01 starts on Monday 2024-12-30.
        let w1 = (t("2024-12-30T00:00:00Z"), t("2025-01-06T00:00:00Z"));
        assert_eq!(bounds(Period::Week, "2025-01-01T08:00:00Z"), w1);
        assert_eq!(bounds(Period::Week, "2024-12-30T00:00:00Z"), w1);
        assert_eq!(
            bounds(Period::Week, "2024-12-29T23:59:59Z").1,
            t("2024-12-30T00:00:00Z")
        );
        // The epoch (a Thursday) and before it.
        assert_eq!(period_bounds(Period::Week, 0), (-3 * 86_400, 4 * 86_400));
        assert_eq!(
            period_bounds(Period::Week, -3 * 86_400 - 1),
            (-10 * 86_400, -3 * 86_400)
        );
    }

    #[test]
    fn month_bounds() {
        assert_eq!(
            bounds(Period::Month, "2024-01-31T23:59:59Z"),
            (t("2024-01-01T00:00:00Z"), t("2024-02-01T00:00:00Z"))
        );
        assert_eq!(
            bounds(Period::Month, "2024-02-01T00:00:00Z"),
            (t("2024-02-01T00:00:00Z"), t("2024-03-01T00:00:00Z"))
        );
        assert_eq!(
            bounds(Period::Month, "2023-12-31T23:59:59Z"),
            (t("2023-12-01T00:00:00Z"), t("2024-01-01T00:00:00Z"))
        );
        assert_eq!(
            bounds(Period::Month, "2024-01-01T00:00:00Z"),
            (t("2024-01-01T00:00:00Z"), t("2024-02-01T00:00:00Z"))
        );
        // February lengths: 2024 leap, 2100 not, 2000 yes.
        let feb = |y: i64| {
            let (s, e) = period_bounds(Period::Month, t(&format!("{y}-02-15T00:00:00Z")));
            (e - s) / 86_400
        };
        assert_eq!(feb(2024), 29);
        assert_eq!(feb(2023), 28);
        assert_eq!(feb(2100), 28);
        assert_eq!(feb(2000), 29);
        assert_eq!(
            bounds(Period::Month, "2024-02-29T23:59:59Z").1,
            t("2024-03-01T00:00:00Z")
        );
        assert_eq!(
            bounds(Period::Month, "2100-02-28T23:59:59Z").1,
            t("2100-03-01T00:00:00Z")
        );
        assert_eq!(period_bounds(Period::Month, -1), (-31 * 86_400, 0));
    }

    #[test]
    fn bounds_never_panic_at_extremes() {
        for p in [Period::Day, Period::Week, Period::Month] {
            for now in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX - 1, i64::MAX] {
                let (s, e) = period_bounds(p, now);
                assert!(s <= now && now <= e, "{p:?} {now}: {s} {e}");
            }
        }
    }

    #[test]
    fn day_rollover() {
        let mut s = QuotaState::default();
        let d1 = t("2024-03-10T23:59:00Z");
        let (d, next) = consume(3, Period::Day, &s, d1, 2);
        assert_eq!(d, qd(true, 1, 60));
        assert_eq!(
            next,
            QuotaState {
                period_start: t("2024-03-10T00:00:00Z"),
                used: 2
            }
        );
        s = next;
        assert_eq!(consume(3, Period::Day, &s, d1 + 59, 2), (qd(false, 1, 1), s));
        // Midnight: a fresh day.
        let (d, next) = consume(3, Period::Day, &s, d1 + 60, 2);
        assert_eq!(d, qd(true, 1, 86_400));
        assert_eq!(next.period_start, d1 + 60);
        assert_eq!(next.used, 2);
    }

    #[test]
    fn week_rollover_across_year_end() {
        let s = QuotaState::default();
        let (_, s) = consume(10, Period::Week, &s, t("2020-12-31T12:00:00Z"), 9);
        // Sunday 2021-01-03 is still in the same ISO week.
        let sunday = t("2021-01-03T23:00:00Z");
        assert_eq!(consume(10, Period::Week, &s, sunday, 2), (qd(false, 1, 3600), s));
        let (d, next) = consume(10, Period::Week, &s, sunday, 1);
        assert_eq!(d, qd(true, 0, 3600));
        // Monday 2021-01-04: reset.
        let (d, next) = consume(10, Period::Week, &next, t("2021-01-04T00:00:00Z"), 1);
        assert_eq!(d, qd(true, 9, 7 * 86_400));
        assert_eq!(next.period_start, t("2021-01-04T00:00:00Z"));
    }

    #[test]
    fn month_rollover_at_month_and_year_ends() {
        let s = QuotaState::default();
        let (d, s) = consume(100, Period::Month, &s, t("2024-01-31T23:59:59Z"), 100);
        assert_eq!(d, qd(true, 0, 1));
        let (d, s) = consume(100, Period::Month, &s, t("2024-02-01T00:00:00Z"), 1);
        assert_eq!(d, qd(true, 99, 29 * 86_400));
        assert_eq!(s.period_start, t("2024-02-01T00:00:00Z"));
        // Leap day is still February.
        let (d, s) = consume(100, Period::Month, &s, t("2024-02-29T00:00:00Z"), 1);
        assert_eq!(d, qd(true, 98, 86_400));
        let (d, s) = consume(100, Period::Month, &s, t("2024-03-01T00:00:00Z"), 1);
        assert_eq!(d, qd(true, 99, 31 * 86_400));
        assert_eq!(s.period_start, t("2024-03-01T00:00:00Z"));

        let s = QuotaState::default();
        let (_, s) = consume(5, Period::Month, &s, t("2023-12-31T23:59:59Z"), 5);
        assert!(!consume(5, Period::Month, &s, t("2023-12-31T23:59:59Z"), 1).0.allowed);
        let (d, s) = consume(5, Period::Month, &s, t("2024-01-01T00:00:00Z"), 1);
        assert_eq!(d, qd(true, 4, 31 * 86_400));
        assert_eq!(s.period_start, t("2024-01-01T00:00:00Z"));
    }

    #[test]
    fn leap_day_periods() {
        let s = QuotaState::default();
        // 2024-02-29 is its own day.
        let (d, s1) = consume(1, Period::Day, &s, t("2024-02-29T00:00:00Z"), 1);
        assert_eq!(d, qd(true, 0, 86_400));
        assert!(consume(1, Period::Day, &s1, t("2024-03-01T00:00:00Z"), 1).0.allowed);
        // Feb 2100 has 28 days, Feb 2000 has 29.
        let (d, _) = consume(1, Period::Month, &s, t("2100-02-28T00:00:00Z"), 1);
        assert_eq!(d.reset_secs, 86_400);
        let (d, _) = consume(1, Period::Month, &s, t("2000-02-28T00:00:00Z"), 1);
        assert_eq!(d.reset_secs, 2 * 86_400);
    }

    #[test]
    fn exhaustion_exactly_at_limit() {
        let now = t("2024-05-05T05:05:05Z");
        let mut s = QuotaState::default();
        for left in (0..5).rev() {
            let (d, next) = consume(5, Period::Day, &s, now, 1);
            assert_eq!(d, qd(true, left, 68_095));
            s = next;
        }
        assert_eq!(s.used, 5);
        assert_eq!(consume(5, Period::Day, &s, now, 1), (qd(false, 0, 68_095), s));
        // Cost 0 is still allowed at the limit and changes nothing.
        assert_eq!(consume(5, Period::Day, &s, now, 0), (qd(true, 0, 68_095), s));
    }

    #[test]
    fn cost_greater_than_remaining_is_denied_without_counting() {
        let now = t("2024-05-05T00:00:00Z");
        let (_, s) = consume(10, Period::Day, &QuotaState::default(), now, 7);
        assert_eq!(consume(10, Period::Day, &s, now, 4), (qd(false, 3, 86_400), s));
        assert_eq!(consume(10, Period::Day, &s, now, u64::MAX), (qd(false, 3, 86_400), s));
        let (d, s) = consume(10, Period::Day, &s, now, 3);
        assert_eq!(d, qd(true, 0, 86_400));
        assert_eq!(s.used, 10);
        // A zero limit denies everything but cost 0.
        let fresh = QuotaState::default();
        assert!(!consume(0, Period::Day, &fresh, now, 1).0.allowed);
        assert!(consume(0, Period::Day, &fresh, now, 0).0.allowed);
    }

    #[test]
    fn denied_request_persists_only_the_rollover() {
        let old = QuotaState {
            period_start: t("2024-05-04T00:00:00Z"),
            used: 3,
        };
        let now = t("2024-05-05T12:00:00Z");
        let (d, next) = consume(2, Period::Day, &old, now, 5);
        assert_eq!(d, qd(false, 2, 43_200));
        assert_eq!(
            next,
            QuotaState {
                period_start: t("2024-05-05T00:00:00Z"),
                used: 0
            }
        );
    }

    #[test]
    fn future_state_is_kept_when_clock_goes_back() {
        let future = QuotaState {
            period_start: t("2024-05-06T00:00:00Z"),
            used: 4,
        };
        let now = t("2024-05-05T23:59:50Z");
        // Use from the later day still counts; reset is measured to the end of that day.
        let (d, next) = consume(5, Period::Day, &future, now, 1);
        assert_eq!(d, qd(true, 0, 86_410));
        assert_eq!(
            next,
            QuotaState {
                period_start: future.period_start,
                used: 5
            }
        );
        assert_eq!(consume(5, Period::Day, &next, now, 1), (qd(false, 0, 86_410), next));
        // Once the clock is back in that day, it behaves normally.
        let (d, _) = consume(5, Period::Day, &next, t("2024-05-06T00:00:10Z"), 1);
        assert_eq!(d, qd(false, 0, 86_390));
        // Extreme stored values do not panic.
        let weird = QuotaState {
            period_start: i64::MAX,
            used: u64::MAX,
        };
        let (d, s) = consume(5, Period::Month, &weird, 0, 1);
        assert_eq!((d.allowed, d.remaining), (false, 0));
        assert_eq!(s, weird);
    }

    #[test]
    fn unaligned_state_inside_the_current_period_counts_as_current() {
        let now = t("2024-05-05T12:00:00Z");
        let s = QuotaState {
            period_start: t("2024-05-05T06:00:00Z"),
            used: 1,
        };
        let (d, next) = consume(2, Period::Day, &s, now, 1);
        assert_eq!(d, qd(true, 0, 43_200));
        assert_eq!(next.used, 2);
    }
}
