//! Counters for `GET /metrics` (Prometheus text format), kept in atomics so handlers
//! never lock.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    pub lease_calls: AtomicU64,
    pub lease_replays: AtomicU64,
    pub take_calls: AtomicU64,
    pub units_granted: AtomicU64,
    pub bad_requests: AtomicU64,
    pub redis_errors: AtomicU64,
    pub redis_timeouts: AtomicU64,
    /// Sum of script round-trip times, microseconds (with `lease_calls`: the mean).
    pub redis_micros: AtomicU64,
}

impl Metrics {
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Relaxed);
    }

    pub fn render(&self) -> String {
        let mut s = String::with_capacity(1024);
        for (name, help, c) in [
            (
                "keymeter_limitd_lease_calls_total",
                "lease calls answered from Redis",
                &self.lease_calls,
            ),
            (
                "keymeter_limitd_lease_replays_total",
                "calls ignored as replayed or reordered (seq not newer)",
                &self.lease_replays,
            ),
            (
                "keymeter_limitd_units_granted_total",
                "units granted to nodes",
                &self.units_granted,
            ),
            (
                "keymeter_limitd_bad_requests_total",
                "requests refused with 400",
                &self.bad_requests,
            ),
            (
                "keymeter_limitd_redis_errors_total",
                "Redis calls that failed",
                &self.redis_errors,
            ),
            (
                "keymeter_limitd_redis_timeouts_total",
                "Redis calls that timed out",
                &self.redis_timeouts,
            ),
            (
                "keymeter_limitd_redis_seconds_sum",
                "time spent in lease scripts",
                &self.redis_micros,
            ),
        ] {
            let v = c.load(Relaxed);
            let _ = writeln!(s, "# HELP {name} {help}");
            if name.ends_with("_sum") {
                let _ = writeln!(s, "# TYPE {name} counter\n{name} {}", v as f64 / 1e6);
            } else {
                let _ = writeln!(s, "# TYPE {name} counter\n{name} {v}");
            }
        }
        s
    }
}
