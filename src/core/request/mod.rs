//! The request decision: one pure function that authenticates a request, authorizes it,
//! applies its limits and says what the adapter must do, asking the host for each field
//! only when it needs it.
//!
//! The adapter implements [`Fetch`] over proxy-wasm (each method is one host call) and
//! applies the returned [`Decision`]; host tests implement it with a counting fake, so
//! the exact host-call sequence of every path is asserted, not just documented.

mod decide;
mod decision;
mod fetch;
mod jwt;
mod key_cache;
pub mod meta_copy;
mod plans_cache;
#[cfg(test)]
mod tests;

pub use decide::decide;
pub use decision::{Caller, Decision, FleetLimits, Refused, Strip, Unauthenticated};
pub use fetch::Fetch;
pub use key_cache::KeyCache;
pub use plans_cache::PlansCache;
