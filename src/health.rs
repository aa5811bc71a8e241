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

/// Checks the database every `interval` (each check bounded by it too) until shutdown,
/// reporting SERVING / NOT_SERVING for `""` and every name in `services`.
pub async fn watch_database(
    store: Arc<dyn Store>,
    reporter: HealthReporter,
    health: Arc<DatabaseHealth>,
    services: &'static [&'static str],
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last: Option<bool> = None;
    loop {
        let reachable = matches!(
            tokio::time::timeout(interval, store.ping()).await,
            Ok(Ok(()))
        );
        health.reachable.store(reachable, Ordering::Relaxed);
        if last != Some(reachable) {
            let status = if reachable {
                tracing::info!("database reachable: serving");
                ServingStatus::Serving
            } else {
                tracing::warn!("database unreachable: not serving");
                ServingStatus::NotServing
            };
            for name in std::iter::once("").chain(services.iter().copied()) {
                reporter.set_service_status(name, status).await;
            }
            last = Some(reachable);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
    }
}
