//! Connections the hot path keeps between its statements, out of sqlx's pool.
//!
//! sqlx tests every connection that goes back to its pool with a `Sync` round trip
//! (its `ping`, on a task of its own). For a point read or a commit, that is a second
//! round trip after the statement's own: a second send, a second wake-up of the
//! database's server process and of this replica's, for no answer anyone waits for.
//! The point reads, the commits, creates and the webhook deliverer's claims and records
//! take their connection here instead: after a
//! statement that ran to its end, the connection is kept for the next one, untested,
//! because sqlx itself waits for the server to be ready before it sends the next
//! statement. A statement that failed, or whose future was dropped half-way (a
//! deadline), drops its connection into the pool the usual way, where sqlx's test
//! decides whether it is reused or closed.
//!
//! Bounds: at most `most` connections wait here, so the rest of the pool serves the
//! other statements (at most a quarter of the pool, and none for a pool of fewer than
//! four); a connection held since before a lost one broke (a crash, a switchover) is
//! closed rather than reused, as the pool's own check does on acquire; one held for
//! longer than [`HOLD_AT_MOST`] goes back to the pool, whose lifetime rules apply to
//! it again.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Database, Pool};

use super::DatabaseStatus;
use crate::error::Result;

/// How long a connection stays out of the pool before it goes back to it.
const HOLD_AT_MOST: Duration = Duration::from_secs(60);

/// Kept connections, each with when it was taken from the pool; `None` once the store
/// is closing (nothing is kept any more).
type Kept<DB> = Option<Vec<(PoolConnection<DB>, Instant)>>;

/// The connections the hot path keeps; see the module's notes.
pub(super) struct HeldConnections<DB: Database> {
    pool: Pool<DB>,
    status: DatabaseStatus,
    most: usize,
    idle: Mutex<Kept<DB>>,
}

impl<DB: Database> HeldConnections<DB> {
    /// Keeps up to a quarter of `pool`'s `max_connections` (at most 4).
    pub(super) fn new(
        pool: Pool<DB>,
        max_connections: u32,
        status: DatabaseStatus,
    ) -> HeldConnections<DB> {
        HeldConnections {
            pool,
            status,
            most: (max_connections as usize / 4).min(4),
            idle: Mutex::new(Some(Vec::new())),
        }
    }

    /// A kept connection, or one from the pool.
    pub(super) async fn take(&self) -> Result<Held<'_, DB>> {
        loop {
            let Some((mut connection, taken)) = self.lock().as_mut().and_then(Vec::pop) else {
                break;
            };
            if self.usable(taken) {
                return Ok(Held {
                    connection: Some(connection),
                    taken,
                    from: self,
                });
            }
            connection.close_on_drop();
        }
        let connection = self.pool.acquire().await?;
        Ok(Held {
            connection: Some(connection),
            taken: Instant::now(),
            from: self,
        })
    }

    /// Connections kept now, waiting for a statement.
    pub(super) fn kept(&self) -> usize {
        self.lock().as_ref().map_or(0, Vec::len)
    }

    /// Gives every kept connection back to the pool and keeps none from now on, so
    /// that the pool can close.
    pub(super) fn release_all(&self) {
        let kept = self.lock().take();
        drop(kept);
    }

    fn usable(&self, taken: Instant) -> bool {
        let held_for = taken.elapsed();
        held_for < HOLD_AT_MOST && !self.status.opened_before_loss(held_for)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept<DB>> {
        // The list stays valid whatever panicked while holding the lock.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection taken from [`HeldConnections`]. Dropped, it goes back to the pool
/// (and sqlx's test); [`Held::keep`] keeps it for the next statement instead.
pub(super) struct Held<'a, DB: Database> {
    connection: Option<PoolConnection<DB>>,
    taken: Instant,
    from: &'a HeldConnections<DB>,
}

impl<DB: Database> Held<'_, DB> {
    /// The statement ran to its end: keep the connection for the next one, if there
    /// is room and it may be reused.
    pub(super) fn keep(mut self) {
        let Some(connection) = self.connection.take() else {
            return;
        };
        if !self.from.usable(self.taken) {
            return;
        }
        let mut idle = self.from.lock();
        if let Some(idle) = idle.as_mut().filter(|idle| idle.len() < self.from.most) {
            idle.push((connection, self.taken));
        }
    }
}

