pub mod counts;
pub mod export;
pub mod usage;
