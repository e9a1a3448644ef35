//! The one compare-and-swap loop every shared-data update goes through, and the one
//! TTL lock built on it.
//!
//! Shared data is read and written by every worker at once; the host's CAS token makes
//! a read-modify-write safe, but only for keys that exist (a CAS on a missing key is
//! never checked). `cas_update` therefore creates a missing key first, either under
//! the process-wide create lock (`Create::ViaLock`, for entries any worker may create:
//! limit state, usage records, counters) or directly when the caller is the only
//! possible creator (`Create::Exclusive`: a key-set writer holding the writer lock).
//! Every loop is bounded: after `retries` lost races it reports `CasMismatch`, which
//! callers treat as "busy, try later", never as success.

use crate::core::store::{ensure_exists, Store, StoreError, CREATE_LOCK};

/// What the update function decided for the value it was shown.
pub enum Step<T> {
    /// Store these bytes (CAS-checked against the value shown) and return `T`.
    Write(Vec<u8>, T),
    /// Leave the value as it is and return `T` (a denial, nothing to change).
    Keep(T),
}

/// How a missing key gets created before it can be compared and swapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Under the process-wide create lock (see `store::ensure_exists`); `now_ms` dates
    /// the lock so a creator that died holding it loses it.
    ViaLock { now_ms: u64 },
    /// By a plain write: only for callers that are the sole possible creator.
    Exclusive,
}

/// Reads `key`, calls `f` with its value (`None` when missing or removed: an empty
/// value) and writes what `f` returns with the CAS token of that read, retrying up to
/// `retries` times when another worker wrote in between. `f` may run several times and
/// must not have side effects beyond what it returns.
pub fn cas_update<T>(
    store: &dyn Store,
    key: &str,
    retries: usize,
    create: Create,
    mut f: impl FnMut(Option<&[u8]>) -> Step<T>,
) -> Result<T, StoreError> {
    for _ in 0..retries {
        let (bytes, cas) = store.get(key);
        if cas == 0 {
            match create {
                Create::ViaLock { now_ms } => {
                    ensure_exists(store, key, &[], now_ms)?;
                    continue;
                }
                Create::Exclusive => {}
            }
        }
        let current = bytes.as_deref().filter(|b| !b.is_empty());
        match f(current) {
            Step::Keep(out) => return Ok(out),
            Step::Write(next, out) => match store.set(key, &next, Some(cas)) {
                Ok(()) => return Ok(out),
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e),
            },
        }
    }
    Err(StoreError::CasMismatch)
}

/// Adds `delta` to the little-endian u64 counter at `key`, unless the result would
/// exceed `max`; returns the new value, or `None` when at the cap (nothing written).
pub fn add_u64_capped(
    store: &dyn Store,
    key: &str,
    delta: u64,
    max: u64,
    retries: usize,
    create: Create,
) -> Result<Option<u64>, StoreError> {
    cas_update(store, key, retries, create, |v| {
        let n = v.and_then(crate::core::store::decode_u64).unwrap_or(0);
        match n.checked_add(delta).filter(|m| *m <= max) {
            Some(m) => Step::Write(m.to_le_bytes().to_vec(), Some(m)),
            None => Step::Keep(None),
        }
    })
}

/// A lock in one shared-data entry: the holder's deadline (u64 LE, ms) followed by its
/// owner id. A holder past its deadline has lost it. Taking, renewing and releasing
/// are all CAS updates checked against the owner, so two writers can never both hold
/// it and nobody can free (or extend) a lock someone else holds.
///
/// Dropping a `TtlLock` releases it; `keep` leaves it held until its deadline (a staged
/// upload holds the writer lock between its requests).
pub struct TtlLock<'a> {
    store: &'a dyn Store,
    key: &'a str,
    owner: String,
    ttl_ms: u64,
    held_until: u64,
    release: bool,
}

/// Why a lock was not obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockError {
    /// Someone else holds it until `until` (ms).
    Held {
        until: u64,
    },
    /// Not held by this owner any more (expired and maybe taken): whatever it guarded
    /// must be treated as abandoned.
    Lost,
    Store(StoreError),
}

impl From<StoreError> for LockError {
    fn from(e: StoreError) -> Self {
        LockError::Store(e)
    }
}

const LOCK_RETRIES: usize = 16;

/// Deadline and owner of a lock value (a missing or short value is free).
pub fn decode_lock(v: Option<&[u8]>) -> (u64, &[u8]) {
    match v {
        Some(v) if v.len() >= 8 => (u64::from_le_bytes(v[..8].try_into().unwrap_or_default()), &v[8..]),
        _ => (0, &[]),
    }
}

fn lock_value(held_until: u64, owner: &str) -> Vec<u8> {
    let mut v = held_until.to_le_bytes().to_vec();
    v.extend_from_slice(owner.as_bytes());
    v
}

