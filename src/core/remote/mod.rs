pub mod breaker;
pub mod fleet_health;
pub mod fleet_protocol;
pub mod outbound;
pub mod pull;
