//! `km/lock`: serialises key-set writers (admin pushes on any worker, the pull
//! service, staged uploads between their requests), since shared-data CAS is not
//! checked for keys that do not exist yet. Built on `cas::TtlLock`: taken, renewed
//! and released by owner-checked CAS.
//!
//! TTLs are short so that a writer whose VM died holding the lock (a panic kills it)
//! blocks an emergency revoke for seconds, not a minute: a one-shot writer renews as it
//! goes (`keep_alive`), a staged upload renews with every request.

use crate::core::cas::{unique_owner, LockError, TtlLock};
use crate::core::keyset::apply::ApplyError;
use crate::core::keyset::delta::{finish_pending, Recovered};
use crate::core::keyset::names::LOCK;
use crate::core::keyset::upload::reap_abandoned_upload;
use crate::core::store::Store;

/// Lease of a one-shot writer (push, pull, delta, sweep reset), renewed while it works.
pub const ONE_SHOT_TTL_MS: u64 = 5_000;
/// Lease of a staged upload between its requests: a client that disappears mid-upload
/// holds the key set for at most this long (the CLI sends chunks back to back).
pub const UPLOAD_TTL_MS: u64 = 15_000;

/// The writer lock, held for one update or (owned by an upload id) across the requests
/// of a staged upload. Dropping it releases it, unless it was `keep`t.
pub struct Lock<'a> {
    inner: TtlLock<'a>,
    recovered: Option<Recovered>,
}

impl From<LockError> for ApplyError {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Held { .. } | LockError::Lost => ApplyError::Busy,
            LockError::Store(e) => e.into(),
        }
    }
}

impl<'a> Lock<'a> {
    /// Takes the lock for a one-shot writer.
    pub fn acquire(store: &'a dyn Store, now_ms: u64) -> Result<Lock<'a>, ApplyError> {
        Self::take(store, now_ms, &unique_owner("w"), ONE_SHOT_TTL_MS)
    }

    /// Takes the lock for staged upload `owner`.
    pub(crate) fn acquire_owned(store: &'a dyn Store, now_ms: u64, owner: &str) -> Result<Lock<'a>, ApplyError> {
        Self::take(store, now_ms, owner, UPLOAD_TTL_MS)
    }

    fn take(store: &'a dyn Store, now_ms: u64, owner: &str, ttl_ms: u64) -> Result<Lock<'a>, ApplyError> {
        let mut lock = Lock {
            inner: TtlLock::acquire(store, LOCK, owner, ttl_ms, now_ms)?,
            recovered: None,
        };
        // A writer interrupted mid-delta left it recorded: finish it before anything.
        lock.recovered = finish_pending(store)?;
        // A live upload always holds the lock: one still recorded now let it expire.
        reap_abandoned_upload(store)?;
        Ok(lock)
    }

    /// Extends the lock held by `owner` (a staged upload) from a later request.
    pub(crate) fn renew(store: &'a dyn Store, now_ms: u64, owner: &str) -> Result<Lock<'a>, ApplyError> {
        if owner.is_empty() {
            return Err(ApplyError::Busy);
        }
        Ok(Lock {
            inner: TtlLock::resume(store, LOCK, owner, UPLOAD_TTL_MS, now_ms)?,
            recovered: None,
        })
    }

    /// Renews the lease when half of it is used up; `Busy` if it was lost meanwhile
    /// (the work must then be abandoned: someone else may be writing).
    pub(crate) fn keep_alive(&mut self, now_ms: u64) -> Result<(), ApplyError> {
        Ok(self.inner.keep_alive(now_ms)?)
    }

    /// Checks the lock is still ours and extends it (before a commit).
    pub(crate) fn confirm(&mut self, now_ms: u64) -> Result<(), ApplyError> {
        Ok(self.inner.renew(now_ms)?)
    }

    /// The interrupted delta this lock's taking finished, if any.
    pub(crate) fn recovered(&self) -> Option<&Recovered> {
        self.recovered.as_ref()
    }

    /// Leaves the lock held (until its deadline) when this value goes away.
    pub(crate) fn keep(self) {
        self.inner.keep();
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
                now_ms: 1000 + ONE_SHOT_TTL_MS + 1
            }
        )
        .is_ok());
        drop(Lock::acquire(&s, 0).unwrap());
    }

    /// Issue 10.12: the first two writers ever must not both get the lock. The rival
    /// creates and takes the missing entry between our existence check and our write.
    #[test]
    fn two_first_writers_cannot_both_hold_the_lock() {
        let s = std::rc::Rc::new(MemStore::default());
        crate::core::store::init_create_lock(&*s);
        let weak = std::rc::Rc::downgrade(&s);
        let fired = std::rc::Rc::new(std::cell::Cell::new(false));
        let f2 = fired.clone();
        *s.before_set.borrow_mut() = Some(Box::new(move |key: &str| {
            if !f2.get() && key != LOCK {
                return;
            }
            if !f2.get() || key == crate::core::store::CREATE_LOCK {
                f2.set(true);
                let s = weak.upgrade().unwrap();
                // the rival's hold: deadline far ahead, its own owner id
                let mut v = 5_000_000u64.to_le_bytes().to_vec();
                v.extend_from_slice(b"rival");
                s.map_set_raw(LOCK, &v);
            }
        }));
        let mine = Lock::acquire(&*s, 1000);
        *s.before_set.borrow_mut() = None;
        assert!(fired.get());
        assert_eq!(mine.err(), Some(ApplyError::Busy), "both writers would hold the lock");
        assert_eq!(&s.get(LOCK).0.unwrap()[8..], b"rival");
    }

    /// Issue 10.12: a writer whose lock expired (and was taken by another) must not
    /// free the new holder's lock when it finishes.
    #[test]
    fn an_expired_holder_does_not_release_the_next_holders_lock() {
        let s = MemStore::default();
        let slow = Lock::acquire(&s, 0).unwrap();
        let next = Lock::acquire(&s, 61_000).unwrap();
        drop(slow);
        assert_eq!(Lock::acquire(&s, 61_001).err(), Some(ApplyError::Busy));
        drop(next);
        assert!(Lock::acquire(&s, 61_002).is_ok());
    }

    /// Issue 10.12: a one-shot writer that crashed (its VM died holding the lock) blocks
    /// an emergency revoke for seconds, not a minute.
    #[test]
    fn a_crashed_one_shot_writer_blocks_revokes_only_briefly() {
        let s = MemStore::default();
        apply_full(
            &s,
            &set(1, &["aaaaaaaaaaa1"]),
            ApplyOptions {
                force: false,
                now_ms: 1_000,
            },
        )
        .unwrap();
        std::mem::forget(Lock::acquire(&s, 1_000).unwrap());
        let revoke = crate::core::keyset::document::parse_json::<crate::core::keyset::document::DeltaDoc>(
            br#"{"version":2,"ops":[{"op":"revoke","id":"aaaaaaaaaaa1"}]}"#,
        )
        .unwrap()
        .compile(|_| true)
        .unwrap();
        let at = |now_ms| ApplyOptions { force: false, now_ms };
        assert_eq!(
            crate::core::keyset::delta::apply_delta(&s, 2, &revoke, at(2_000)).err(),
            Some(ApplyError::Busy)
        );
        let r = crate::core::keyset::delta::apply_delta(&s, 2, &revoke, at(1_000 + 10_000)).unwrap();
        assert_eq!(r.removed, 1);
    }
}
