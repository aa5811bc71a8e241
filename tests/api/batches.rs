//! The batch lifecycle over gRPC: create, get, list, cancel and worker updates.

use std::collections::{HashMap, HashSet};

use batchd::domain::{BatchId, Scope};
use batchd::proto::batchd::v1 as pb;
use pb::BatchStatus as S;
use tonic::Code;

use crate::helpers::*;

async fn a_new_batch_starts_validating_at_version_1_and_expires_after_its_window(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let key = app.key("alice", Scope::Batches).await;
    let mut client = app.client(&key);
    let mut request = new_batch();
    request.completion_window = "48h".into();
    request.metadata = HashMap::from([("team".into(), "search".into())]);
    request.job_id = Some("job-7".into());
    request.remark = Some("nightly eval".into());
    let batch = client.create_batch(request).await.unwrap().into_inner();

    assert!(BatchId::parse("id", &batch.id).is_ok(), "{}", batch.id);
    assert_eq!(batch.id.len(), "batch_".len() + 32);
    assert_eq!(batch.object, "batch");
    assert_eq!(batch.status(), S::Validating);
    assert_eq!(batch.version, 1);
    assert_eq!(batch.endpoint, "/v1/chat/completions");
    assert_eq!(batch.input_file_id, "file-abc123");
    assert_eq!(batch.completion_window, "48h");
    assert_eq!(batch.expires_at, Some(batch.created_at + 48 * 3600));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (batch.created_at - now).abs() < 60,
        "created_at {}",
        batch.created_at
    );
    assert_eq!(
        batch.metadata.get("team").map(String::as_str),
        Some("search")
    );
    assert_eq!(batch.job_id.as_deref(), Some("job-7"));
    assert_eq!(batch.remark.as_deref(), Some("nightly eval"));
    assert_eq!(batch.user_id, "alice");
    assert!(batch.api_key_id.starts_with("key_"));
    assert_eq!(batch.request_counts, Some(pb::RequestCounts::default()));
    for (name, stamp) in [
        ("in_progress_at", batch.in_progress_at),
        ("finalizing_at", batch.finalizing_at),
        ("completed_at", batch.completed_at),
        ("failed_at", batch.failed_at),
        ("expired_at", batch.expired_at),
        ("cancelling_at", batch.cancelling_at),
        ("cancelled_at", batch.cancelled_at),
        ("updated_at", batch.updated_at),
    ] {
        assert_eq!(stamp, None, "{name}");
    }
    assert_eq!(batch.output_file_id, None);
    assert_eq!(batch.errors, None);
    assert_eq!(batch.usage, None);

    let fetched = get(&mut client, &batch.id).await;
    assert_eq!(fetched, batch);
}

async fn create_refuses_bad_input_and_names_the_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    type Edit = Box<dyn Fn(&mut pb::CreateBatchRequest)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("input_file_id", Box::new(|r| r.input_file_id.clear())),
        (
            "endpoint",
            Box::new(|r| r.endpoint = "/v1/audio/speech".into()),
        ),
        (
            "completion_window",
            Box::new(|r| r.completion_window = "72h".into()),
        ),
        (
            "metadata",
            Box::new(|r| r.metadata = (0..17).map(|i| (format!("k{i}"), "v".into())).collect()),
        ),
        (
            "metadata",
            Box::new(|r| r.metadata = HashMap::from([("k".repeat(65), "v".into())])),
        ),
        (
            "metadata.k",
            Box::new(|r| r.metadata = HashMap::from([("k".into(), "v".repeat(513))])),
        ),
        ("job_id", Box::new(|r| r.job_id = Some(String::new()))),
        ("remark", Box::new(|r| r.remark = Some("r".repeat(1025)))),
    ];
    for (field, edit) in cases {
        let mut request = new_batch();
        edit(&mut request);
        assert_status(
            client.create_batch(request).await,
            Code::InvalidArgument,
            field,
        );
    }
    let listed = client
        .list_batches(pb::ListBatchesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.data.is_empty(), "nothing was written");
}

async fn ids_that_are_malformed_or_unknown_are_told_apart(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    for bad in ["", "123", "batch_", "batch_has space", "file_abc"] {
        let result = client
            .get_batch(pb::GetBatchRequest {
                batch_id: bad.into(),
            })
            .await;
        assert_status(result, Code::InvalidArgument, "batch_id");
    }
    let unknown = BatchId::generate().to_string();
    assert_status(
        client
            .get_batch(pb::GetBatchRequest {
                batch_id: unknown.clone(),
            })
            .await,
        Code::NotFound,
        &unknown,
    );
    assert_status(
        client
            .cancel_batch(pb::CancelBatchRequest {
                batch_id: unknown.clone(),
            })
            .await,
        Code::NotFound,
        &unknown,
    );
}

