//! The client commands, apart from the server: `batchd watch`, `batchd webhooks` and
//! `batchd health` talk to a running batchd over gRPC; `batchd migrate` and `batchd
//! keys` work on the database directly and migrate it first, so they work on a fresh database, with or
//! without a server running on it.

pub mod health; // `batchd health`: the gRPC health probe
pub mod keys; // `batchd keys`: create, list and revoke API keys
pub mod migrate; // `batchd migrate`: apply pending migrations
pub mod watch; // `batchd watch BATCH_ID`: a live progress bar over WatchBatch
pub mod watch_all; // `batchd watch --all`: a progress bar per active batch, over WatchBatches
pub mod webhooks; // `batchd webhooks`: manage webhook endpoints over WebhookService

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::config::{DatabaseArgs, WatchArgs};
use crate::error::Result;
use crate::store::{self, Store};

/// Runs `batchd watch`: one batch (the exit code tells how it ended), or, without a
/// batch id, every batch the key may see.
pub async fn watch(args: WatchArgs) -> anyhow::Result<ExitCode> {
    match args.batch_id.clone() {
        Some(batch_id) => watch::run(args, batch_id).await,
        None => watch_all::run(args).await,
    }
}

/// Connects to the database and applies pending migrations.
pub async fn open_store(database: &DatabaseArgs) -> Result<Arc<dyn Store>> {
    let store = store::connect(&database.database_url, &database.store_options()).await?;
    store.migrate().await?;
    Ok(store)
}

/// Sends the API key with every call.
#[derive(Clone)]
pub(crate) struct BearerAuth(MetadataValue<Ascii>);

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A channel to `server` (connected on first use) and the interceptor that sends
/// `api_key` with every call.
pub(crate) fn authorized_channel(
    server: &str,
    api_key: &str,
) -> anyhow::Result<(Channel, BearerAuth)> {
    let channel = Channel::from_shared(server.to_owned())
        .with_context(|| format!("`{server}` is not a server address"))?
        .connect_lazy();
    let authorization = format!("Bearer {api_key}")
        .parse()
        .context("the API key contains characters a header cannot carry")?;
    Ok((channel, BearerAuth(authorization)))
}
