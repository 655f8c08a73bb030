//! Mutexes that recover from poisoning. A panic while a `std::sync::Mutex` is held poisons it,
//! and `lock().expect(..)` then panics in every later caller: one bug in one request would
//! become a panic in every request after it. The data behind regrelay's mutexes (counters,
//! windows, tables, permits) stays consistent at every await-free step, so taking the guard of
//! a poisoned mutex is sound; every mutex in regrelay is locked through here.
//!
//! Read-mostly values replaced whole on reload (the server certificate, upstream trust, the
//! session key ring, injected credentials, a token service's realm) are not behind a mutex at
//! all but in `arc_swap` cells: lock-free reads, nothing to poison.

use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

/// Locks `m`, taking the guard of a poisoned mutex as it is.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Locks `m` when no one else holds it (a poisoned mutex counts as free), else `None`.
pub fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Poisons `m` as a bug would: a thread panics while holding it (tests of every room with a
/// mutex show that a later request still works).
#[cfg(test)]
pub fn poison<T: Send>(m: &Mutex<T>) {
    std::thread::scope(|s| {
        let held = s.spawn(|| {
            let _guard = m.lock();
            panic!("a bug while the lock is held (this panic is expected by the test)");
        });
        assert!(held.join().is_err());
    });
    assert!(m.is_poisoned());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_is_locked_as_it_is() {
        let m = Mutex::new(1);
        poison(&m);
        *lock(&m) += 1;
        assert_eq!(*try_lock(&m).expect("nobody holds it"), 2);
        let held = lock(&m);
        assert!(try_lock(&m).is_none(), "held: try_lock must not wait");
        drop(held);
    }
}
