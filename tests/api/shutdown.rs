//! Shutdown: SIGTERM drains calls and watch streams and exits within its timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use batchd::proto::batchd::v1 as pb;
use tokio::task::JoinSet;
use tonic::Code;

use crate::helpers::*;
use crate::watch::watch;

/// SIGTERM with 200 open watch streams and calls in flight: readiness fails at once,
/// calls keep being served during the delay, every call that started before the
/// signal completes, every stream ends with UNAVAILABLE, and the process exits 0
/// within the timeout although some clients never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly_within_the_timeout() {
    let db = TestDb::fresh(Backend::Sqlite).await;
    let mut server = crate::process::Server::start(
        &db.url,
        &[
            "--shutdown-delay",
            "1s",
            "--shutdown-timeout",
            "8s",
            "--watch-heartbeat",
            "50ms",
            "--max-watches-per-key",
            "1000",
        ],
    )
    .await;
    let key = server.first_key();
    let mut client = server.client(&key).await;
    let batch = create(&mut client).await;

    // 150 streams that are read, 50 that never are (heartbeats pile up behind them).
    let mut readers = JoinSet::new();
    let mut unread = Vec::new();
    for i in 0..200 {
        let mut stream = watch(&mut server.client(&key).await, &batch.id, None)
            .await
            .unwrap();
        if i < 150 {
            readers.spawn(async move {
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => return Code::Ok,
                        Err(status) => return status.code(),
                    }
                }
            });
        } else {
            unread.push(stream);
        }
    }

    // Unary calls in flight the whole time, each remembering when it started.
    let stop_calling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = JoinSet::new();
    for _ in 0..4 {
        let mut client = server.client(&key).await;
        let stop = stop_calling.clone();
        let id = batch.id.clone();
        callers.spawn(async move {
            let mut calls = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let outcome = client
                    .get_batch(pb::GetBatchRequest {
                        batch_id: id.clone(),
                    })
                    .await;
                calls.push((started, outcome.map(|_| ()).map_err(|s| s.code())));
            }
            calls
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    server.signal("TERM");
    // Readiness fails at once while calls are still served.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let readyz = reqwest::get(format!("http://{}/readyz", server.http_addr))
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    get(&mut client, &batch.id).await;

    let status = tokio::time::timeout(Duration::from_secs(12), server.child.wait())
        .await
        .expect("the process is gone within the timeout")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(9),
        "{:?}",
        signalled.elapsed()
    );
    stop_calling.store(true, std::sync::atomic::Ordering::Relaxed);

    while let Some(code) = readers.join_next().await {
        assert_eq!(code.unwrap(), Code::Unavailable);
    }
    let mut before_signal = 0;
    while let Some(calls) = callers.join_next().await {
        for (started, outcome) in calls.unwrap() {
            if started < signalled {
                before_signal += 1;
                assert_eq!(outcome, Ok(()), "a call started before SIGTERM failed");
            }
        }
    }
    assert!(before_signal > 10, "calls were in flight: {before_signal}");
    drop(unread);
}
