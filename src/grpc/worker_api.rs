//! `batchd.v1.BatchWorkerService`: the API of the executors that run batches.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::caller;
use crate::proto::batchd::v1 as pb;
use crate::service::BatchService;

/// The tonic handler of `BatchWorkerService`.
pub struct WorkerApi {
    service: Arc<BatchService>,
}

impl WorkerApi {
    /// A handler over the service.
    pub fn new(service: Arc<BatchService>) -> Self {
        WorkerApi { service }
    }
}

#[tonic::async_trait]
impl pb::batch_worker_service_server::BatchWorkerService for WorkerApi {
    async fn update_batch(
        &self,
        request: Request<pb::UpdateBatchRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let caller = caller(&self.service, &request).await?;
        let mut update = request.into_inner();
        let batch_id = std::mem::take(&mut update.batch_id);
        let batch = self
            .service
            .update_batch(&caller, &batch_id, update.try_into()?)
            .await?;
        Ok(Response::new(batch.into()))
    }
}
