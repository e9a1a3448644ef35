//! What the request decision reads from the host, one method per host read, so the
//! decision asks for exactly what it needs and a test can count every read.

use crate::core::keyset::meta::Meta;
use crate::core::limits::plan::Plan;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::rc::Rc;

/// The host reads of one request. Each method is one host call in the adapter (except
/// `plans`, served from the worker's cache and read only when `km/meta` says the plans
/// changed). Limit state is read and written through the `Store` given to `decide`.
pub trait Fetch {
    /// The configured API-key header (`x-api-key` by default).
    fn api_key_header(&mut self, name: &str) -> Option<String>;
    fn authorization(&mut self) -> Option<String>;
    /// `:path`, query included.
    fn path(&mut self) -> Option<String>;
    fn method(&mut self) -> Option<String>;
    /// The downstream peer address (Envoy's `source.address`).
    fn peer_ip(&mut self) -> Option<IpAddr>;
    /// Wall-clock milliseconds since the Unix epoch; `None` when the host cannot say.
    fn now_ms(&mut self) -> Option<u64>;
    /// The running key-set meta (`km/meta`) and its CAS token (which changes with every
    /// write of it); `None` when no key set is loaded.
    fn meta(&mut self) -> Option<(Meta, u32)>;
    /// The raw per-key entry (`k/<id>`); `None` or empty when there is none.
    fn key_entry(&mut self, id: &str) -> Option<Vec<u8>>;
    /// The plans active under `meta`.
    fn plans(&mut self, meta: &Meta) -> Rc<BTreeMap<String, Plan>>;
    /// The stream's dynamic metadata, serialized (`get_property(["metadata"])`, an
    /// `envoy.config.core.v3.Metadata` protobuf): where Envoy's jwt_authn puts a
    /// verified JWT payload. Read only with a `jwt` config and no deciding API key.
    fn dynamic_metadata(&mut self) -> Option<Vec<u8>>;
}
