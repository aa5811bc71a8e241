//! Just enough of etcd's v3 gRPC API for the benchmark (KV.Put and Watch.Watch), with
//! the messages declared by hand, field numbers as etcd's `rpc.proto` and `kv.proto`
//! define them. No code generation: no protoc, no etcd client crate.

use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {}

#[derive(Clone, PartialEq, prost::Message)]
struct WatchCreateRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchRequest {
    /// `request_union.create_request`.
    #[prost(message, optional, tag = "1")]
    create_request: Option<WatchCreateRequest>,
}

/// etcd's `WatchResponse`, the fields the benchmark reads.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchResponse {
    #[prost(bool, tag = "3")]
    pub created: bool,
    #[prost(message, repeated, tag = "11")]
    pub events: Vec<Event>,
}

/// `mvccpb.Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(message, optional, tag = "2")]
    pub kv: Option<KeyValue>,
}

/// `mvccpb.KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
}

/// A connection to etcd.
#[derive(Clone)]
pub struct Etcd {
    grpc: tonic::client::Grpc<Channel>,
}

impl Etcd {
    pub async fn connect(endpoint: &str) -> anyhow::Result<Etcd> {
        let channel = Channel::from_shared(endpoint.to_owned())?.connect().await?;
        Ok(Etcd {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    pub async fn put(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        self.grpc.ready().await?;
        let request = PutRequest {
            key: key.into(),
            value: value.into(),
        };
        let path = PathAndQuery::from_static("/etcdserverpb.KV/Put");
        self.grpc
            .unary::<_, PutResponse, _>(tonic::Request::new(request), path, ProstCodec::default())
            .await?;
        Ok(())
    }

    /// Opens a watch of `key`; the first response confirms its creation. The watch
    /// lasts as long as the returned sender (etcd cancels it when requests end).
    pub async fn watch(
        &mut self,
        key: &str,
    ) -> anyhow::Result<(WatchRequests, tonic::Streaming<WatchResponse>)> {
        self.grpc.ready().await?;
        let (requests, receiver) = tokio::sync::mpsc::channel(1);
        requests
            .send(WatchRequest {
                create_request: Some(WatchCreateRequest { key: key.into() }),
            })
            .await?;
        let path = PathAndQuery::from_static("/etcdserverpb.Watch/Watch");
        let response = self
            .grpc
            .streaming::<_, WatchRequest, WatchResponse, _>(
                tonic::Request::new(ReceiverStream::new(receiver)),
                path,
                ProstCodec::default(),
            )
            .await?;
        Ok((WatchRequests(requests), response.into_inner()))
    }
}

/// Keeps a watch's request stream open.
pub struct WatchRequests(#[allow(dead_code)] tokio::sync::mpsc::Sender<WatchRequest>);
