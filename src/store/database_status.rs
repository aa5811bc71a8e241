//! What this replica knows about its database's reachability, shared by whoever learns
//! it and the request paths (coalesced reads, group commits) that act on it:
//!
//! - **down**: the readiness check's last ping failed. Requests then fail at once
//!   instead of each waiting out its deadline, but for one trial round now and then,
//!   whose success ends the outage for the request paths without waiting for the next
//!   check (and asks the check to run now, for readiness).
//! - **lost**: an open connection broke (PostgreSQL's LISTEN connection, which always
//!   reads, sees a crash or a switchover first). Connections opened before are not
//!   handed out again, so no statement goes to a server that is gone; for a while
//!   (a request's deadline) rounds wait for a working connection instead of failing
//!   on a dead one, so that a switchover refuses nothing, until a new connection or
//!   the readiness check reaches the database.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The least time between two trial rounds while the database is down: trials are
/// driven by requests, and this keeps a crowd of clients from becoming a crowd of
/// connection attempts.
const TRIAL_SPACING: Duration = Duration::from_millis(100);

/// What this replica knows about its database, shared (cheaply cloned) by the checks
/// that learn it and the request paths that act on it.
#[derive(Debug, Clone)]
pub struct DatabaseStatus(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    /// The readiness check's last ping failed.
    down: AtomicBool,
    /// An open connection broke, and nothing has reached the database since.
    lost: AtomicBool,
    /// When the last connection broke, in microseconds after `origin` (0: never).
    lost_at: AtomicU64,
    /// When the last trial round was let through, in microseconds after `origin`.
    trial_at: AtomicU64,
    origin: Instant,
    /// Signalled whenever `down` or `lost` changes.
    changed: Notify,
    /// Signalled when a request reached the database while the check found it down.
    recheck: Notify,
}

impl Default for DatabaseStatus {
    fn default() -> Self {
        DatabaseStatus(Arc::new(Shared {
            down: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            lost_at: AtomicU64::new(0),
            trial_at: AtomicU64::new(0),
            origin: Instant::now(),
            changed: Notify::new(),
            recheck: Notify::new(),
        }))
    }
}

impl DatabaseStatus {
    /// Records what the readiness check found; a database that answered it has
    /// replaced a lost connection too.
    pub fn set_down(&self, down: bool) {
        let was_down = self.0.down.swap(down, Ordering::AcqRel);
        let was_lost = !down && self.0.lost.swap(false, Ordering::AcqRel);
        if was_down != down || was_lost {
            self.0.changed.notify_waiters();
        }
    }

    /// The readiness check's last ping failed.
    pub fn is_down(&self) -> bool {
        self.0.down.load(Ordering::Acquire)
    }

    /// An open connection to the database broke: every connection opened until now is
    /// suspect, and rounds wait for the database instead of being sent.
    pub fn connection_lost(&self) {
        self.0
            .lost_at
            .store(self.micros_now().max(1), Ordering::Release);
        self.0.lost.store(true, Ordering::Release);
        self.0.changed.notify_waiters();
    }

    /// A statement sent at `sent` was answered. If it was sent after the last
    /// connection broke, that connection has been replaced (a statement sent before
    /// may have been answered by the server that then went away); and an outage the
    /// readiness check found is over for the request paths (the check is asked to
    /// confirm it now rather than at its next turn).
    pub fn answered(&self, sent: Instant) {
        let sent_at = sent.saturating_duration_since(self.0.origin).as_micros() as u64;
        if sent_at > self.0.lost_at.load(Ordering::Acquire)
            && self.0.lost.swap(false, Ordering::AcqRel)
        {
            self.0.changed.notify_waiters();
        }
        if self.is_down() {
            self.0.recheck.notify_one();
        }
    }

    /// A connection broke and nothing has reached the database since.
    pub fn is_lost(&self) -> bool {
        self.0.lost.load(Ordering::Acquire)
    }

    /// How long ago a connection broke, while nothing has reached the database since.
    pub fn lost_for(&self) -> Option<Duration> {
        if !self.is_lost() {
            return None;
        }
        let lost_at = self.0.lost_at.load(Ordering::Acquire);
        Some(Duration::from_micros(
            self.micros_now().saturating_sub(lost_at),
        ))
    }

    /// Whether a connection of this `age` was opened before the last lost one broke,
    /// and so may be as dead.
    pub fn opened_before_loss(&self, age: Duration) -> bool {
        let lost_at = self.0.lost_at.load(Ordering::Acquire);
        lost_at != 0 && self.micros_now().saturating_sub(age.as_micros() as u64) < lost_at
    }

    /// Whether a request may try the database although it is known down: one every
    /// [`TRIAL_SPACING`] at most.
    pub fn take_trial(&self) -> bool {
        let now = self.micros_now();
        let last = self.0.trial_at.load(Ordering::Acquire);
        now.saturating_sub(last) >= TRIAL_SPACING.as_micros() as u64
            && self
                .0
                .trial_at
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Resolves at the next change of `down` or `lost` after this call: enable it
    /// before looking at the state it waits on, so no change falls in between.
    pub fn next_change(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.changed.notified()
    }

    /// Resolves when a request reached the database while the check found it down.
    pub async fn recheck_requested(&self) {
        self.0.recheck.notified().await;
    }

    fn micros_now(&self) -> u64 {
        self.0.origin.elapsed().as_micros() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connections_opened_before_a_loss_are_suspect() {
        let status = DatabaseStatus::default();
        assert!(!status.opened_before_loss(Duration::from_secs(3600)));
        std::thread::sleep(Duration::from_millis(5));
        status.connection_lost();
        assert!(status.is_lost());
        assert!(status.opened_before_loss(Duration::from_millis(5)));
        std::thread::sleep(Duration::from_millis(5));
        assert!(!status.opened_before_loss(Duration::from_millis(1)));
        // An answer to a statement sent before the loss proves nothing.
        status.answered(Instant::now() - Duration::from_millis(20));
        assert!(status.is_lost());
        status.answered(Instant::now());
        assert!(!status.is_lost());
    }

    #[test]
    fn trials_are_spaced() {
        let status = DatabaseStatus::default();
        std::thread::sleep(TRIAL_SPACING);
        assert!(status.take_trial());
        assert!(!status.take_trial());
        std::thread::sleep(TRIAL_SPACING);
        assert!(status.take_trial());
    }

    #[test]
    fn a_check_that_reaches_the_database_replaces_a_lost_connection() {
        let status = DatabaseStatus::default();
        status.connection_lost();
        status.set_down(true);
        assert!(status.is_lost() && status.is_down());
        assert!(
            status
                .lost_for()
                .is_some_and(|lost| lost < Duration::from_secs(1))
        );
        status.set_down(false);
        assert!(!status.is_lost() && !status.is_down());
        assert_eq!(status.lost_for(), None);
    }
}