async fn paging_returns_every_batch_exactly_once_newest_first(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    // 23 batches created within a second or two: many share a created_at second.
    let mut created = Vec::new();
    for _ in 0..23 {
        created.push(create(&mut client).await.id);
    }
    created.reverse();

    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = client
            .list_batches(pb::ListBatchesRequest {
                after: after.clone(),
                limit: Some(5),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert_eq!(page.object, "list");
        assert_eq!(page.first_id.as_ref(), page.data.first().map(|b| &b.id));
        assert_eq!(page.last_id.as_ref(), page.data.last().map(|b| &b.id));
        seen.extend(page.data.iter().map(|b| b.id.clone()));
        if !page.has_more {
            break;
        }
        assert_eq!(page.data.len(), 5);
        after = page.last_id;
    }
    assert_eq!(pages, 5);
    assert_eq!(seen, created, "newest first, each exactly once");
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), 23);

    let default_page = client
        .list_batches(pb::ListBatchesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(default_page.data.len(), 20, "default limit is 20");
    assert!(default_page.has_more);
}

async fn list_filters_by_status_and_job(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let mut in_job = Vec::new();
    for i in 0..4 {
        let mut request = new_batch();
        request.job_id = Some(if i % 2 == 0 { "job-a" } else { "job-b" }.into());
        in_job.push(client.create_batch(request).await.unwrap().into_inner());
    }
    worker
        .update_batch(move_to(&in_job[0].id, S::InProgress))
        .await
        .unwrap();
    worker
        .update_batch(move_to(&in_job[3].id, S::InProgress))
        .await
        .unwrap();

    let list = |status: Option<S>, job: Option<&str>| {
        let mut client = client.clone();
        let request = pb::ListBatchesRequest {
            status: status.map(Into::into),
            job_id: job.map(Into::into),
            ..Default::default()
        };
        async move {
            let page = client.list_batches(request).await.unwrap().into_inner();
            page.data.into_iter().map(|b| b.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(Some(S::InProgress), None).await,
        vec![in_job[3].id.clone(), in_job[0].id.clone()]
    );
    assert_eq!(
        list(None, Some("job-a")).await,
        vec![in_job[2].id.clone(), in_job[0].id.clone()]
    );
    assert_eq!(
        list(Some(S::InProgress), Some("job-b")).await,
        vec![in_job[3].id.clone()]
    );
    assert!(list(Some(S::Completed), None).await.is_empty());
}

async fn list_refuses_bad_limits_statuses_and_cursors(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    for limit in [0, 101, 1000, -1] {
        let result = client
            .list_batches(pb::ListBatchesRequest {
                limit: Some(limit),
                ..Default::default()
            })
            .await;
        assert_status(result, Code::InvalidArgument, "limit");
    }
    for status in [0, 99] {
        let result = client
            .list_batches(pb::ListBatchesRequest {
                status: Some(status),
                ..Default::default()
            })
            .await;
        assert_status(result, Code::InvalidArgument, "status");
    }
    let list_after = |after: String| {
        let mut client = client.clone();
        async move {
            client
                .list_batches(pb::ListBatchesRequest {
                    after: Some(after),
                    ..Default::default()
                })
                .await
        }
    };
    assert_status(
        list_after("not-an-id".into()).await,
        Code::InvalidArgument,
        "after",
    );
    // A well-formed cursor naming no batch would silently give an empty page.
    let unknown = BatchId::generate().to_string();
    assert_status(list_after(unknown.clone()).await, Code::NotFound, &unknown);
}

async fn a_worker_drives_a_batch_to_completion_and_every_version_is_logged(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let worker_key = app.key("executor", Scope::Worker).await;
    let mut worker = app.worker(&worker_key);
    let batch = create(&mut client).await;

    let running = worker
        .update_batch(pb::UpdateBatchRequest {
            batch_id: batch.id.clone(),
            status: Some(S::InProgress.into()),
            request_counts: Some(pb::RequestCounts {
                total: 10,
                completed: 0,
                failed: 0,
            }),
            model: Some("gpt-4o-mini".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(running.status(), S::InProgress);
    assert_eq!(running.version, 2);
    assert!(running.in_progress_at.is_some());
    assert_eq!(running.updated_at, running.in_progress_at);

    let progressed = worker
        .update_batch(pb::UpdateBatchRequest {
            batch_id: batch.id.clone(),
            expected_version: Some(2),
            request_counts: Some(pb::RequestCounts {
                total: 10,
                completed: 8,
                failed: 2,
            }),
            errors: vec![pb::BatchError {
                code: "invalid_json".into(),
                line: Some(4),
                message: "line 4 is not JSON".into(),
                param: None,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(progressed.version, 3);
    assert_eq!(progressed.status(), S::InProgress);
    let errors = progressed.errors.clone().expect("errors list");
    assert_eq!(errors.object, "list");
    assert_eq!(errors.data.len(), 1);
    assert_eq!(errors.data[0].line, Some(4));

    worker
        .update_batch(move_to(&batch.id, S::Finalizing))
        .await
        .unwrap();
    let usage = pb::Usage {
        input_tokens: 100,
        input_tokens_details: Some(pb::InputTokensDetails { cached_tokens: 20 }),
        output_tokens: 50,
        output_tokens_details: Some(pb::OutputTokensDetails {
            reasoning_tokens: 10,
        }),
        total_tokens: 150,
    };
    let done = worker
        .update_batch(pb::UpdateBatchRequest {
            batch_id: batch.id.clone(),
            status: Some(S::Completed.into()),
            output_file_id: Some("file-out".into()),
            error_file_id: Some("file-err".into()),
            usage: Some(usage),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.status(), S::Completed);
    assert_eq!(done.version, 5);
    assert!(done.finalizing_at.is_some() && done.completed_at.is_some());
    assert_eq!(done.output_file_id.as_deref(), Some("file-out"));
    assert_eq!(done.error_file_id.as_deref(), Some("file-err"));
    assert_eq!(done.usage, Some(usage));
    assert_eq!(done.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(done.failed_at, None);
    assert_eq!(done.cancelled_at, None);

    // A terminal batch accepts nothing more.
    assert_status(
        worker
            .update_batch(pb::UpdateBatchRequest {
                batch_id: batch.id.clone(),
                model: Some("other".into()),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "completed",
    );

    // The event log holds exactly versions 1..=5, each the batch as returned then.
    let store = app.store().await;
    let id = BatchId::parse("id", &batch.id).unwrap();
    let events = store.events_after(&id, 0, 100).await.unwrap();
    let versions: Vec<i64> = events.iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5]);
    assert_eq!(pb::Batch::from(events[0].batch.clone()), batch);
    assert_eq!(pb::Batch::from(events[2].batch.clone()), progressed);
    assert_eq!(pb::Batch::from(events[4].batch.clone()), done);
    store.close().await;
}

async fn an_illegal_transition_is_refused_naming_both_statuses_and_writes_nothing(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    let result = worker
        .update_batch(pb::UpdateBatchRequest {
            batch_id: batch.id.clone(),
            status: Some(S::Completed.into()),
            // The rest of the update must not be applied either.
            model: Some("gpt".into()),
            ..Default::default()
        })
        .await;
    assert_status(
        result,
        Code::FailedPrecondition,
        "`validating` to `completed`",
    );
    let after = get(&mut client, &batch.id).await;
    assert_eq!(after, batch, "nothing written");
}

async fn a_stale_expected_version_is_aborted_and_writes_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    let mut update = move_to(&batch.id, S::InProgress);
    update.expected_version = Some(2);
    assert_status(
        worker.update_batch(update).await,
        Code::Aborted,
        "version 1, not the expected version 2",
    );
    let mut update = move_to(&batch.id, S::InProgress);
    update.expected_version = Some(1);
    assert_eq!(
        worker
            .update_batch(update)
            .await
            .unwrap()
            .into_inner()
            .version,
        2
    );
}

async fn request_counts_are_checked_and_never_go_down(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    let counts = |total, completed, failed| pb::UpdateBatchRequest {
        batch_id: batch.id.clone(),
        request_counts: Some(pb::RequestCounts {
            total,
            completed,
            failed,
        }),
        ..Default::default()
    };
    assert_status(
        worker.update_batch(counts(10, -1, 0)).await,
        Code::InvalidArgument,
        "request_counts.completed",
    );
    assert_status(
        worker.update_batch(counts(-5, 0, 0)).await,
        Code::InvalidArgument,
        "request_counts.total",
    );
    assert_status(
        worker.update_batch(counts(10, 6, 5)).await,
        Code::InvalidArgument,
        "exceeds total",
    );
    worker.update_batch(counts(10, 6, 1)).await.unwrap();
    assert_status(
        worker.update_batch(counts(10, 5, 1)).await,
        Code::FailedPrecondition,
        "request_counts.completed cannot go down",
    );
    // The same counts again change nothing and bump no version.
    let same = worker
        .update_batch(counts(10, 6, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.version, 2);
}

async fn bad_worker_input_is_refused_naming_the_field(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let batch = create(&mut client).await;
    let base = || pb::UpdateBatchRequest {
        batch_id: batch.id.clone(),
        ..Default::default()
    };
    let cases: Vec<(&str, pb::UpdateBatchRequest)> = vec![
        (
            "status",
            pb::UpdateBatchRequest {
                status: Some(42),
                ..base()
            },
        ),
        (
            "status",
            pb::UpdateBatchRequest {
                status: Some(0),
                ..base()
            },
        ),
        (
            "expected_version",
            pb::UpdateBatchRequest {
                expected_version: Some(0),
                ..base()
            },
        ),
        (
            "output_file_id",
            pb::UpdateBatchRequest {
                output_file_id: Some(String::new()),
                ..base()
            },
        ),
        (
            "model",
            pb::UpdateBatchRequest {
                model: Some("a b".into()),
                ..base()
            },
        ),
        (
            "errors[0].code",
            pb::UpdateBatchRequest {
                errors: vec![pb::BatchError {
                    message: "m".into(),
                    ..Default::default()
                }],
                ..base()
            },
        ),
        (
            "usage.total_tokens",
            pb::UpdateBatchRequest {
                usage: Some(pb::Usage {
                    input_tokens: 1,
                    output_tokens: 1,
                    total_tokens: 5,
                    ..Default::default()
                }),
                ..base()
            },
        ),
        (
            "usage.input_tokens",
            pb::UpdateBatchRequest {
                usage: Some(pb::Usage {
                    input_tokens: -1,
                    ..Default::default()
                }),
                ..base()
            },
        ),
        (
            "batch_id",
            pb::UpdateBatchRequest {
                batch_id: "nope".into(),
                ..Default::default()
            },
        ),
    ];
    for (field, request) in cases {
        assert_status(
            worker.update_batch(request).await,
            Code::InvalidArgument,
            field,
        );
    }
    let unchanged = get(&mut client, &batch.id).await;
    assert_eq!(unchanged, batch);
}

async fn cancel_is_idempotent_and_refused_once_finished(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = app.client(&app.admin_key);
    let mut worker = app.worker(&app.admin_key);
    let cancel = |id: &str| pb::CancelBatchRequest {
        batch_id: id.to_owned(),
    };

    let batch = create(&mut client).await;
    worker
        .update_batch(move_to(&batch.id, S::InProgress))
        .await
        .unwrap();
    let cancelling = client
        .cancel_batch(cancel(&batch.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelling.status(), S::Cancelling);
    assert!(cancelling.cancelling_at.is_some());
    assert_eq!(cancelling.version, 3);
    let again = client
        .cancel_batch(cancel(&batch.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, cancelling, "a second cancel changes nothing");

    // The worker winds down and confirms; a cancel after that still changes nothing.
    let cancelled = worker
        .update_batch(move_to(&batch.id, S::Cancelled))
        .await
        .unwrap()
        .into_inner();
    assert!(cancelled.cancelled_at.is_some());
    assert_eq!(
        client
            .cancel_batch(cancel(&batch.id))
            .await
            .unwrap()
            .into_inner(),
        cancelled
    );
    // A cancelling batch can only become cancelled.
    let other = create(&mut client).await;
    client.cancel_batch(cancel(&other.id)).await.unwrap();
    assert_status(
        worker.update_batch(move_to(&other.id, S::InProgress)).await,
        Code::FailedPrecondition,
        "`cancelling` to `in_progress`",
    );

    let finished = create(&mut client).await;
    complete(&mut worker, &finished.id).await;
    assert_status(
        client.cancel_batch(cancel(&finished.id)).await,
        Code::FailedPrecondition,
        "`completed` to `cancelling`",
    );
}

on_both_stores!(
    a_new_batch_starts_validating_at_version_1_and_expires_after_its_window,
    create_refuses_bad_input_and_names_the_field,
    ids_that_are_malformed_or_unknown_are_told_apart,
    paging_returns_every_batch_exactly_once_newest_first,
    list_filters_by_status_and_job,
    list_refuses_bad_limits_statuses_and_cursors,
    a_worker_drives_a_batch_to_completion_and_every_version_is_logged,
    an_illegal_transition_is_refused_naming_both_statuses_and_writes_nothing,
    a_stale_expected_version_is_aborted_and_writes_nothing,
    request_counts_are_checked_and_never_go_down,
    bad_worker_input_is_refused_naming_the_field,
    cancel_is_idempotent_and_refused_once_finished,
);
