//! keymeter: API keys, rate limits and metering at the edge, as an Envoy proxy-wasm filter.
//!
//! `core` is pure and host-testable; `adapter` is the thin proxy-wasm layer and only
//! exists in the wasm build.
pub mod core;

#[cfg(target_arch = "wasm32")]
mod adapter;
