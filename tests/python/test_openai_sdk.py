"""The official `openai` SDK, pointed at batchd with `base_url`, works unchanged:
create, retrieve, list (with pagination) and cancel, and the SDK's exceptions for
missing keys and other tenants' batches; its default retries get it through a per-key
rate limit; a deleted batch is then not found. Every response must parse strictly into
the SDK's own pydantic model, with no field missing and no warning."""

import concurrent.futures
import re
import time
import warnings

import openai
import pytest
from openai.types import Batch

from conftest import RATE_LIMIT, RATE_LIMIT_BURST

# The fields batchd adds to OpenAI's object (documented by other vendors).
EXTENSIONS = {
    "job_id", "remark", "user_id", "api_key_id", "version", "updated_at",
    # OpenAI takes it on create but does not echo it on the object; batchd returns it
    # for the worker that writes the output files.
    "output_expires_after",
    # Stalls and estimates: batchd's own, always present, null when unknown.
    "progress_rate", "estimated_completion_at", "stalled_at",
}
STATUSES = {
    "validating", "failed", "in_progress", "finalizing",
    "completed", "expired", "cancelling", "cancelled",
}


def strictly_parsed(raw: dict) -> Batch:
    """Validates a raw JSON batch with the SDK's model, turning any warning into an
    error, and checks that every field the SDK knows is present (none omitted) and
    that the only extras are batchd's documented extensions."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = Batch.model_validate(raw, strict=False)
    missing = set(Batch.model_fields) - set(raw)
    assert not missing, f"fields omitted instead of null: {missing}"
    assert set(batch.model_extra or {}) == EXTENSIONS
    assert isinstance(batch.created_at, int) and batch.status in STATUSES
    return batch


def create(client: openai.OpenAI, **extra) -> Batch:
    response = client.batches.with_raw_response.create(
        input_file_id="file-abc123",
        endpoint="/v1/chat/completions",
        completion_window="24h",
        **extra,
    )
    strictly_parsed(response.http_response.json())
    return response.parse()


# CreateBatchRequest.endpoint in OpenAI's OpenAPI document (openai/openai-openapi).
OPENAI_ENDPOINTS = [
    "/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions",
    "/v1/moderations", "/v1/images/generations", "/v1/images/edits", "/v1/videos",
]


def test_every_endpoint_openai_accepts_is_accepted_by_default(batchd):
    client = batchd.client(batchd.key("alice"))
    for endpoint in OPENAI_ENDPOINTS:
        response = client.batches.with_raw_response.create(
            input_file_id="file-abc123", endpoint=endpoint, completion_window="24h"
        )
        assert strictly_parsed(response.http_response.json()).endpoint == endpoint


def test_output_expires_after_is_checked_stored_and_returned(batchd):
    client = batchd.client(batchd.key("alice"))
    expiry = {"anchor": "created_at", "seconds": 7 * 24 * 3600}
    batch = create(client, output_expires_after=expiry)
    assert batch.model_extra["output_expires_after"] == expiry
    fetched = client.batches.retrieve(batch.id)
    assert fetched.model_extra["output_expires_after"] == expiry
    assert create(client).model_extra["output_expires_after"] is None
    for bad, param in [
        ({"anchor": "created_at", "seconds": 3599}, "output_expires_after.seconds"),
        ({"anchor": "created_at", "seconds": 2592001}, "output_expires_after.seconds"),
        ({"anchor": "completed_at", "seconds": 3600}, "output_expires_after.anchor"),
        ({"anchor": "created_at"}, "output_expires_after"),
    ]:
        with pytest.raises(openai.BadRequestError) as error:
            create(client, output_expires_after=bad)
        assert error.value.param == param, bad


def test_the_schema_check_catches_what_openai_would_refuse():
    from conftest import conforms_to_openai
    import jsonschema

    valid = {
        "id": "batch_1", "object": "batch", "endpoint": "/v1/embeddings",
        "input_file_id": "file-1", "completion_window": "24h", "status": "validating",
        "created_at": 1, "errors": None, "metadata": None,
    }
    conforms_to_openai(valid)
    for broken in [
        {**valid, "status": "running"},
        {**valid, "created_at": "yesterday"},
        {k: v for k, v in valid.items() if k != "endpoint"},
        {**valid, "request_counts": {"total": 1}},
    ]:
        with pytest.raises(jsonschema.ValidationError):
            conforms_to_openai(broken)


def test_create_retrieve_and_cancel(batchd):
    client = batchd.client(batchd.key("alice"))
    batch = create(client, metadata={"team": "search", "run": "7"})
    assert batch.object == "batch"
    assert batch.status == "validating"
    assert batch.id.startswith("batch_")
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert batch.metadata == {"team": "search", "run": "7"}
    assert batch.request_counts.total == 0
    assert batch.errors is None and batch.usage is None and batch.output_file_id is None
    assert batch.model_extra["version"] == 1
    assert batch.model_extra["user_id"] == "alice"

    fetched = client.batches.with_raw_response.retrieve(batch.id)
    assert strictly_parsed(fetched.http_response.json()) == batch
    assert fetched.parse() == batch

    cancelled = client.batches.with_raw_response.cancel(batch.id)
    cancelling = strictly_parsed(cancelled.http_response.json())
    assert cancelling.status == "cancelling"
    assert cancelling.cancelling_at is not None
    assert cancelling.model_extra["version"] == 2
    # Cancelling again changes nothing.
    assert client.batches.cancel(batch.id) == cancelling


def test_list_pages_through_every_batch_with_after(batchd):
    client = batchd.client(batchd.key("pager"))
    created = [create(client).id for _ in range(7)]
    newest_first = list(reversed(created))

    page = client.batches.with_raw_response.list(limit=3)
    raw = page.http_response.json()
    assert raw["object"] == "list" and raw["has_more"] is True
    assert raw["first_id"] == newest_first[0] and raw["last_id"] == newest_first[2]
    for item in raw["data"]:
        strictly_parsed(item)

    # The SDK follows `after` = the last id by itself, page after page.
    seen = [batch.id for batch in client.batches.list(limit=3)]
    assert seen == newest_first

    second = client.batches.list(limit=3, after=newest_first[2])
    assert [b.id for b in second.data] == newest_first[3:6]
    last = client.batches.list(limit=3, after=newest_first[5])
    assert [b.id for b in last.data] == newest_first[6:]
    assert last.has_more is False
    assert not last.has_next_page()


def test_another_tenants_batch_is_not_found(batchd):
    mine = create(batchd.client(batchd.key("alice")))
    stranger = batchd.client(batchd.key("mallory"))
    with pytest.raises(openai.NotFoundError) as foreign:
        stranger.batches.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError) as unknown:
        stranger.batches.retrieve("batch_" + "0" * 32)
    assert foreign.value.body["message"].replace(mine.id, "ID") == unknown.value.body[
        "message"
    ].replace("batch_" + "0" * 32, "ID")
    with pytest.raises(openai.NotFoundError):
        stranger.batches.cancel(mine.id)
    assert mine.id not in [b.id for b in stranger.batches.list()]


def test_missing_or_wrong_keys_are_authentication_errors(batchd):
    # The SDK refuses to send an empty key, so "no key" is an omitted header.
    no_key = {"extra_headers": {"Authorization": openai.omit}}
    for key, options in [("placeholder", no_key), ("bd_sk_not-a-key", {})]:
        with pytest.raises(openai.AuthenticationError) as error:
            batchd.client(key).batches.list(**options)
        assert error.value.status_code == 401
        assert error.value.body["type"] == "invalid_request_error"
        assert error.value.code == "invalid_api_key"


def test_other_client_errors_map_to_the_sdks_exceptions(batchd):
    worker = batchd.client(batchd.key("executor", "worker"))
    with pytest.raises(openai.PermissionDeniedError):
        create(worker)
    client = batchd.client(batchd.key("alice"))
    with pytest.raises(openai.BadRequestError) as error:
        client.batches.list(limit=0)
    assert error.value.param == "limit"
    with pytest.raises(openai.BadRequestError) as error:
        client.batches.create(
            input_file_id="file-1", endpoint="/v1/audio/speech", completion_window="24h"
        )
    assert error.value.param == "endpoint"
    with pytest.raises(openai.BadRequestError) as error:
        client.batches.create(
            input_file_id="file-1",
            endpoint="/v1/embeddings",
            completion_window="24h",
            metadata={f"k{i}": "v" for i in range(17)},
        )
    assert error.value.param == "metadata"


# OpenAI's x-ratelimit-reset-requests: a duration such as "1s", "6m0s", "1.5s" or "250ms".
RESET_DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+(\.\d+)?(ms|s)$")


def test_the_sdk_gets_through_a_rate_limit_by_honouring_retry_after(batchd_rate_limited):
    server = batchd_rate_limited
    statuses = []
    client = server.client(
        server.key("sdk-patient"),
        max_retries=openai.DEFAULT_MAX_RETRIES,
        on_response=lambda response: statuses.append(response.status_code),
    )
    batch = create(client)
    statuses.clear()
    calls = 60
    started = time.monotonic()
    for _ in range(calls):
        assert client.batches.retrieve(batch.id).id == batch.id
    elapsed = time.monotonic() - started
    # A full bucket holds the burst; the rest of the calls wait for the rate.
    assert elapsed >= (calls - RATE_LIMIT_BURST) / RATE_LIMIT - 0.5, elapsed
    assert statuses.count(200) == calls
    assert 429 in statuses and set(statuses) == {200, 429}, statuses


def test_a_call_over_the_rate_limit_gets_openais_429(batchd_rate_limited):
    server = batchd_rate_limited
    key = server.key("raw-hasty")
    status, headers, _ = server.http("GET", "/v1/batches?limit=1", key)
    # Every authenticated answer says where the key stands.
    assert status == 200
    assert headers["x-ratelimit-limit-requests"] == str(RATE_LIMIT_BURST)
    assert 0 <= int(headers["x-ratelimit-remaining-requests"]) < RATE_LIMIT_BURST
    assert RESET_DURATION.match(headers["x-ratelimit-reset-requests"]), headers["x-ratelimit-reset-requests"]

    # Three times the burst at once: a burst's worth passes, the others are refused.
    with concurrent.futures.ThreadPoolExecutor(max_workers=3 * RATE_LIMIT_BURST) as pool:
        answers = list(pool.map(lambda _: server.http("GET", "/v1/batches?limit=1", key), range(3 * RATE_LIMIT_BURST)))
    refused = [(headers, body) for status, headers, body in answers if status == 429]
    assert refused, [status for status, _, _ in answers]
    assert all(status in (200, 429) for status, _, _ in answers)
    headers, body = refused[0]
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["message"]
    retry_after = int(headers["Retry-After"])
    retry_after_ms = float(headers["retry-after-ms"])
    assert retry_after >= 1
    assert 0 < retry_after_ms <= retry_after * 1000
    assert headers["x-ratelimit-limit-requests"] == str(RATE_LIMIT_BURST)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert RESET_DURATION.match(headers["x-ratelimit-reset-requests"]), headers["x-ratelimit-reset-requests"]

    # Each key has its own bucket: another key of the same owner is not held up.
    assert server.http("GET", "/v1/batches?limit=1", server.key("raw-hasty", "admin"))[0] == 200


def cancelled(server, client: openai.OpenAI) -> Batch:
    """A new batch, cancelled by its owner and confirmed `cancelled` by a worker."""
    batch = client.batches.cancel(create(client).id)
    status, _, body = server.http(
        "PATCH", f"/v1/batches/{batch.id}", server.key("sdk-worker", "worker"), {"status": "cancelled"}
    )
    assert (status, body["status"]) == (200, "cancelled"), body
    return Batch.model_validate(body)


def test_a_terminal_batch_can_be_deleted_and_is_then_not_found(batchd):
    owner_key = batchd.key("sdk-deleter")
    client = batchd.client(owner_key)

    running = create(client)
    status, _, body = batchd.http("DELETE", f"/v1/batches/{running.id}", owner_key)
    assert status == 409 and "validating" in body["error"]["message"], body
    client.batches.cancel(running.id)
    status, _, body = batchd.http("DELETE", f"/v1/batches/{running.id}", owner_key)
    assert status == 409 and "cancelling" in body["error"]["message"], body
    assert client.batches.retrieve(running.id).status == "cancelling"

    batch = cancelled(batchd, client)
    status, _, body = batchd.http("DELETE", f"/v1/batches/{batch.id}", batchd.key("sdk-worker", "worker"))
    assert status == 403, body
    status, _, body = batchd.http("DELETE", f"/v1/batches/{batch.id}", batchd.key("sdk-stranger"))
    assert status == 404, body
    status, _, body = batchd.http("DELETE", f"/v1/batches/{batch.id}", owner_key)
    assert (status, body) == (200, {"id": batch.id, "object": "batch.deleted", "deleted": True})

    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve(batch.id)
    assert batch.id not in [b.id for b in client.batches.list()]
    status, _, body = batchd.http("DELETE", f"/v1/batches/{batch.id}", owner_key)
    assert status == 404, "a deleted batch is gone, as an unknown one"
    status, _, body = batchd.http("DELETE", "/v1/batches/batch_" + "0" * 32, owner_key)
    assert status == 404, body

    # An admin key may delete any owner's terminal batch.
    other = cancelled(batchd, client)
    status, _, body = batchd.http("DELETE", f"/v1/batches/{other.id}", batchd.admin_key)
    assert (status, body) == (200, {"id": other.id, "object": "batch.deleted", "deleted": True})
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve(other.id)
