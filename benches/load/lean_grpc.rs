//! A lean gRPC client for the closed-loop throughput figures (UpdateBatch, GetBatch):
//! each unary call is one HTTP/2 request on the `h2` crate, its body a prost message
//! in gRPC's 5-byte framing, sent by the calling task itself. tonic's client puts a
//! tower buffer (a channel and a task of its own) and its codec layers between the
//! caller and the connection, and on this machine the load generator shares two
//! cores with batchd and PostgreSQL. The anchors it is compared with are lean C
//! clients (pgbench, and wrk for REST); this one is as close to them as Rust gets
//! without leaving the harness (BENCHMARKS.md has the two clients side by side).
//! Every call must answer `grpc-status: 0` with one whole message, or the run fails.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Request};
use prost::Message;

use crate::setup::Batchd;

/// One HTTP/2 connection to batchd's gRPC port, shared by the tasks that clone it.
#[derive(Clone)]
pub struct LeanGrpc {
    send: h2::client::SendRequest<Bytes>,
    uri_prefix: String,
    authorization: HeaderValue,
}

impl LeanGrpc {
    /// Opens a connection to `server` whose calls carry its admin key.
    pub async fn connect(server: &Batchd) -> anyhow::Result<LeanGrpc> {
        let authority = server
            .grpc_url
            .strip_prefix("http://")
            .unwrap_or(&server.grpc_url)
            .trim_end_matches('/')
            .to_owned();
        let tcp = tokio::net::TcpStream::connect(&authority).await?;
        tcp.set_nodelay(true)?;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 22)
            .handshake(tcp)
            .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(LeanGrpc {
            send,
            uri_prefix: format!("http://{authority}"),
            authorization: format!("Bearer {}", server.key).parse()?,
        })
    }

    /// Calls `path` (`/package.Service/Method`) with `message`; the answer's message
    /// bytes, unframed.
    pub async fn unary(&self, path: &str, message: &impl Message) -> anyhow::Result<Bytes> {
        let length = message.encoded_len();
        let mut body = BytesMut::with_capacity(5 + length);
        body.put_u8(0);
        body.put_u32(u32::try_from(length)?);
        message.encode(&mut body)?;
        let request = Request::post(format!("{}{path}", self.uri_prefix))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", self.authorization.clone())
            .body(())?;
        let mut send = self.send.clone().ready().await?;
        let (response, mut stream) = send.send_request(request, false)?;
        stream.send_data(body.freeze(), true)?;
        let response = tokio::time::timeout(Duration::from_secs(30), response).await??;
        anyhow::ensure!(
            response.status() == 200,
            "{path} answered HTTP {}",
            response.status()
        );
        // An error may come as headers only, with the status among them.
        check_status(path, response.headers())?;
        let mut body = response.into_body();
        let mut answer = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            body.flow_control().release_capacity(chunk.len())?;
            answer.extend_from_slice(&chunk);
        }
        let trailers = body
            .trailers()
            .await?
            .ok_or_else(|| anyhow::anyhow!("{path}: no trailers"))?;
        anyhow::ensure!(
            trailers.contains_key("grpc-status"),
            "{path}: the trailers carry no grpc-status"
        );
        check_status(path, &trailers)?;
        anyhow::ensure!(
            answer.len() >= 5 && answer[0] == 0,
            "{path}: the answer is not one uncompressed gRPC message"
        );
        let declared = u32::from_be_bytes([answer[1], answer[2], answer[3], answer[4]]) as usize;
        anyhow::ensure!(
            declared == answer.len() - 5,
            "{path}: the answer holds {} bytes, its frame says {declared}",
            answer.len() - 5
        );
        Ok(answer.freeze().slice(5..))
    }
}

/// Fails on a `grpc-status` other than 0; a missing one passes (it comes later).
fn check_status(path: &str, headers: &http::HeaderMap) -> anyhow::Result<()> {
    match headers.get("grpc-status") {
        None => Ok(()),
        Some(status) if status == "0" => Ok(()),
        Some(status) => anyhow::bail!(
            "{path} failed: grpc-status {:?}, {:?}",
            status,
            headers.get("grpc-message")
        ),
    }
}
