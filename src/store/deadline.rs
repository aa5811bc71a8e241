//! A deadline on every database call. A database that stops answering with its
//! connections still open (a network partition, a frozen host) never returns an
//! error by itself: without a deadline each call would hang until the client gives up,
//! holding its connection and its caller. Every call of the wrapped store ends within
//! the deadline, with `UNAVAILABLE` when it did not finish in time.
//!
//! Migrations and closing the pool are exempt: they run at start and stop, where
//! waiting is the right thing to do.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    BatchPageQuery, ChangeNotifier, DeliveryClaim, DeliveryQueue, EarlierClaim, EventLog,
    FeedBounds, FeedCursor, FeedPage, IdempotencyClaim, Store, WebhookStore,
};
use crate::domain::webhooks::{
    AttemptRecord, Delivery, NewDelivery, SealedSecret, WebhookEndpoint,
};
use crate::domain::{ApiKey, Batch, BatchEvent, BatchFilter, BatchId, BatchStatus};
use crate::error::{Error, Result};

/// A [`Store`] whose calls each end within `deadline`.
pub struct DeadlineStore {
    inner: Arc<dyn Store>,
    deadline: Duration,
}

impl DeadlineStore {
    /// Wraps `inner`; every call ends within `deadline`.
    pub fn new(inner: Arc<dyn Store>, deadline: Duration) -> DeadlineStore {
        DeadlineStore { inner, deadline }
    }

    async fn within<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.deadline, call).await {
            Ok(outcome) => outcome,
            Err(_) => {
                metrics::counter!("batchd_db_errors_total", "kind" => "unavailable").increment(1);
                Err(Error::Unavailable(format!(
                    "the database did not answer within {:?}",
                    self.deadline
                )))
            }
        }
    }
}

#[async_trait]
impl WebhookStore for DeadlineStore {
    async fn insert_endpoint(
        &self,
        endpoint: &WebhookEndpoint,
        max_per_owner: i64,
    ) -> Result<bool> {
        self.within(self.inner.insert_endpoint(endpoint, max_per_owner))
            .await
    }

    async fn get_endpoint(&self, id: &str) -> Result<Option<WebhookEndpoint>> {
        self.within(self.inner.get_endpoint(id)).await
    }

    async fn list_endpoints(
        &self,
        owner: Option<&str>,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<WebhookEndpoint>> {
        self.within(self.inner.list_endpoints(owner, before, limit))
            .await
    }

    async fn update_endpoint(
        &self,
        endpoint: &WebhookEndpoint,
        expected_secret: &SealedSecret,
    ) -> Result<bool> {
        self.within(self.inner.update_endpoint(endpoint, expected_secret))
            .await
    }

    async fn delete_endpoint(&self, id: &str) -> Result<bool> {
        self.within(self.inner.delete_endpoint(id)).await
    }

    async fn endpoints_following(&self, owners: &[&str]) -> Result<Vec<WebhookEndpoint>> {
        self.within(self.inner.endpoints_following(owners)).await
    }

    async fn dispatch_position(&self, start: FeedCursor) -> Result<FeedCursor> {
        self.within(self.inner.dispatch_position(start)).await
    }

    async fn queue_deliveries(
        &self,
        from: FeedCursor,
        to: FeedCursor,
        deliveries: &[NewDelivery],
    ) -> Result<bool> {
        self.within(self.inner.queue_deliveries(from, to, deliveries))
            .await
    }

    async fn claim_deliveries(&self, claim: &DeliveryClaim<'_>) -> Result<Vec<Delivery>> {
        self.within(self.inner.claim_deliveries(claim)).await
    }

    async fn release_deliveries(&self, replica: &str, ids: &[String]) -> Result<()> {
        self.within(self.inner.release_deliveries(replica, ids))
            .await
    }

    async fn record_attempt(
        &self,
        replica: &str,
        endpoint_id: &str,
        id: &str,
        attempt: &AttemptRecord,
    ) -> Result<bool> {
        self.within(self.inner.record_attempt(replica, endpoint_id, id, attempt))
            .await
    }

    async fn list_deliveries(&self, endpoint_id: &str, limit: i64) -> Result<Vec<Delivery>> {
        self.within(self.inner.list_deliveries(endpoint_id, limit))
            .await
    }

    async fn retry_delivery(&self, endpoint_id: &str, id: &str, now_ms: i64) -> Result<bool> {
        self.within(self.inner.retry_delivery(endpoint_id, id, now_ms))
            .await
    }

    async fn delivery_queue(&self) -> Result<DeliveryQueue> {
        self.within(self.inner.delivery_queue()).await
    }

    async fn forget_deliveries(&self, before_ms: i64, limit: i64) -> Result<u64> {
        self.within(self.inner.forget_deliveries(before_ms, limit))
            .await
    }
}

#[async_trait]
impl EventLog for DeadlineStore {
    async fn changes_after(
        &self,
        after: FeedCursor,
        owner: Option<&str>,
        limit: i64,
    ) -> Result<FeedPage> {
        self.within(self.inner.changes_after(after, owner, limit))
            .await
    }

