//! The process-wide stop signal: a `watch` channel that turns `true` once.

use tokio::sync::watch;

/// Completes once `stopping` turns true, or its sender is gone (which also means
/// stop). Returns `()` rather than the channel's read guard, so that it can sit in a
/// `select!` next to other awaits in a spawned task.
pub async fn requested(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}
