pub mod outbound;
pub mod pull;
