"""`GET /openapi.json` is kept true: it documents exactly batchd's routes, and
schemathesis drives every documented operation (positive and negative inputs,
stateful sequences) and checks each response against it (status codes, content
types, schemas, auth, that schema-valid input is accepted and invalid input refused),
except the watch streams, which the Rust suite covers."""

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

ROUTES = {
    ("/v1/batches", "post"),
    ("/v1/batches", "get"),
    ("/v1/batches/{batch_id}", "get"),
    ("/v1/batches/{batch_id}", "patch"),
    ("/v1/batches/{batch_id}", "delete"),
    ("/v1/batches/{batch_id}/cancel", "post"),
    ("/v1/batches/{batch_id}/watch", "get"),
    ("/v1/batch_events", "get"),
    ("/v1/batch_counts", "get"),
    ("/v1/me", "get"),
    ("/v1/webhook_endpoints", "post"),
    ("/v1/webhook_endpoints", "get"),
    ("/v1/webhook_endpoints/{webhook_endpoint_id}", "get"),
    ("/v1/webhook_endpoints/{webhook_endpoint_id}", "post"),
    ("/v1/webhook_endpoints/{webhook_endpoint_id}", "delete"),
    ("/v1/webhook_endpoints/{webhook_endpoint_id}/rotate_secret", "post"),
    ("/v1/webhook_endpoints/{webhook_endpoint_id}/test", "post"),
    ("/v1/webhook_endpoints/{webhook_endpoint_id}/deliveries", "get"),
    ("/v1/webhook_endpoints/{webhook_endpoint_id}/deliveries/{delivery_id}/retry", "post"),
    ("/v1/webhook_event_types", "get"),
    ("/healthz", "get"),
    ("/readyz", "get"),
    ("/metrics", "get"),
}


def document(batchd) -> dict:
    with urllib.request.urlopen(f"{batchd.http_url}/openapi.json") as response:
        assert response.status == 200
        return json.load(response)


def test_the_document_lists_exactly_the_routes_batchd_serves(batchd):
    doc = document(batchd)
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == ROUTES
    # Each documented route answers (no 404 "no route", no 405) on the real server.
    key = batchd.key("alice")
    for path, method in ROUTES:
        url = batchd.http_url + (
            path.replace("{batch_id}", "batch_" + "0" * 32)
            .replace("{webhook_endpoint_id}", "we_" + "0" * 24)
            .replace("{delivery_id}", "wd_" + "0" * 24)
        )
        if path == "/v1/batch_events":
            # A valid request opens a stream that never ends; a bad cursor answers 400.
            url += "?after_cursor=not-a-cursor"
        request = urllib.request.Request(url, method=method.upper())
        request.add_header("Authorization", f"Bearer {key}")
        if method in ("post", "patch"):
            request.add_header("Content-Type", "application/json")
            request.data = b"{}"
        try:
            with urllib.request.urlopen(request) as response:
                code, body = response.status, response.read()
        except urllib.error.HTTPError as error:
            code, body = error.code, error.read()
        assert code != 405, (path, method)
        assert b"unknown_url" not in body, (path, method)


def test_the_stall_filter_and_fields_are_documented_where_batchd_has_them(batchd):
    doc = document(batchd)

    def parameter(path: str, name: str) -> dict | None:
        return next((p for p in doc["paths"][path]["get"].get("parameters", []) if p["name"] == name), None)

    # Lists and counts take `stalled=true|false`, which schemathesis then drives; the
    # change feed refuses it (400 naming it), so its operation does not offer it.
    for path in ["/v1/batches", "/v1/batch_counts"]:
        stalled = parameter(path, "stalled")
        assert stalled is not None, path
        assert (stalled["in"], stalled["schema"]["type"], stalled.get("required", False)) == ("query", "boolean", False), path
    assert parameter("/v1/batch_events", "stalled") is None
    # batchd's own fields are always present, null when unknown.
    batch = doc["components"]["schemas"]["Batch"]
    for name, kind in [("progress_rate", "number"), ("estimated_completion_at", "integer"), ("stalled_at", "integer")]:
        assert name in batch["required"], name
        assert batch["properties"][name]["type"] == [kind, "null"], name


def schemathesis(batchd, tmp_path: Path, *options: str):
    """Runs schemathesis against batchd's document with every check but those excluded
    by `options`, and asserts it found nothing."""
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run", f"{batchd.http_url}/openapi.json",
            "--header", f"Authorization: Bearer {batchd.admin_key}",
            "--checks", "all",
            "--max-examples", "40",
            "--seed", "20261122",
            "--generation-database", "none",
            "--no-color",
            # The watch streams stay open (until the batch is terminal, or for good),
            # which a request/response fuzzer cannot wait for; tests/api/watch.rs and
            # tests/api/change_feed.rs cover them.
            "--exclude-operation-id", "watchBatch",
            "--exclude-operation-id", "watchBatches",
            *options,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout, result.stdout[-3000:]


WEBHOOK_OPERATIONS = [
    "createWebhookEndpoint",
    "listWebhookEndpoints",
    "retrieveWebhookEndpoint",
    "updateWebhookEndpoint",
    "deleteWebhookEndpoint",
    "rotateWebhookEndpointSecret",
    "testWebhookEndpoint",
    "listWebhookDeliveries",
    "retryWebhookDelivery",
    "listWebhookEventTypes",
]


def test_every_operation_conforms_to_the_document(batchd, tmp_path: Path):
    excluded = ["updateBatch", *WEBHOOK_OPERATIONS]
    schemathesis(batchd, tmp_path, *(f"--exclude-operation-id={op}" for op in excluded))


def test_the_webhook_operations_conform_to_the_document(batchd, tmp_path: Path):
    # An endpoint's URL must resolve to a public address and answer a test delivery,
    # which JSON Schema cannot state, so schema-valid requests may rightly be refused
    # with 400 (the URL) or 409 (the test delivery failed); every other check applies.
    schemathesis(
        batchd, tmp_path,
        *(f"--include-operation-id={op}" for op in WEBHOOK_OPERATIONS),
        "--exclude-checks", "positive_data_acceptance",
        "--warnings", "off",
    )


def test_the_worker_update_conforms_to_the_document(batchd, tmp_path: Path):
    # An update has rules across fields that JSON Schema cannot state (total_tokens is
    # input + output, completed + failed <= total), so schema-valid updates may rightly
    # be refused with 400; every other check applies.
    # Creates run alongside, so that the stateful phase updates real batches; warnings
    # (that most generated updates are refused, as they must be) are not findings.
    schemathesis(
        batchd, tmp_path,
        "--include-operation-id", "updateBatch",
        "--include-operation-id", "createBatch",
        "--exclude-checks", "positive_data_acceptance",
        "--warnings", "off",
    )
