//! `batchd.v1.BatchService`: the client API.

use std::sync::Arc;

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::caller;
use super::shared_encoding::SharedEncodings;
use crate::domain::IdempotencyKey;
use crate::proto::batchd::v1 as pb;
use crate::service::BatchService;

/// The tonic handler of `BatchService`.
pub struct BatchApi {
    service: Arc<BatchService>,
    encodings: Arc<SharedEncodings>,
}

impl BatchApi {
    /// A handler over the service.
    pub fn new(service: Arc<BatchService>) -> Self {
        BatchApi {
            service,
            encodings: Arc::default(),
        }
    }
}

/// The stream of a `WatchBatch` call.
pub type WatchBatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchBatchResponse, Status>> + Send + 'static>>;

/// The stream of a `WatchBatches` call.
pub type WatchBatchesStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchBatchesResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::batch_service_server::BatchService for BatchApi {
    type WatchBatchStream = WatchBatchStream;
    type WatchBatchesStream = WatchBatchesStream;

    async fn watch_batches(
        &self,
        request: Request<pb::WatchBatchesRequest>,
    ) -> Result<Response<WatchBatchesStream>, Status> {
        let caller = caller(&self.service, &request).await?;
        let events = self
            .service
            .watch_batches(&caller, request.into_inner().try_into()?)
            .await?;
        let responses = events.map(|event| {
            event
                .map(pb::WatchBatchesResponse::from)
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn watch_batch(
        &self,
        request: Request<pb::WatchBatchRequest>,
    ) -> Result<Response<WatchBatchStream>, Status> {
        let caller = caller(&self.service, &request).await?;
        let request = request.into_inner();
        let events = self
            .service
            .watch_batch(&caller, &request.batch_id, request.after_version)
            .await?;
        let encodings = self.encodings.clone();
        let responses = events.map(move |event| {
            event
                .map(|event| encodings.response(event))
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn create_batch(
        &self,
        request: Request<pb::CreateBatchRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let caller = caller(&self.service, &request).await?;
        let batch = self
            .service
            .create_batch(&caller, request.into_inner().into())
            .await
            .map_err(|e| e.renaming_field(IdempotencyKey::FIELD, "request_id"))?;
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

    async fn delete_batch(
        &self,
        request: Request<pb::DeleteBatchRequest>,
    ) -> Result<Response<pb::DeleteBatchResponse>, Status> {
        let caller = caller(&self.service, &request).await?;
        let id = self
            .service
            .delete_batch(&caller, &request.get_ref().batch_id)
            .await?;
        Ok(Response::new(pb::DeleteBatchResponse {
            id: id.to_string(),
            object: crate::domain::BATCH_DELETED_OBJECT.to_owned(),
            deleted: true,
        }))
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
