//! Fault injection for the Envoy tests (`wasm-tests/test_faults.py`), compiled only with
//! the cargo feature `fault-injection`: the production `keymeter.wasm` has none of this
//! code, and its configuration parser rejects the `fault_injection` field as unknown.
//!
//! The faults sit in the shared-data store (`HostStore::set`), so the core runs
//! unchanged and meets them where a real host failure would hit it:
//!
//! ```json
//! "fault_injection": {
//!   "panic_on_set": "k/PANICPANIC01",            // panic writing this entry (VM dies)
//!   "cas_mismatch": {"prefix": "km/uidx/", "times": 100},  // CAS writes fail
//!   "lock_ttl_ms": 1500                           // writer-lock leases end this soon
//! }
//! ```
//!
//! Rules are per VM (one per worker, shared by the root contexts of every role in it):
//! each plugin configuration adds the rules it names.

use crate::core::keyset::names::LOCK;
use crate::core::store::StoreError;
use serde::Deserialize;
use std::borrow::Cow;
use std::cell::RefCell;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Faults {
    panic_on_set: Option<String>,
    cas_mismatch: Option<CasMismatch>,
    lock_ttl_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CasMismatch {
    prefix: String,
    /// How many CAS writes under `prefix` fail before they succeed again.
    times: u64,
}

thread_local! {
    static FAULTS: RefCell<Faults> = RefCell::new(Faults::default());
}

/// Takes `fault_injection` out of the plugin configuration and arms its rules; returns
/// the configuration without it (what `Config::parse` gets), or an error message.
pub fn configure(raw: &[u8]) -> Result<Vec<u8>, String> {
    let Ok(serde_json::Value::Object(mut doc)) = serde_json::from_slice::<serde_json::Value>(raw) else {
        return Ok(raw.to_vec()); // not an object: Config::parse reports it
    };
    let Some(f) = doc.remove("fault_injection") else {
        return Ok(raw.to_vec());
    };
    let f: Faults = serde_json::from_value(f).map_err(|e| format!("fault_injection: {e}"))?;
    log::warn!("keymeter: FAULT INJECTION armed: {f:?}");
    FAULTS.with(|cur| {
        let mut cur = cur.borrow_mut();
        if f.panic_on_set.is_some() {
            cur.panic_on_set = f.panic_on_set;
        }
        if f.cas_mismatch.is_some() {
            cur.cas_mismatch = f.cas_mismatch;
        }
        if f.lock_ttl_ms.is_some() {
            cur.lock_ttl_ms = f.lock_ttl_ms;
        }
    });
    Ok(serde_json::to_vec(&doc).expect("re-encodes"))
}

/// Called by `HostStore::set` before writing: the value to write, or the failure to
/// report instead. May panic (that is the point of `panic_on_set`).
pub fn before_set<'v>(key: &str, value: &'v [u8], cas: Option<u32>) -> Result<Cow<'v, [u8]>, StoreError> {
    FAULTS.with(|f| {
        let mut f = f.borrow_mut();
        if f.panic_on_set.as_deref() == Some(key) {
            panic!("fault injection: panic writing {key}");
        }
        if let (Some(c), Some(_)) = (f.cas_mismatch.as_mut(), cas) {
            if c.times > 0 && key.starts_with(&c.prefix) {
                c.times -= 1;
                if c.times == 0 {
                    log::warn!(
                        "keymeter: fault injection: last injected CAS mismatch under {}",
                        c.prefix
                    );
                }
                return Err(StoreError::CasMismatch);
            }
        }
        if let Some(ttl) = f.lock_ttl_ms {
            // The lock value starts with its holder's deadline (u64 LE): cap it at now +
            // ttl, so the real expiry logic runs on a test's time scale.
            if key == LOCK && value.len() >= 8 {
                let deadline = u64::from_le_bytes(value[..8].try_into().expect("8 bytes"));
                let cap = super::host::now_ms() + ttl;
                if deadline > cap {
                    let mut v = value.to_vec();
                    v[..8].copy_from_slice(&cap.to_le_bytes());
                    return Ok(Cow::Owned(v));
                }
            }
        }
        Ok(Cow::Borrowed(value))
    })
}
