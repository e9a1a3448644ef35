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
        #[cfg(feature = "fault-injection")]
        let faulted = super::fault::before_set(key, value, cas)?;
        #[cfg(feature = "fault-injection")]
        let value = &*faulted;
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|s| match s {
            Status::CasMismatch => StoreError::CasMismatch,
            _ => StoreError::Host,
        })
    }
}

/// Wall-clock milliseconds since the Unix epoch, from the host (0 if it cannot say;
/// the request path uses `try_now_ms` and fails closed instead).
pub fn now_ms() -> u64 {
    try_now_ms().unwrap_or(0)
}

/// Wall-clock milliseconds since the Unix epoch, `None` when the host clock fails.
pub fn try_now_ms() -> Option<u64> {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
}

/// The downstream client's address (Envoy's `source.address`).
pub fn peer_ip() -> Option<IpAddr> {
    let raw = hostcalls::get_property(vec!["source", "address"]).ok()??;
    crate::core::auth::cidr::parse_peer(std::str::from_utf8(&raw).ok()?)
}

/// The stream's dynamic metadata as Envoy serializes it for `["metadata"]`: one
/// `envoy.config.core.v3.Metadata` protobuf (decoded by `core::auth::jwt::metadata`).
pub fn dynamic_metadata() -> Option<Vec<u8>> {
    hostcalls::get_property(vec!["metadata"]).ok()?
}

/// Where this Envoy process's identity for usage collectors lives: shared data is wiped
/// with the process, so a new id here means "counters restarted from zero".
pub const INSTANCE: &str = "km/instance";

/// Creates the process's instance record (id and start time) if it does not exist yet.
pub fn ensure_instance() {
    let store = HostStore;
    if store.get(INSTANCE).0.is_some_and(|v| !v.is_empty()) {
        return;
    }
    let now = hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    let seed = format!("{}:{:p}", now.as_nanos(), &store);
    let id = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(seed.as_bytes())[..8]);
    let rec = serde_json::json!({
        "instance_id": id,
        "started_at": crate::core::time::format_rfc3339(now.as_secs() as i64),
    });
    let _ = store.set(INSTANCE, rec.to_string().as_bytes(), None);
}

/// A host buffer (a request body, an HTTP call's response body) read in slices as a
/// parser asks for them, so a large document is never copied whole into the VM.
pub struct HostBuffer {
    kind: proxy_wasm::types::BufferType,
    offset: usize,
    size: usize,
}

impl HostBuffer {
    /// A buffered reader over the first `size` bytes of buffer `kind`, 64 KiB at a time.
    pub fn reader(kind: proxy_wasm::types::BufferType, size: usize) -> std::io::BufReader<HostBuffer> {
        std::io::BufReader::with_capacity(64 * 1024, HostBuffer { kind, offset: 0, size })
    }
}

impl std::io::Read for HostBuffer {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.size.saturating_sub(self.offset));
        if n == 0 {
            return Ok(0);
        }
        let chunk = hostcalls::get_buffer(self.kind, self.offset, n)
            .map_err(|s| std::io::Error::other(format!("reading a host buffer: {s:?}")))?
            .unwrap_or_default();
        let got = chunk.len().min(n);
        buf[..got].copy_from_slice(&chunk[..got]);
        self.offset += got;
        Ok(got)
    }
}

/// Header values as text. The SDK's own string getters `unwrap()` a UTF-8 conversion,
/// so one request carrying a non-UTF-8 byte (HTTP allows obs-text) would panic and
/// kill the worker's VM: every header is read as bytes here, and invalid bytes become
/// U+FFFD, which no key, path or method matches.
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

pub fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(proxy_wasm::types::MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
        .map(text)
}

pub fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(proxy_wasm::types::MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
        .map(text)
}

/// All headers of an HTTP call's response (names are tokens, values may be any bytes).
pub fn call_response_headers() -> Vec<(String, String)> {
    hostcalls::get_map_bytes(proxy_wasm::types::MapType::HttpCallResponseHeaders)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, text(v)))
        .collect()
}

/// Records an applied key-set update (push, upload, delta or pull) in `km/status` for
/// the admin status, and logs it.
pub fn record_update(source: &str, now_ms: u64, report: &crate::core::keyset::apply::ApplyReport) {
    let record = serde_json::json!({
        "source": source,
        "at": crate::core::time::format_rfc3339((now_ms / 1000) as i64),
        "result": report,
    });
    let _ = HostStore.set(crate::core::keyset::names::STATUS, record.to_string().as_bytes(), None);
    log::info!(
        "keymeter: key set {source} applied: version {} keys {} removed {}",
        report.version,
        report.keys,
        report.removed
    );
}
