//! A key as the filter sees it: the compiled, validated form stored per key in shared
//! data (`keyset::entry_format`: ~30 bytes for a typical key), so a request copies one
//! small entry.

use crate::core::auth::cidr::Cidr;
use crate::core::auth::scope::{self, Scope};
use crate::core::limits::plan::Limits;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// What the key set keeps of a key's sha256: its first 128 bits. Finding a secret that
/// matches a stored hash still takes 2^128 work; the other half would cost 16 bytes per
/// key in every Envoy (see `keyset::entry_format`).
pub type StoredHash = [u8; 16];

/// The stored form of a full sha256.
pub fn stored_hash(sha256: &[u8; 32]) -> StoredHash {
    let mut h = StoredHash::default();
    h.copy_from_slice(&sha256[..16]);
    h
}

/// Serde: the delta journal (`km/delta`) carries compiled records; entries use
/// `keyset::entry_format`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    /// The first 128 bits of sha256 of the full key; the secret itself is never stored.
    pub hash: StoredHash,
    pub consumer: String,
    pub plan: String,
    pub enabled: bool,
    /// Unix seconds; the key is refused before this instant.
    pub not_before: Option<i64>,
    /// Unix seconds; the key is refused from this instant on.
    pub expires_at: Option<i64>,
    /// Empty: the key may call everything.
    pub scopes: Vec<Scope>,
    /// Empty: any client address.
    pub cidrs: Vec<Cidr>,
    /// Forwarded to the backend when the plugin config selects the name.
    pub metadata: Vec<(String, String)>,
    /// Identity that rate-limit state and usage belong to. A rotated key inherits its
    /// predecessor's lineage so limits and usage carry over; defaults to `id`.
    pub lineage: Option<String>,
    /// Per-key replacement of the plan's limits.
    pub limits: Option<Limits>,
}

/// Why a key with a correct secret is still refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Disabled,
    NotYetValid,
    Expired,
    /// Method or path outside the key's scopes (403).
    OutOfScope,
    /// Client address outside the key's CIDRs (403).
    AddressNotAllowed,
}

impl KeyRecord {
    /// Checks everything but the secret, in the order that reveals least: a disabled or
    /// expired key says so before any authorization detail.
    pub fn admit(&self, now_secs: i64, method: &str, path: &str, peer: Option<IpAddr>) -> Result<(), Refusal> {
        if !self.enabled {
            return Err(Refusal::Disabled);
        }
        if self.not_before.is_some_and(|t| now_secs < t) {
            return Err(Refusal::NotYetValid);
        }
        if self.expires_at.is_some_and(|t| now_secs >= t) {
            return Err(Refusal::Expired);
        }
        if !scope::allowed(&self.scopes, method, path) {
            return Err(Refusal::OutOfScope);
        }
        if !self.cidrs.is_empty() && !peer.is_some_and(|ip| self.cidrs.iter().any(|c| c.contains(ip))) {
            return Err(Refusal::AddressNotAllowed);
        }
        Ok(())
    }

    pub fn lineage(&self) -> &str {
        self.lineage.as_deref().unwrap_or(&self.id)
    }

    pub fn metadata(&self, name: &str) -> Option<&str> {
        self.metadata.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn record() -> KeyRecord {
        KeyRecord {
            id: "AbCdEf012345".into(),
            hash: [1; 16],
            consumer: "acme".into(),
            plan: "pro".into(),
            enabled: true,
            not_before: Some(100),
            expires_at: Some(200),
            scopes: vec![Scope::new(&["GET".into()], "/v1").unwrap()],
            cidrs: vec![Cidr::parse("10.0.0.0/8").unwrap()],
            metadata: vec![("tier".into(), "gold".into())],
            lineage: None,
            limits: None,
        }
    }

    #[test]
    fn admit_rules() {
        let r = record();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(r.admit(150, "GET", "/v1/x", Some(ip)), Ok(()));
        assert_eq!(r.admit(99, "GET", "/v1/x", Some(ip)), Err(Refusal::NotYetValid));
        assert_eq!(r.admit(200, "GET", "/v1/x", Some(ip)), Err(Refusal::Expired));
        assert_eq!(r.admit(150, "POST", "/v1/x", Some(ip)), Err(Refusal::OutOfScope));
        assert_eq!(
            r.admit(150, "GET", "/v1/x", Some("11.0.0.1".parse().unwrap())),
            Err(Refusal::AddressNotAllowed)
        );
        assert_eq!(r.admit(150, "GET", "/v1/x", None), Err(Refusal::AddressNotAllowed));
        let off = KeyRecord {
            enabled: false,
            ..r.clone()
        };
        assert_eq!(off.admit(150, "GET", "/v1/x", Some(ip)), Err(Refusal::Disabled));
        assert_eq!(r.lineage(), "AbCdEf012345");
        assert_eq!(r.metadata("tier"), Some("gold"));
    }
}
