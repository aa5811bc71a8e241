//! `batchd.v1.BatchService`: the client API.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::caller;
use crate::proto::batchd::v1 as pb;
use crate::service::BatchService;

/// The tonic handler of `BatchService`.
pub struct BatchApi {
    service: Arc<BatchService>,
}

impl BatchApi {
    /// A handler over the service.
    pub fn new(service: Arc<BatchService>) -> Self {
        BatchApi { service }
    }
}

#[tonic::async_trait]
impl pb::batch_service_server::BatchService for BatchApi {
    async fn create_batch(
        &self,
        request: Request<pb::CreateBatchRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let caller = caller(&self.service, &request).await?;
        let batch = self
            .service
            .create_batch(&caller, request.into_inner().into())
            .await?;
        Ok(Response::new(batch.into()))
    }

    async fn get_batch(
        &self,
        request: Request<pb::GetBatchRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let caller = caller(&self.service, &request).await?;
        let batch = self
            .service
            .get_batch(&caller, &request.get_ref().batch_id)
            .await?;
        Ok(Response::new(batch.into()))
    }

    async fn list_batches(
        &self,
        request: Request<pb::ListBatchesRequest>,
    ) -> Result<Response<pb::ListBatchesResponse>, Status> {
        let caller = caller(&self.service, &request).await?;
        let page = self
            .service
            .list_batches(&caller, request.into_inner().try_into()?)
            .await?;
        Ok(Response::new(page.into()))
    }

    async fn cancel_batch(
        &self,
        request: Request<pb::CancelBatchRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let caller = caller(&self.service, &request).await?;
        let batch = self
            .service
            .cancel_batch(&caller, &request.get_ref().batch_id)
            .await?;
        Ok(Response::new(batch.into()))
    }
}
