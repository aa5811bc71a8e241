//! The client commands, apart from the server: `batchd watch` and `batchd health` talk
//! to a running batchd over gRPC; `batchd migrate` and `batchd keys` work on the
//! database directly and migrate it first, so they work on a fresh database, with or
//! without a server running on it.

pub mod health; // `batchd health`: the gRPC health probe
pub mod keys; // `batchd keys`: create, list and revoke API keys
pub mod migrate; // `batchd migrate`: apply pending migrations
pub mod watch; // `batchd watch BATCH_ID`: a live progress bar over WatchBatch
pub mod watch_all; // `batchd watch --all`: a progress bar per active batch, over WatchBatches

use std::sync::Arc;

use crate::config::DatabaseArgs;
use crate::error::Result;
use crate::store::{self, Store};

/// Connects to the database and applies pending migrations.
pub async fn open_store(database: &DatabaseArgs) -> Result<Arc<dyn Store>> {
    let store = store::connect(&database.database_url, &database.store).await?;
    store.migrate().await?;
    Ok(store)
}
