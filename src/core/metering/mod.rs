pub mod counts;
pub mod credential;
pub mod export;
pub mod label_cache;
pub mod usage;
