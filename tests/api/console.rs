//! The web console's serving (its behaviour in a browser is tests/browser's), and the
//! two REST routes it needs beyond OpenAI's: `GET /v1/batch_counts` and `GET /v1/me`.

use std::io::Read;

use batchd::domain::Scope;
use reqwest::Method;
use reqwest::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG,
    IF_NONE_MATCH, LOCATION,
};
use serde_json::json;

use crate::helpers::*;

/// The hashed file names a page references as `assets/<name>`.
fn referenced_assets(page: &str) -> Vec<String> {
    page.split("\"assets/")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_console_is_served_with_a_strict_policy_and_files_cached_by_their_hash() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("http://{}", app.http_addr);

    let root = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(root.status(), 303);
    assert_eq!(root.headers()[LOCATION], "/console/");

    let page = http.get(format!("{base}/console/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    let policy = headers[CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(policy.contains("default-src 'none'"), "{policy}");
    assert!(
        !policy.contains("unsafe-inline") && !policy.contains("unsafe-eval"),
        "{policy}"
    );
    assert_eq!(headers[CACHE_CONTROL], "no-cache");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let page = page.text().await.unwrap();
    assert!(!page.contains("<script>"), "no inline script: {page}");

    let assets = referenced_assets(&page);
    assert_eq!(
        assets.len(),
        3,
        "the icon, the style sheet, the script: {page}"
    );
    for name in &assets {
        assert!(
            name.split('.').nth(1).is_some_and(|hash| hash.len() == 12),
            "{name} carries a hash"
        );
        let plain = http
            .get(format!("{base}/console/assets/{name}"))
            .send()
            .await
            .unwrap();
        assert_eq!(plain.status(), 200, "{name}");
        assert_eq!(
            plain.headers()[CACHE_CONTROL],
            "public, max-age=31536000, immutable"
        );
        assert!(plain.headers().get(CONTENT_ENCODING).is_none());
        assert!(plain.headers().contains_key(CONTENT_SECURITY_POLICY));
        let etag = plain.headers()[ETAG].clone();
        let content_type = plain.headers()[CONTENT_TYPE].to_str().unwrap().to_owned();
        let expected_type = match name.rsplit('.').next() {
            Some("js") => "text/javascript",
            Some("svg") => "image/svg+xml",
            _ => "text/css",
        };
        assert!(content_type.starts_with(expected_type), "{content_type}");
        let identity = plain.bytes().await.unwrap();

        // Compressed as the browser accepts, decoding to the same bytes.
        let brotli = http
            .get(format!("{base}/console/assets/{name}"))
            .header(ACCEPT_ENCODING, "gzip, deflate, br")
            .send()
            .await
            .unwrap();
        assert_eq!(brotli.headers()[CONTENT_ENCODING], "br");
        let mut decoded = Vec::new();
        brotli::Decompressor::new(brotli.bytes().await.unwrap().as_ref(), 4096)
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, identity);
        let gzip = http
            .get(format!("{base}/console/assets/{name}"))
            .header(ACCEPT_ENCODING, "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(gzip.headers()[CONTENT_ENCODING], "gzip");
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(gzip.bytes().await.unwrap().as_ref())
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, identity);

        let again = http
            .get(format!("{base}/console/assets/{name}"))
            .header(IF_NONE_MATCH, etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304);
    }

    // A module's imports name hashed files that are served too.
    let app_js = assets.iter().find(|name| name.starts_with("app.")).unwrap();
    let text = http
        .get(format!("{base}/console/assets/{app_js}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let imports: Vec<&str> = text
        .split("from \"./")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap())
        .collect();
    assert!(imports.len() >= 3, "{imports:?}");
    for import in imports {
        let status = http
            .get(format!("{base}/console/assets/{import}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{import}");
    }

    let unknown = http
        .get(format!("{base}/console/assets/app.000000000000.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn console_false_serves_neither_the_console_nor_the_redirect() {
    let app = TestApp::spawn_with(Backend::Sqlite, |options| options.console = false).await;
    let rest = app.rest(None);
    for path in ["/", "/console/", "/console/assets/app.js"] {
        let (status, body) = rest.get(path).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(body["error"]["code"], "unknown_url", "{path}");
    }
    // The API itself is unaffected.
    let (status, _) = app.rest(Some(&app.admin_key)).get("/v1/batches").await;
    assert_eq!(status, 200);
}

async fn counts_per_status_cover_exactly_what_the_key_sees(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let alice = app.rest(Some(&app.key("alice", Scope::Batches).await));
    let bob = app.rest(Some(&app.key("bob", Scope::Batches).await));
    let worker = app.rest(Some(&app.key("executor", Scope::Worker).await));
    let body = |job: &str| {
        json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions",
               "completion_window": "24h", "job_id": job, "metadata": {"team": job}})
    };
    let mut alice_ids = Vec::new();
    for i in 0..5 {
        let job = if i < 3 { "nightly" } else { "adhoc" };
        let (status, batch) = alice.post("/v1/batches", body(job)).await;
        assert_eq!(status, 200, "{batch}");
        alice_ids.push(batch["id"].as_str().unwrap().to_owned());
    }
    for _ in 0..2 {
        let (status, _) = bob.post("/v1/batches", body("nightly")).await;
        assert_eq!(status, 200);
    }
    let (status, moved) = Rest::send(
        worker
            .request(Method::PATCH, &format!("/v1/batches/{}", alice_ids[0]))
            .json(&json!({"status": "in_progress", "request_counts": {"total": 10, "completed": 0, "failed": 0}})),
    )
    .await;
    assert_eq!(status, 200, "{moved}");
    let (status, _) = alice
        .post(&format!("/v1/batches/{}/cancel", alice_ids[1]), json!({}))
        .await;
    assert_eq!(status, 200);

    let (status, counts) = alice.get("/v1/batch_counts").await;
    assert_eq!(status, 200, "{counts}");
    assert_eq!(counts["object"], "batch_counts");
    assert_eq!(
        counts["total"], 5,
        "bob's batches are not counted: {counts}"
    );
    assert_eq!(counts["counts"]["validating"], 3);
    assert_eq!(counts["counts"]["in_progress"], 1);
    assert_eq!(counts["counts"]["cancelling"], 1);
    assert_eq!(counts["counts"]["completed"], 0, "every status is present");

    let (_, filtered) = alice.get("/v1/batch_counts?job_id=nightly").await;
    assert_eq!(filtered["total"], 3, "{filtered}");
    let (_, by_metadata) = alice.get("/v1/batch_counts?metadata[team]=adhoc").await;
    assert_eq!(by_metadata["total"], 2, "{by_metadata}");
    let (_, by_status) = alice
        .get("/v1/batch_counts?status=validating&status=cancelling")
        .await;
    assert_eq!(by_status["total"], 4, "{by_status}");
    assert_eq!(by_status["counts"]["in_progress"], 0);

    let (_, everyone) = worker.get("/v1/batch_counts").await;
    assert_eq!(
        everyone["total"], 7,
        "a worker key sees every owner: {everyone}"
    );
    let (_, bobs) = bob.get("/v1/batch_counts").await;
    assert_eq!(bobs["total"], 2);
}

async fn counts_refuse_paging_and_bad_filters_by_name(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let rest = app.rest(Some(&app.admin_key));
    for (query, param) in [
        ("limit=5", "limit"),
        ("after=batch_00000000000000000000000000000000", "after"),
        ("order=asc", "order"),
        ("status=running", "status"),
        ("created_after=soon", "created_after"),
        ("created_after=9223372036854775808", "created_after"),
        ("metadata[k]=%00", "metadata.k"),
        (
            "metadata[a]=1&metadata[b]=2&metadata[c]=3&metadata[d]=4&metadata[e]=5",
            "metadata",
        ),
    ] {
        let (status, body) = rest.get(&format!("/v1/batch_counts?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["param"], param, "{query}: {body}");
    }
    let long_job = "j".repeat(60_000);
    let (status, body) = rest
        .get(&format!("/v1/batch_counts?job_id={long_job}"))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "job_id", "{body}");
    let (status, body) = app.rest(None).get("/v1/batch_counts").await;
    assert_eq!(status, 401, "{body}");
}

on_both_stores!(
    counts_per_status_cover_exactly_what_the_key_sees,
    counts_refuse_paging_and_bad_filters_by_name,
);

#[tokio::test]
async fn me_names_the_key_and_what_its_scope_may_do() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let expectations = [
        (
            Scope::Batches,
            false,
            vec![
                "create_batches",
                "read_batches",
                "cancel_batches",
                "delete_batches",
                "manage_webhooks",
            ],
        ),
        (Scope::Worker, true, vec!["read_batches", "update_batches"]),
        (
            Scope::Admin,
            true,
            vec![
                "create_batches",
                "read_batches",
                "cancel_batches",
                "delete_batches",
                "update_batches",
                "manage_webhooks",
            ],
        ),
    ];
    for (scope, all_owners, permissions) in expectations {
        let key = app.key("carol", scope).await;
        let (status, me) = app.rest(Some(&key)).get("/v1/me").await;
        assert_eq!(status, 200, "{me}");
        assert_eq!(me["object"], "api_key");
        assert_eq!(me["user_id"], "carol");
        assert_eq!(me["scope"], scope.as_str());
        assert_eq!(me["sees_all_owners"], all_owners, "{me}");
        assert_eq!(me["permissions"], json!(permissions), "{me}");
        assert!(me["id"].as_str().unwrap().starts_with("key_"));
        assert!(!me.to_string().contains(&key), "the secret is never echoed");
    }
    let (status, _) = app.rest(Some("bd_sk_nope")).get("/v1/me").await;
    assert_eq!(status, 401);
}
