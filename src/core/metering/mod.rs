pub mod export;
pub mod usage;
