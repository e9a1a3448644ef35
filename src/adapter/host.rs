//! Host services behind small functions: shared data as a `core::store::Store`, the
//! clock and the peer address.

use crate::core::store::{Store, StoreError};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;
use std::net::IpAddr;
use std::time::UNIX_EPOCH;

/// proxy-wasm shared data (process-wide, shared by every worker with our `vm_id`).
pub struct HostStore;

impl Store for HostStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, u32) {
        match hostcalls::get_shared_data(key) {
            Ok((v, cas)) => (v, cas.unwrap_or(0)),
            Err(_) => (None, 0),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|s| match s {
            Status::CasMismatch => StoreError::CasMismatch,
            _ => StoreError::Host,
        })
    }
}

/// Wall-clock milliseconds since the Unix epoch, from the host.
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// The downstream client's address (Envoy's `source.address`).
pub fn peer_ip() -> Option<IpAddr> {
    let raw = hostcalls::get_property(vec!["source", "address"]).ok()??;
    crate::core::cidr::parse_peer(std::str::from_utf8(&raw).ok()?)
}
