//! What every key-set update takes and returns.

use crate::core::keyset::meta::Meta;
use crate::core::store::StoreError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyError {
    /// The pushed version is not newer than the running one.
    Stale {
        running: u64,
        pushed: u64,
    },
    /// A delta needs a running set to apply to.
    NoKeySet,
    /// Another writer holds the lock, or changed the set under us: retry.
    Busy,
    /// A delta op refers to a key that is not in the running set.
    UnknownKey {
        at: String,
        id: String,
    },
    /// A delta upserts a key whose plan is neither in the running set nor set by the
    /// delta (the set was replaced after the delta was validated): never applied, since
    /// a key without its plan would have no limits.
    UnknownPlan {
        at: String,
        id: String,
        plan: String,
    },
    Host,
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Stale { running, pushed } => {
                write!(
                    f,
                    "version {pushed} is not newer than the running version {running} (force to override)"
                )
            }
            ApplyError::NoKeySet => f.write_str("no key set is loaded: push a full snapshot first"),
            ApplyError::Busy => f.write_str("another key-set update is in progress; retry"),
            ApplyError::UnknownKey { at, id } => {
                write!(f, "{at}: no key with id \"{id}\" in the running set")
            }
            ApplyError::UnknownPlan { at, id, plan } => write!(
                f,
                "{at} (id \"{id}\").plan: unknown plan '{plan}' (not in the running set nor set by this delta)"
            ),
            ApplyError::Host => f.write_str("shared-data write failed"),
        }
    }
}

impl From<StoreError> for ApplyError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::CasMismatch => ApplyError::Busy,
            StoreError::Host => ApplyError::Host,
        }
    }
}

/// Result of a successful update.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub version: u64,
    pub keys: u64,
    pub written: u64,
    pub removed: u64,
}

/// Options every update takes.
#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    pub force: bool,
    pub now_ms: u64,
}

/// Refuses a version that is not newer than the running one, unless forced.
pub(crate) fn check_version(running: Option<&Meta>, pushed: u64, force: bool) -> Result<(), ApplyError> {
    match running {
        Some(m) if !force && pushed <= m.version => Err(ApplyError::Stale {
            running: m.version,
            pushed,
        }),
        _ => Ok(()),
    }
}
