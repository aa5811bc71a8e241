//! Readiness: a background task pings the database and publishes the answer to the
//! gRPC health service and the REST probes, so probes never wait on the database.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::store::Store;

/// Whether the database answered the last check. Shared with the REST probes.
#[derive(Debug, Default)]
pub struct DatabaseHealth {
    reachable: AtomicBool,
}

impl DatabaseHealth {
    /// Whether the database answered the last check.
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }
}

/// Checks the database and publishes the outcome under `""` and every service name.
pub struct HealthChecker {
    store: Arc<dyn Store>,
    reporter: HealthReporter,
    health: Arc<DatabaseHealth>,
    services: &'static [&'static str],
    timeout: Duration,
    last: Option<bool>,
}

impl HealthChecker {
    /// A checker whose pings give up after `timeout`.
    pub fn new(
        store: Arc<dyn Store>,
        reporter: HealthReporter,
        health: Arc<DatabaseHealth>,
        services: &'static [&'static str],
        timeout: Duration,
    ) -> Self {
        HealthChecker {
            store,
            reporter,
            health,
            services,
            timeout,
            last: None,
        }
    }

    /// Pings the database once and publishes SERVING or NOT_SERVING if it changed.
    /// The first call registers every service, so a probe never sees "unknown".
    pub async fn check(&mut self) {
        let reachable = matches!(
            tokio::time::timeout(self.timeout, self.store.ping()).await,
            Ok(Ok(()))
        );
        self.health.reachable.store(reachable, Ordering::Relaxed);
        if self.last == Some(reachable) {
            return;
        }
        let status = if reachable {
            tracing::info!("database reachable: serving");
            ServingStatus::Serving
        } else {
            tracing::warn!("database unreachable: not serving");
            ServingStatus::NotServing
        };
        for name in std::iter::once("").chain(self.services.iter().copied()) {
            self.reporter.set_service_status(name, status).await;
        }
        self.last = Some(reachable);
    }

    /// Checks every `interval` until `shutdown` turns true.
    pub async fn run(mut self, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => self.check().await,
                _ = crate::shutdown::requested(&mut shutdown) => return,
            }
        }
    }
}
