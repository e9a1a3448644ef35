//! Plans for host tests: one bucket or one monthly quota, without the struct noise.

use crate::core::limits::plan::{NamedBucket, NamedQuota};
use crate::core::limits::quota::Period;
use crate::core::limits::token_bucket::BucketLimit;

/// One bucket named `b`: `rate` tokens per `per_ms`, up to `burst`.
pub fn bucket(rate: u64, per_ms: u64, burst: u64) -> Vec<NamedBucket> {
    vec![NamedBucket {
        name: "b".into(),
        limit: BucketLimit {
            rate,
            interval_ms: per_ms,
            burst,
        },
    }]
}

/// One calendar-month quota named `m`.
pub fn monthly(limit: u64) -> Vec<NamedQuota> {
    vec![NamedQuota {
        name: "m".into(),
        period: Period::Month,
        limit,
    }]
}