/// A token no other holder uses: one-shot writers have no id of their own, and the
/// owner check is only as good as the owners' uniqueness. `RandomState` is seeded from
/// the OS (WASI `random_get` in the wasm build) per VM and stepped per call.
pub fn unique_owner(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(prefix.as_bytes());
    format!("{prefix}{:016x}", h.finish())
}

impl<'a> TtlLock<'a> {
    /// Takes the lock for `owner` (non-empty) unless someone else holds it at `now_ms`.
    pub fn acquire(
        store: &'a dyn Store,
        key: &'a str,
        owner: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<TtlLock<'a>, LockError> {
        debug_assert!(!owner.is_empty());
        // The create lock is itself created at VM start (`init_create_lock`); every
        // other lock entry is created under it, so two first takers cannot both win.
        let create = if key == CREATE_LOCK {
            Create::Exclusive
        } else {
            Create::ViaLock { now_ms }
        };
        let held_until = now_ms + ttl_ms;
        let taken = cas_update(store, key, LOCK_RETRIES, create, |v| {
            let (until, _) = decode_lock(v);
            if until > now_ms {
                Step::Keep(Err(LockError::Held { until }))
            } else {
                Step::Write(lock_value(held_until, owner), Ok(()))
            }
        });
        match taken {
            Ok(Ok(())) => Ok(TtlLock {
                store,
                key,
                owner: owner.to_string(),
                ttl_ms,
                held_until,
                release: true,
            }),
            Ok(Err(e)) => Err(e),
            Err(StoreError::CasMismatch) => Err(LockError::Held { until: now_ms }),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes back a lock `owner` kept (`keep`) in an earlier callback, extending it.
    pub fn resume(
        store: &'a dyn Store,
        key: &'a str,
        owner: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<TtlLock<'a>, LockError> {
        let mut lock = TtlLock {
            store,
            key,
            owner: owner.to_string(),
            ttl_ms,
            held_until: 0,
            release: false,
        };
        lock.renew(now_ms)?;
        lock.release = true;
        Ok(lock)
    }

    /// Extends the deadline to `now_ms + ttl`; `Lost` if this owner no longer holds it.
    pub fn renew(&mut self, now_ms: u64) -> Result<(), LockError> {
        let owner = self.owner.as_str();
        let held_until = now_ms + self.ttl_ms;
        let r = cas_update(self.store, self.key, LOCK_RETRIES, Create::Exclusive, |v| {
            let (until, holder) = decode_lock(v);
            if holder != owner.as_bytes() || until <= now_ms {
                Step::Keep(false)
            } else {
                Step::Write(lock_value(held_until, owner), true)
            }
        })?;
        if !r {
            self.release = false;
            return Err(LockError::Lost);
        }
        self.held_until = held_until;
        Ok(())
    }

    /// Renews only when less than half the TTL is left: long one-shot work calls this
    /// often and pays a host call only every `ttl/2`.
    pub fn keep_alive(&mut self, now_ms: u64) -> Result<(), LockError> {
        if self.held_until.saturating_sub(now_ms) < self.ttl_ms / 2 {
            self.renew(now_ms)
        } else {
            Ok(())
        }
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Leaves the lock held until its deadline.
    pub fn keep(mut self) {
        self.release = false;
    }

    /// Frees the lock if this owner still holds it (never someone else's).
    fn release_now(&mut self) {
        let owner = self.owner.as_bytes();
        let _ = cas_update(self.store, self.key, LOCK_RETRIES, Create::Exclusive, |v| {
            if decode_lock(v).1 == owner {
                Step::Write(0u64.to_le_bytes().to_vec(), ())
            } else {
                Step::Keep(())
            }
        });
        self.release = false;
    }
}

impl Drop for TtlLock<'_> {
    fn drop(&mut self) {
        if self.release {
            self.release_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::MemStore;
    use std::cell::Cell;
    use std::rc::Rc;

    fn counter(s: &dyn Store) -> u64 {
        crate::core::store::read_u64(s, "n")
    }

    fn incr(s: &dyn Store, retries: usize) -> Result<u64, StoreError> {
        cas_update(s, "n", retries, Create::ViaLock { now_ms: 1 }, |v| {
            let n = v.and_then(crate::core::store::decode_u64).unwrap_or(0) + 1;
            Step::Write(n.to_le_bytes().to_vec(), n)
        })
    }

    /// A racing writer bumps the counter between every read and write of ours (as
    /// another worker would): no update is lost, ours retries and lands on top.
    #[test]
    fn racing_writers_lose_no_update() {
        let s = Rc::new(MemStore::default());
        incr(&*s, 4).unwrap();
        let races = Rc::new(Cell::new(0));
        let (weak, r2) = (Rc::downgrade(&s), races.clone());
        *s.before_set.borrow_mut() = Some(Box::new(move |key: &str| {
            // the rival wins the first 3 races of every update
            if key == "n" && r2.get() % 4 != 3 {
                let s = weak.upgrade().unwrap();
                let n = counter(&*s) + 1;
                s.map_set_raw("n", &n.to_le_bytes());
            }
            r2.set(r2.get() + 1);
        }));
        for _ in 0..10 {
            incr(&*s, 8).unwrap();
        }
        *s.before_set.borrow_mut() = None;
        // 1 initial + 10 ours + 3 rival writes per update of ours
        assert_eq!(counter(&*s), 1 + 10 + 30);
    }

    #[test]
    fn a_loop_that_always_loses_is_bounded_and_reports_busy() {
        let s = Rc::new(MemStore::default());
        incr(&*s, 4).unwrap();
        let weak = Rc::downgrade(&s);
        let sets = Rc::new(Cell::new(0));
        let s2 = sets.clone();
        *s.before_set.borrow_mut() = Some(Box::new(move |_key: &str| {
            s2.set(s2.get() + 1);
            weak.upgrade().unwrap().map_set_raw("n", &100u64.to_le_bytes());
        }));
        assert_eq!(incr(&*s, 5), Err(StoreError::CasMismatch));
        assert_eq!(sets.get(), 5, "exactly `retries` attempts");
    }

    #[test]
    fn missing_keys_are_created_once_and_removed_values_read_as_none() {
        let s = MemStore::default();
        assert_eq!(incr(&s, 4), Ok(1));
        s.set("n", &[], None).unwrap();
        let seen = cas_update(&s, "n", 4, Create::Exclusive, |v| Step::Keep(v.map(<[u8]>::to_vec))).unwrap();
        assert_eq!(seen, None);
        assert_eq!(
            add_u64_capped(&s, "c", 2, 3, 4, Create::ViaLock { now_ms: 5 }),
            Ok(Some(2))
        );
        assert_eq!(
            add_u64_capped(&s, "c", 2, 3, 4, Create::ViaLock { now_ms: 5 }),
            Ok(None)
        );
        assert_eq!(
            add_u64_capped(&s, "c", 1, 3, 4, Create::ViaLock { now_ms: 5 }),
            Ok(Some(3))
        );
    }

    #[test]
    fn ttl_lock_is_exclusive_owner_checked_and_expires() {
        let s = MemStore::default();
        let a = TtlLock::acquire(&s, "L", "a", 100, 1_000).unwrap();
        assert_eq!(
            TtlLock::acquire(&s, "L", "b", 100, 1_050).err(),
            Some(LockError::Held { until: 1_100 })
        );
        a.keep();
        // a stale holder cannot renew after expiry, and b takes it
        assert_eq!(TtlLock::resume(&s, "L", "a", 100, 1_101).err(), Some(LockError::Lost));
        let b = TtlLock::acquire(&s, "L", "b", 100, 1_101).unwrap();
        // a late release by a (e.g. a resumed lock value dropped) must not free b's lock
        let mut late_a = TtlLock {
            store: &s,
            key: "L",
            owner: "a".into(),
            ttl_ms: 100,
            held_until: 0,
            release: true,
        };
        late_a.release_now();
        assert_eq!(
            TtlLock::acquire(&s, "L", "c", 100, 1_150).err(),
            Some(LockError::Held { until: 1_201 })
        );
        drop(b);
        assert!(TtlLock::acquire(&s, "L", "c", 100, 1_150).is_ok());
    }

    #[test]
    fn two_first_takers_cannot_both_hold_a_new_lock() {
        // The rival creates and takes the (missing) lock between our existence check
        // and our write: with a blind create we would overwrite its hold.
        let s = Rc::new(MemStore::default());
        crate::core::store::init_create_lock(&*s);
        let weak = Rc::downgrade(&s);
        let fired = Rc::new(Cell::new(false));
        let f2 = fired.clone();
        *s.before_set.borrow_mut() = Some(Box::new(move |key: &str| {
            if key == CREATE_LOCK && !f2.get() {
                f2.set(true);
                let s = weak.upgrade().unwrap();
                s.map_set_raw("L", &lock_value(2_000, "rival"));
            }
        }));
        let r = TtlLock::acquire(&*s, "L", "me", 1_000, 1_000);
        *s.before_set.borrow_mut() = None;
        assert_eq!(r.err(), Some(LockError::Held { until: 2_000 }));
        assert_eq!(decode_lock(s.get("L").0.as_deref()).1, b"rival");
    }

    #[test]
    fn keep_alive_renews_only_past_half_the_ttl() {
        let s = MemStore::default();
        let mut l = TtlLock::acquire(&s, "L", "a", 100, 1_000).unwrap();
        let cas = s.get("L").1;
        l.keep_alive(1_040).unwrap();
        assert_eq!(s.get("L").1, cas, "no write before half the TTL");
        l.keep_alive(1_060).unwrap();
        assert_eq!(decode_lock(s.get("L").0.as_deref()).0, 1_160);
    }
}
