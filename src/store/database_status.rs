//! Whether the database is known to be down: one flag that the readiness check sets
//! and the request paths (coalesced reads, group commits) read, so that requests fail
//! at once while the database is away instead of each waiting out its deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the database is known to be down, as the readiness check last found it.
/// Shared by the check, which sets it, and the request paths, which fail fast on it.
#[derive(Debug, Clone, Default)]
pub struct DatabaseStatus(Arc<AtomicBool>);

impl DatabaseStatus {
    /// Records what the last check found.
    pub fn set_down(&self, down: bool) {
        self.0.store(down, Ordering::Release);
    }

    /// The last check found the database down.
    pub fn is_down(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}