    async fn status_moves_after(&self, after: FeedCursor, limit: i64) -> Result<FeedPage> {
        self.within(self.inner.status_moves_after(after, limit))
            .await
    }

    async fn feed_bounds(&self) -> Result<FeedBounds> {
        self.within(self.inner.feed_bounds()).await
    }

    async fn batches_with_positions(
        &self,
        query: BatchPageQuery<'_>,
    ) -> Result<Vec<(FeedCursor, Batch)>> {
        self.within(self.inner.batches_with_positions(query)).await
    }

    async fn events_after(
        &self,
        id: &BatchId,
        after_version: i64,
        limit: i64,
    ) -> Result<Vec<BatchEvent>> {
        self.within(self.inner.events_after(id, after_version, limit))
            .await
    }

    async fn latest_versions(&self, ids: &[BatchId]) -> Result<Vec<(BatchId, i64)>> {
        self.within(self.inner.latest_versions(ids)).await
    }

    async fn get_batch(&self, id: &BatchId) -> Result<Option<Batch>> {
        self.within(self.inner.get_batch(id)).await
    }
}

#[async_trait]
impl Store for DeadlineStore {
    async fn migrate(&self) -> Result<()> {
        self.inner.migrate().await
    }

    async fn ping(&self) -> Result<()> {
        self.within(self.inner.ping()).await
    }

    async fn insert_batch(&self, batch: &Batch) -> Result<()> {
        self.within(self.inner.insert_batch(batch)).await
    }

    async fn insert_batch_once(
        &self,
        batch: &Batch,
        claim: IdempotencyClaim<'_>,
    ) -> Result<Option<EarlierClaim>> {
        self.within(self.inner.insert_batch_once(batch, claim))
            .await
    }

    async fn forget_idempotency_keys(&self, before_at: i64, limit: i64) -> Result<u64> {
        self.within(self.inner.forget_idempotency_keys(before_at, limit))
            .await
    }

    async fn get_batches(&self, ids: &[BatchId]) -> Result<Vec<Batch>> {
        self.within(self.inner.get_batches(ids)).await
    }

    async fn list_batches(&self, query: BatchPageQuery<'_>) -> Result<Vec<Batch>> {
        self.within(self.inner.list_batches(query)).await
    }

    async fn count_batches(&self, filter: &BatchFilter) -> Result<Vec<(BatchStatus, i64)>> {
        self.within(self.inner.count_batches(filter)).await
    }

    async fn commit_change(&self, next: &Batch) -> Result<bool> {
        self.within(self.inner.commit_change(next)).await
    }

    async fn commit_changes(&self, nexts: &[Arc<Batch>]) -> Result<Vec<bool>> {
        self.within(self.inner.commit_changes(nexts)).await
    }

    async fn compact_events(&self, before_at: i64, limit: i64) -> Result<u64> {
        self.within(self.inner.compact_events(before_at, limit))
            .await
    }

    fn notifier(&self) -> Option<Arc<dyn ChangeNotifier>> {
        self.inner.notifier()
    }

    async fn due_batches(
        &self,
        now: i64,
        cancelling_before: i64,
        limit: i64,
    ) -> Result<Vec<Batch>> {
        self.within(self.inner.due_batches(now, cancelling_before, limit))
            .await
    }

    fn pool_usage(&self) -> (u32, u32) {
        self.inner.pool_usage()
    }

    async fn insert_api_key(&self, key: &ApiKey, secret_digest: &[u8; 32]) -> Result<()> {
        self.within(self.inner.insert_api_key(key, secret_digest))
            .await
    }

    async fn insert_first_api_key(&self, key: &ApiKey, secret_digest: &[u8; 32]) -> Result<bool> {
        self.within(self.inner.insert_first_api_key(key, secret_digest))
            .await
    }

    async fn api_key_by_digest(&self, secret_digest: &[u8; 32]) -> Result<Option<ApiKey>> {
        self.within(self.inner.api_key_by_digest(secret_digest))
            .await
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        self.within(self.inner.list_api_keys()).await
    }

    async fn revoke_api_key(&self, id: &str, at: i64) -> Result<bool> {
        self.within(self.inner.revoke_api_key(id, at)).await
    }

    async fn revoked_api_keys(&self, ids: &[String]) -> Result<Vec<String>> {
        self.within(self.inner.revoked_api_keys(ids)).await
    }

    async fn server_key(&self, name: &str, candidate: &str) -> Result<String> {
        self.within(self.inner.server_key(name, candidate)).await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}
