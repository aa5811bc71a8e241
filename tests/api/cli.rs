//! The `batchd` binary: quick start, `migrate` and `keys`, on a fresh database.

use std::process::Stdio;
use std::time::Duration;

use batchd::proto::batchd::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::*;

fn batchd(args: &[&str], database_url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_batchd"));
    command
        .args(args)
        .env("BATCHD_DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    command
}

/// Runs a one-shot subcommand; returns (exit success, stdout, stderr).
async fn run(args: &[&str], database_url: &str) -> (bool, String, String) {
    let output = batchd(args, database_url)
        .output()
        .await
        .expect("run batchd");
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// A `batchd serve` process on random ports: its stdout up to the "serving" line.
struct Server {
    child: Child,
    stdout: Vec<String>,
    grpc_addr: String,
}

async fn serve(database_url: &str) -> Server {
    let mut child = batchd(
        &[
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ],
        database_url,
    )
    .stdout(Stdio::piped())
    .spawn()
    .expect("spawn batchd serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdout = Vec::new();
    let grpc_addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            stdout.push(line.clone());
            if let Some(rest) = line.strip_prefix("batchd is serving gRPC on ") {
                return rest.split(' ').next().unwrap().to_owned();
            }
        }
        panic!("batchd exited before serving: {stdout:?}");
    })
    .await
    .expect("batchd serves within 30 s");
    Server {
        child,
        stdout,
        grpc_addr,
    }
}

async fn client(grpc_addr: &str, key: &str) -> Client {
    let channel = Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    pb::batch_service_client::BatchServiceClient::with_interceptor(
        channel,
        Bearer(Some(key.into())),
    )
}

async fn the_quick_start_prints_a_working_admin_key_once(backend: Backend) {
    let db = TestDb::fresh(backend).await;
    let mut first = serve(&db.url).await;
    let key = first.stdout[first.stdout.len() - 2].clone();
    assert!(key.starts_with("bd_sk_"), "{:?}", first.stdout);
    let mut admin = client(&first.grpc_addr, &key).await;
    let batch = create(&mut admin).await;

    // SIGTERM stops it cleanly.
    let pid = first.child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), first.child.wait())
        .await
        .expect("exits within 30 s")
        .unwrap();
    assert!(status.success(), "{status:?}");

    // A restart on the same database creates no new key; the old one still works.
    let second = serve(&db.url).await;
    assert_eq!(second.stdout.len(), 1, "{:?}", second.stdout);
    let mut admin = client(&second.grpc_addr, &key).await;
    let fetched = get(&mut admin, &batch.id).await;
    assert_eq!(fetched, batch);
}

async fn keys_are_created_listed_and_revoked_from_the_command_line(backend: Backend) {
    let db = TestDb::fresh(backend).await;
    let (ok, stdout, stderr) = run(
        &["keys", "create", "--user", "alice", "--scope", "batches"],
        &db.url,
    )
    .await;
    assert!(ok, "{stderr}");
    let secret = stdout.lines().last().unwrap().to_owned();
    assert!(secret.starts_with("bd_sk_"), "{stdout}");
    let key_id = stdout
        .split_whitespace()
        .find(|w| w.starts_with("key_"))
        .unwrap()
        .to_owned();

    let (ok, listed, _) = run(&["keys", "list"], &db.url).await;
    assert!(ok);
    let row = listed
        .lines()
        .find(|l| l.starts_with(&key_id))
        .expect("key listed");
    assert!(row.contains("alice") && row.contains("batches"), "{row}");
    assert!(row.trim_end().ends_with('-'), "not revoked yet: {row}");
    assert!(!listed.contains(&secret), "secrets are never listed");

    let server = serve(&db.url).await;
    assert_eq!(
        server.stdout.len(),
        1,
        "keys exist, so no first key: {:?}",
        server.stdout
    );
    let mut alice = client(&server.grpc_addr, &secret).await;
    let batch = create(&mut alice).await;
    assert_eq!(batch.user_id, "alice");

    let (ok, stdout, stderr) = run(&["keys", "revoke", &key_id], &db.url).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&key_id));
    let (_, listed, _) = run(&["keys", "list"], &db.url).await;
    let row = listed.lines().find(|l| l.starts_with(&key_id)).unwrap();
    assert!(!row.trim_end().ends_with('-'), "revoked: {row}");
    // The running server sees the revocation on the next call.
    assert_status(
        alice.create_batch(new_batch()).await,
        Code::Unauthenticated,
        "invalid API key",
    );
}

async fn command_line_mistakes_fail_with_a_clear_message(backend: Backend) {
    let db = TestDb::fresh(backend).await;
    let (ok, _, stderr) = run(&["keys", "revoke", "key_doesnotexist"], &db.url).await;
    assert!(!ok);
    assert!(
        stderr.contains("no API key found with id `key_doesnotexist`"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(&["keys", "create", "--user", "a b"], &db.url).await;
    assert!(!ok);
    assert!(stderr.contains("user"), "{stderr}");
    let (ok, _, stderr) = run(
        &["keys", "create", "--user", "a", "--scope", "root"],
        &db.url,
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("root"), "{stderr}");
    let (ok, stdout, stderr) = run(&["migrate"], &db.url).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("up to date"));
}

on_both_stores!(
    the_quick_start_prints_a_working_admin_key_once,
    keys_are_created_listed_and_revoked_from_the_command_line,
    command_line_mistakes_fail_with_a_clear_message,
);

#[tokio::test]
async fn an_unsupported_database_url_is_refused_by_name() {
    let (ok, _, stderr) = run(&["migrate"], "mysql://localhost/db").await;
    assert!(!ok);
    assert!(stderr.contains("unsupported scheme `mysql`"), "{stderr}");
}
