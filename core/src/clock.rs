//! Time as milliseconds since the Unix epoch, behind a [`Clock`] trait so tests can move it.
//!
//! ```
//! use idemgate_core::{Clock, FakeClock};
//! let clock = FakeClock::new(1_000);
//! clock.advance(500);
//! assert_eq!(clock.now(), 1_500);
//! ```
use std::sync::atomic::{AtomicU64, Ordering};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// A source of the current time.
pub trait Clock {
    /// The current time in milliseconds since the Unix epoch.
    fn now(&self) -> Millis;
}

/// A clock that only moves when told to.
#[derive(Debug, Default)]
pub struct FakeClock(AtomicU64);

impl FakeClock {
    /// A clock standing at `start`.
    pub fn new(start: Millis) -> Self {
        Self(AtomicU64::new(start))
    }
    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: Millis) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
    /// Sets the clock to `at`.
    pub fn set(&self, at: Millis) {
        self.0.store(at, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}