impl<DB: Database> Deref for Held<'_, DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        self.connection
            .as_ref()
            .expect("taken until dropped or kept")
    }
}

impl<DB: Database> DerefMut for Held<'_, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        self.connection
            .as_mut()
            .expect("taken until dropped or kept")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    use sqlx::{Sqlite, SqlitePool};

    use super::*;

    async fn pool(dir: &tempfile::TempDir, max_connections: u32) -> SqlitePool {
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("held.db"))
            .create_if_missing(true);
        SqlitePoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options)
            .await
            .unwrap()
    }

    /// Marks the connection: a temporary table exists on it alone.
    async fn mark(connection: &mut Held<'_, Sqlite>) {
        sqlx::query("CREATE TEMP TABLE mark (x)")
            .execute(&mut **connection)
            .await
            .unwrap();
    }

    async fn is_marked(connection: &mut Held<'_, Sqlite>) -> bool {
        let (count,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM temp.sqlite_master WHERE name = 'mark'")
                .fetch_one(&mut **connection)
                .await
                .unwrap();
        count == 1
    }

    #[tokio::test]
    async fn a_kept_connection_serves_the_next_statement_outside_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir, 4).await;
        let held = HeldConnections::new(pool.clone(), 4, DatabaseStatus::default());
        let mut connection = held.take().await.unwrap();
        mark(&mut connection).await;
        connection.keep();
        assert_eq!(held.kept(), 1);
        // Kept here, not idle in the pool (so sqlx did not test it on its return).
        assert_eq!((pool.size(), pool.num_idle()), (1, 0));
        let mut connection = held.take().await.unwrap();
        assert!(
            is_marked(&mut connection).await,
            "the kept connection is reused"
        );
        assert_eq!(held.kept(), 0);
    }

    #[tokio::test]
    async fn a_connection_not_kept_goes_back_to_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir, 4).await;
        let held = HeldConnections::new(pool.clone(), 4, DatabaseStatus::default());
        let mut connection = held.take().await.unwrap();
        mark(&mut connection).await;
        // A failed statement, or one whose future was dropped, never reaches `keep`.
        drop(connection);
        assert_eq!(held.kept(), 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.num_idle() != 1 {
            assert!(
                Instant::now() < deadline,
                "the connection went back to the pool"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn at_most_a_quarter_of_the_pool_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        for (max_connections, most) in [(8, 2), (3, 0), (40, 4)] {
            let pool = pool(&dir, max_connections).await;
            let held =
                HeldConnections::new(pool.clone(), max_connections, DatabaseStatus::default());
            let mut taken = Vec::new();
            for _ in 0..5.min(max_connections) {
                taken.push(held.take().await.unwrap());
            }
            for connection in taken {
                connection.keep();
            }
            assert_eq!(held.kept(), most, "a pool of {max_connections}");
            held.release_all();
            pool.close().await;
        }
    }

    #[tokio::test]
    async fn a_connection_held_since_before_a_lost_one_broke_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir, 4).await;
        let status = DatabaseStatus::default();
        let held = HeldConnections::new(pool.clone(), 4, status.clone());
        let mut connection = held.take().await.unwrap();
        mark(&mut connection).await;
        connection.keep();
        tokio::time::sleep(Duration::from_millis(2)).await;
        status.connection_lost();
        let mut connection = held.take().await.unwrap();
        assert!(
            !is_marked(&mut connection).await,
            "a new connection, not the held one"
        );
        // Nor is one taken before the loss kept after it.
        let mut before = held.take().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        status.connection_lost();
        mark(&mut before).await;
        before.keep();
        assert_eq!(held.kept(), 0);
    }

    #[tokio::test]
    async fn closing_gives_every_kept_connection_back_so_the_pool_can_close() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir, 8).await;
        let held = HeldConnections::new(pool.clone(), 8, DatabaseStatus::default());
        let (first, second) = (held.take().await.unwrap(), held.take().await.unwrap());
        first.keep();
        held.release_all();
        // A statement that ends after the store began closing keeps nothing.
        second.keep();
        assert_eq!(held.kept(), 0);
        tokio::time::timeout(Duration::from_secs(5), pool.close())
            .await
            .expect("the pool closes: no connection is kept out of it");
    }
}
