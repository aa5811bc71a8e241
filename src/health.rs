//! Readiness: a background task pings the database and publishes the answer to the
//! gRPC health service and the REST probes, so probes never wait on the database. A
//! replica that is shutting down is not ready, whatever the database says.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::store::{DatabaseStatus, Maintenance};

/// Whether this replica should get traffic, published to gRPC health (`""` and every
/// service name) and read by `/readyz`.
pub struct Readiness {
    reachable: AtomicBool,
    shutting_down: AtomicBool,
    reporter: HealthReporter,
    services: &'static [&'static str],
    /// What gRPC health last said; serializes publications.
    published: Mutex<Option<bool>>,
}

impl Readiness {
    /// Not ready until the first database check says otherwise. `liveness`, a health
    /// service name of its own, is SERVING from now until the process exits.
    pub async fn new(
        reporter: HealthReporter,
        services: &'static [&'static str],
        liveness: &str,
    ) -> Arc<Readiness> {
        reporter
            .set_service_status(liveness, ServingStatus::Serving)
            .await;
        Arc::new(Readiness {
            reachable: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            reporter,
            services,
            published: Mutex::new(None),
        })
    }

    /// The database answers and the replica is not shutting down.
    pub fn is_ready(&self) -> bool {
        self.reachable.load(Ordering::Acquire) && !self.shutting_down.load(Ordering::Acquire)
    }

    /// Records a database check.
    pub async fn set_reachable(&self, reachable: bool) {
        self.reachable.store(reachable, Ordering::Release);
        self.publish().await;
    }

    /// The replica stops taking traffic: NOT_SERVING from now on.
    pub async fn start_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.publish().await;
    }

    async fn publish(&self) {
        let mut published = self.published.lock().await;
        let ready = self.is_ready();
        if *published == Some(ready) {
            return;
        }
        let status = if ready {
            tracing::info!("ready: serving");
            ServingStatus::Serving
        } else if self.shutting_down.load(Ordering::Acquire) {
            tracing::info!("shutting down: not serving");
            ServingStatus::NotServing
        } else {
            tracing::warn!("database unreachable: not serving");
            ServingStatus::NotServing
        };
        for name in std::iter::once("").chain(self.services.iter().copied()) {
            self.reporter.set_service_status(name, status).await;
        }
        *published = Some(ready);
    }
}

/// Pings the database every check interval (on a connection of its own, never the
/// request pool's) and records the outcome in a [`Readiness`] and a [`DatabaseStatus`].
pub struct HealthChecker {
    store: Arc<dyn Maintenance>,
    readiness: Arc<Readiness>,
    database: DatabaseStatus,
    interval: Duration,
}

impl HealthChecker {
    /// A checker that pings every `interval`. A ping not answered within one interval
    /// counts as unreachable, so checks never pile up behind a database that hangs.
    pub fn new(
        store: Arc<dyn Maintenance>,
        readiness: Arc<Readiness>,
        database: DatabaseStatus,
        interval: Duration,
    ) -> Self {
        HealthChecker {
            store,
            readiness,
            database,
            interval,
        }
    }

    /// Pings the database once, giving up after one interval. The first call
    /// registers every service, so a probe never sees "unknown service".
    pub async fn check(&mut self) {
        let reachable = matches!(
            tokio::time::timeout(self.interval, self.store.ping()).await,
            Ok(Ok(()))
        );
        self.database.set_down(!reachable);
        self.readiness.set_reachable(reachable).await;
    }

    /// Checks every interval, and at once when a request reached the database while
    /// the last check found it down (so readiness follows a recovery without waiting
    /// for the next turn), until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let database = self.database.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = database.recheck_requested() => {}
                _ = crate::shutdown::requested(&mut shutdown) => return,
            }
            self.check().await;
        }
    }
}
