//! `km/lock`: serialises key-set writers (admin pushes on any worker, the pull
//! service), since shared-data CAS is not checked for keys that do not exist yet.

use crate::core::keyset::apply::ApplyError;
use crate::core::keyset::names::LOCK;
use crate::core::keyset::upload::reap_abandoned_upload;
use crate::core::store::Store;

pub(crate) const LOCK_TTL_MS: u64 = 60_000;

/// Holds `km/lock` for the duration of one update, or (owned by an upload id) across
/// the requests of a staged upload, renewed by each of them.
///
/// The value is the holder's deadline (u64 LE, ms) followed by its owner id (empty for a
/// one-shot writer). A holder past its deadline has lost the lock.
pub struct Lock<'a> {
    store: &'a dyn Store,
    release: bool,
}

fn read_lock(store: &dyn Store) -> (u64, String, u32) {
    let (v, cas) = store.get(LOCK);
    let v = v.unwrap_or_default();
    if v.len() < 8 {
        return (0, String::new(), cas);
    }
    let held_until = u64::from_le_bytes(v[..8].try_into().unwrap_or_default());
    (held_until, String::from_utf8_lossy(&v[8..]).into_owned(), cas)
}

fn lock_value(held_until: u64, owner: &str) -> Vec<u8> {
    let mut v = held_until.to_le_bytes().to_vec();
    v.extend_from_slice(owner.as_bytes());
    v
}

impl<'a> Lock<'a> {
    pub fn acquire(store: &'a dyn Store, now_ms: u64) -> Result<Lock<'a>, ApplyError> {
        Self::acquire_owned(store, now_ms, "")
    }

    pub(crate) fn acquire_owned(store: &'a dyn Store, now_ms: u64, owner: &str) -> Result<Lock<'a>, ApplyError> {
        let (v, _) = store.get(LOCK);
        if v.is_none() {
            // CAS is not checked on a missing key: create it first, then compete by CAS.
            store.set(LOCK, &0u64.to_le_bytes(), None)?;
        }
        let (held_until, _, cas) = read_lock(store);
        if held_until > now_ms {
            return Err(ApplyError::Busy);
        }
        store
            .set(LOCK, &lock_value(now_ms + LOCK_TTL_MS, owner), Some(cas))
            .map_err(|_| ApplyError::Busy)?;
        let lock = Lock { store, release: true };
        // A live upload always holds the lock: one still recorded now let it expire.
        reap_abandoned_upload(store)?;
        Ok(lock)
    }

    /// Extends the lock held by `owner` (a staged upload) from a later request.
    pub(crate) fn renew(store: &'a dyn Store, now_ms: u64, owner: &str) -> Result<Lock<'a>, ApplyError> {
        let (held_until, holder, cas) = read_lock(store);
        if owner.is_empty() || holder != owner || held_until <= now_ms {
            return Err(ApplyError::Busy);
        }
        store
            .set(LOCK, &lock_value(now_ms + LOCK_TTL_MS, owner), Some(cas))
            .map_err(|_| ApplyError::Busy)?;
        Ok(Lock { store, release: true })
    }

    /// Leaves the lock held (until its deadline) when this value goes away.
    pub(crate) fn keep(mut self) {
        self.release = false;
    }
}

impl Drop for Lock<'_> {
    fn drop(&mut self) {
        if self.release {
            let _ = self.store.set(LOCK, &0u64.to_le_bytes(), None);
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keyset::apply::ApplyOptions;
    use crate::core::keyset::full_push::apply_full;
    use crate::core::keyset::test_support::*;
    use crate::core::store::MemStore;

    #[test]
    fn lock_blocks_a_concurrent_writer_and_expires() {
        let s = MemStore::default();
        let l = Lock::acquire(&s, 1000).unwrap();
        assert_eq!(
            apply_full(
                &s,
                &set(1, &[]),
                ApplyOptions {
                    force: false,
                    now_ms: 2000
                }
            )
            .unwrap_err(),
            ApplyError::Busy
        );
        std::mem::forget(l); // a crashed writer never releases
        assert!(apply_full(
            &s,
            &set(1, &[]),
            ApplyOptions {
                force: false,
                now_ms: 1000 + LOCK_TTL_MS + 1
            }
        )
        .is_ok());
        drop(Lock::acquire(&s, 0).unwrap());
    }
}
