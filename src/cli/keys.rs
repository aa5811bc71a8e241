//! `batchd keys`: create, list and revoke API keys in the database directly, so it
//! works with or without a server running on it.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::open_store;
use crate::clock::SystemClock;
use crate::config::KeysCommand;
use crate::domain::ApiKey;
use crate::error::Result;
use crate::service::BatchService;
use crate::watch::WatchHub;

/// `batchd keys ...`; prints to stdout.
pub async fn run(command: KeysCommand) -> Result<()> {
    let database = match &command {
        KeysCommand::Create { database, .. }
        | KeysCommand::List { database }
        | KeysCommand::Revoke { database, .. } => database.clone(),
    };
    let store = open_store(&database).await?;
    // No watch streams are opened by this command: the hub is only there to wire.
    // This hub serves no stream: its cursor key is never used.
    let hub = WatchHub::new(
        store.clone(),
        Default::default(),
        crate::domain::CursorSealer::with_random_key(),
    );
    let service = BatchService::new(
        store.clone(),
        hub,
        Arc::new(SystemClock),
        Default::default(),
    );
    let outcome = run_keys(&service, command).await;
    store.close().await;
    outcome
}

async fn run_keys(service: &BatchService, command: KeysCommand) -> Result<()> {
    match command {
        KeysCommand::Create { user, scope, .. } => {
            let (key, secret) = service.create_api_key(&user, scope.into()).await?;
            println!(
                "created API key {} for user {} with scope {}; its secret is shown only now:",
                key.id, key.user_id, key.scope
            );
            println!("{}", secret.expose());
        }
        KeysCommand::List { .. } => {
            print!("{}", key_table(&service.list_api_keys().await?));
        }
        KeysCommand::Revoke { key_id, .. } => {
            service.revoke_api_key(&key_id).await?;
            println!("revoked API key {key_id}");
        }
    }
    Ok(())
}

/// The `keys list` table.
fn key_table(keys: &[ApiKey]) -> String {
    let date = |secs: i64| {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
            .to_string()
    };
    let id_width = keys.iter().map(|k| k.id.len()).max().unwrap_or(2).max(2);
    let user_width = keys
        .iter()
        .map(|k| k.user_id.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut table = format!(
        "{:id_width$}  {:user_width$}  {:7}  {:20}  REVOKED\n",
        "ID", "USER", "SCOPE", "CREATED"
    );
    for key in keys {
        table.push_str(&format!(
            "{:id_width$}  {:user_width$}  {:7}  {:20}  {}\n",
            key.id,
            key.user_id,
            key.scope.as_str(),
            date(key.created_at),
            key.revoked_at.map_or_else(|| "-".to_owned(), date),
        ));
    }
    table
}
