pub mod fleet;
pub mod fleet_loans;
pub mod fleet_slots;
pub mod fleet_view;
pub mod lease;
pub mod limiter;
pub mod plan;
pub mod quota;
pub mod ratelimit_headers;
pub mod reclaim;
pub mod subject_table;
#[cfg(test)]
pub mod test_support;
pub mod token_bucket;
pub mod worker_lease;
