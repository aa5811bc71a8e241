//! The `batchd` binary: quick start, `migrate` and `keys`, on a fresh database.

use std::time::Duration;

use tonic::Code;

use crate::helpers::*;
use crate::process::{Server, run};

/// What `serve` prints when it creates no key: where the console is, then where it
/// serves, and nothing else.
fn assert_prints_no_key(stdout: &[String]) {
    assert_eq!(stdout.len(), 2, "{stdout:?}");
    assert!(
        stdout[0].starts_with("The console is at http://"),
        "{stdout:?}"
    );
    assert!(stdout[1].starts_with("batchd is serving"), "{stdout:?}");
}

async fn the_quick_start_prints_a_working_admin_key_once(backend: Backend) {
    let db = TestDb::fresh(backend).await;
    let mut first = Server::start(&db.url, &[]).await;
    let key = first.stdout[first.stdout.len() - 2].clone();
    assert_eq!(
        key,
        first.first_key(),
        "the secret is the line before `serving`"
    );
    let mut admin = first.client(&key).await;
    let batch = create(&mut admin).await;

    // SIGTERM stops it cleanly.
    first.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), first.child.wait())
        .await
        .expect("exits within 30 s")
        .unwrap();
    assert!(status.success(), "{status:?}");

    // A restart on the same database creates no new key; the old one still works.
    let second = Server::start(&db.url, &[]).await;
    assert_prints_no_key(&second.stdout);
    let mut admin = second.client(&key).await;
    let fetched = get(&mut admin, &batch.id).await;
    assert_eq!(fetched, batch);
}

async fn deployments_can_turn_the_first_key_off(backend: Backend) {
    let db = TestDb::fresh(backend).await;
    let server = Server::start(&db.url, &["--create-first-key", "false"]).await;
    assert_prints_no_key(&server.stdout);
    let (code, listed, _) = run(&["keys", "list"], &db.url).await;
    assert_eq!(code, 0);
    assert_eq!(listed.lines().count(), 1, "only the header: {listed}");
}

async fn keys_are_created_listed_and_revoked_from_the_command_line(backend: Backend) {
    let db = TestDb::fresh(backend).await;
    let (code, stdout, stderr) = run(
        &["keys", "create", "--user", "alice", "--scope", "batches"],
        &db.url,
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let secret = stdout.lines().last().unwrap().to_owned();
    assert!(secret.starts_with("bd_sk_"), "{stdout}");
    let key_id = stdout
        .split_whitespace()
        .find(|w| w.starts_with("key_"))
        .unwrap()
        .to_owned();

    let (code, listed, _) = run(&["keys", "list"], &db.url).await;
    assert_eq!(code, 0);
    let row = listed
        .lines()
        .find(|l| l.starts_with(&key_id))
        .expect("key listed");
    assert!(row.contains("alice") && row.contains("batches"), "{row}");
    assert!(row.trim_end().ends_with('-'), "not revoked yet: {row}");
    assert!(!listed.contains(&secret), "secrets are never listed");

    let server = Server::start(&db.url, &[]).await;
    assert_prints_no_key(&server.stdout);
    let mut alice = server.client(&secret).await;
    let batch = create(&mut alice).await;
    assert_eq!(batch.user_id, "alice");

    let (code, stdout, stderr) = run(&["keys", "revoke", &key_id], &db.url).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(&key_id));
    let (_, listed, _) = run(&["keys", "list"], &db.url).await;
    let row = listed.lines().find(|l| l.starts_with(&key_id)).unwrap();
    assert!(!row.trim_end().ends_with('-'), "revoked: {row}");
    // The running server sees the revocation within its key cache's TTL (2 s).
    eventually(
        Duration::from_secs(5),
        "the revoked key to be refused",
        || {
            let mut alice = alice.clone();
            async move {
                alice
                    .create_batch(new_batch())
                    .await
                    .is_err_and(|status| status.code() == Code::Unauthenticated)
            }
        },
    )
    .await;
}

async fn command_line_mistakes_fail_with_a_clear_message(backend: Backend) {
    let db = TestDb::fresh(backend).await;
    let (code, _, stderr) = run(&["keys", "revoke", "key_doesnotexist"], &db.url).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("no API key found with id `key_doesnotexist`"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&["keys", "create", "--user", "a b"], &db.url).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("user"), "{stderr}");
    let (code, _, stderr) = run(
        &["keys", "create", "--user", "a", "--scope", "root"],
        &db.url,
    )
    .await;
    assert_eq!(code, 2, "clap usage errors exit with 2");
    assert!(stderr.contains("root"), "{stderr}");
    let (code, stdout, stderr) = run(&["migrate"], &db.url).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("up to date"));
}

on_both_stores!(
    the_quick_start_prints_a_working_admin_key_once,
    deployments_can_turn_the_first_key_off,
    keys_are_created_listed_and_revoked_from_the_command_line,
    command_line_mistakes_fail_with_a_clear_message,
);

#[tokio::test]
async fn an_unsupported_database_url_is_refused_by_name() {
    let (code, _, stderr) = run(&["migrate"], "mysql://localhost/db").await;
    assert_eq!(code, 1);
    assert!(stderr.contains("unsupported scheme `mysql`"), "{stderr}");
}
