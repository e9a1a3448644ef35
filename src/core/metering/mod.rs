pub mod counts;
pub mod credential;
pub mod export;
pub mod usage;
