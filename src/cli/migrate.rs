//! `batchd migrate`: applies pending migrations and exits, for deployments that migrate
//! before starting replicas.

use super::open_store;
use crate::config::DatabaseArgs;
use crate::error::Result;
use crate::store;

/// Runs `batchd migrate`.
pub async fn run(database: &DatabaseArgs) -> Result<()> {
    let store = open_store(database).await?;
    store.close().await;
    println!(
        "database {} is up to date",
        store::redact_url(&database.database_url)
    );
    Ok(())
}
