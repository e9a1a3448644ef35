//! The thin proxy-wasm layer: everything here touches the host (headers, shared data,
//! time, metrics); every decision is delegated to `crate::core`.

mod admin;
mod export;
#[cfg(feature = "fault-injection")]
mod fault;
mod filter;
mod fleet;
mod host;
mod metering;
mod root;
mod service;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> { Box::new(root::Root::default()) });
}}
