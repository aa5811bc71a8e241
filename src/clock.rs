//! The server's clock, injectable so that tests of time-driven behaviour need no sleeping.

use std::time::{SystemTime, UNIX_EPOCH};

/// A source of "now" in Unix seconds, the unit of every batch timestamp.
pub trait Clock: Send + Sync + 'static {
    /// The current time in Unix seconds.
    fn now(&self) -> i64;
}

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        // A clock before 1970 is a broken host; 0 keeps timestamps non-negative.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }
}

/// The wall clock in Unix milliseconds, for what travels between replicas or is
/// measured against a commit time (lags, retry schedules), which an `Instant` cannot be.
pub fn wall_clock_ms() -> i64 {
    // A clock before 1970 is a broken host; 0 keeps the values non-negative.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
