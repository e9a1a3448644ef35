pub mod fleet;
pub mod lease;
pub mod limiter;
pub mod plan;
pub mod quota;
pub mod ratelimit_headers;
pub mod subject_table;
pub mod token_bucket;
