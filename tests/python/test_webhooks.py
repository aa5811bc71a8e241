"""The official openai SDK manages batchd's webhook endpoints (create, list with
paging, retrieve, update, rotate_secret, test, delete, event types), and
`client.webhooks.unwrap` accepts every delivery batchd sends to a local receiver,
batchd's own `batch.stalled` included."""

import http.server
import json
import threading
import time

import urllib.request

import openai
import pytest

from conftest import STALL_AFTER


class Receiver:
    """A webhook receiver on a random local port, answering 200 and keeping every
    request's headers and body."""

    def __init__(self):
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                received.append((self.path, dict(self.headers), body.decode()))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{path}"

    def at(self, path: str) -> list:
        return [(headers, body) for (p, headers, body) in self.received if p == f"/{path}"]

    def wait_for(self, path: str, count: int, timeout: float = 20.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.at(path)) < count:
            assert time.monotonic() < deadline, f"{len(self.at(path))} of {count} deliveries at /{path}"
            time.sleep(0.05)
        return self.at(path)


# The event types OpenAI sends, in the order GET /v1/webhook_event_types lists them.
OPENAI_EVENT_TYPES = ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"]


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


def test_the_sdk_manages_endpoints_and_pages_through_them(batchd_with_local_webhooks, receiver):
    server = batchd_with_local_webhooks
    client = server.client(server.key("sdk-endpoints"))
    created = [
        client.webhooks.create(
            name=f"hook {i}", url=receiver.url(f"p{i}"), event_types=["batch.completed"]
        )
        for i in range(5)
    ]
    for endpoint in created:
        assert endpoint.object == "webhook_endpoint"
        assert endpoint.signing_secret.startswith("whsec_")
        assert endpoint.signing_secret_hint == endpoint.signing_secret[-4:]
        assert endpoint.event_types == ["batch.completed"]
    # Auto-pagination with `after`, two at a time, newest first.
    listed = [endpoint.id for endpoint in client.webhooks.list(limit=2)]
    assert listed == [endpoint.id for endpoint in reversed(created)]
    first_page = client.webhooks.list(limit=2)
    assert first_page.has_more is True and len(first_page.data) == 2

    one = created[0]
    retrieved = client.webhooks.retrieve(one.id)
    assert (retrieved.id, retrieved.name, retrieved.url) == (one.id, one.name, one.url)
    assert "signing_secret" not in (retrieved.model_extra or {}), "the secret is shown once"

    updated = client.webhooks.update(
        one.id, name="renamed", event_types=["batch.completed", "batch.failed"]
    )
    assert updated.name == "renamed"
    assert updated.event_types == ["batch.completed", "batch.failed"]
    assert updated.url == one.url

    event_types = client.webhooks.event_types.list().data
    assert event_types[:4] == OPENAI_EVENT_TYPES
    assert event_types[-1] == "batch.stalled", "batchd's own types follow OpenAI's"

    deleted = client.webhooks.delete(one.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (one.id, "webhook_endpoint.deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.webhooks.retrieve(one.id)
    with pytest.raises(openai.BadRequestError) as refused:
        client.webhooks.create(name="x", url="ftp://127.0.0.1/", event_types=["batch.completed"])
    assert "url" in str(refused.value)


def test_unwrap_accepts_every_delivery_across_a_rotation(batchd_with_local_webhooks, receiver):
    server = batchd_with_local_webhooks
    client = server.client(server.key("sdk-deliveries"))
    endpoint = client.webhooks.create(
        name="lifecycle",
        url=receiver.url("hook"),
        event_types=["batch.created", "batch.cancelling", "batch.cancelled"],
    )
    old_secret = endpoint.signing_secret

    tested = client.webhooks.test(endpoint.id, event_type="batch.completed")
    assert (tested.object, tested.webhook_endpoint_id, tested.event_type) == (
        "webhook_endpoint.test",
        endpoint.id,
        "batch.completed",
    )
    assert tested.status_code == 200 and tested.success is True
    headers, body = receiver.wait_for("hook", 1)[0]
    event = client.webhooks.unwrap(body, headers, secret=old_secret)
    assert event.type == "batch.completed"

    batch = client.batches.create(
        input_file_id="file-webhooks", endpoint="/v1/chat/completions", completion_window="24h"
    )
    client.batches.cancel(batch.id)
    # A worker finishes the cancellation.
    request = urllib.request.Request(
        f"{server.http_url}/v1/batches/{batch.id}",
        method="PATCH",
        headers={
            "authorization": f"Bearer {server.key('sdk-worker', 'worker')}",
            "content-type": "application/json",
        },
        data=json.dumps({"status": "cancelled"}).encode(),
    )
    with urllib.request.urlopen(request) as worker:
        assert worker.status == 200
    deliveries = receiver.wait_for("hook", 4)
    events = [client.webhooks.unwrap(body, headers, secret=old_secret) for headers, body in deliveries[1:]]
    # Up to --webhook-concurrency-per-endpoint deliveries to one endpoint are in flight
    # at once, so events queued together may arrive in either order.
    assert sorted((e.type, e.data.id) for e in events) == [
        ("batch.cancelled", batch.id),
        ("batch.cancelling", batch.id),
        ("batch.created", batch.id),
    ]
    for (headers, body), event in zip(deliveries[1:], events):
        assert headers["webhook-id"] == event.id
        assert json.loads(body)["object"] == "event"

    # Rotation with overlap: both secrets verify until it ends.
    rotated = client.webhooks.rotate_secret(endpoint.id, keep_old_secret_active_for_24_hours=True)
    new_secret = rotated.signing_secret
    assert new_secret != old_secret
    client.webhooks.test(endpoint.id, event_type="batch.failed")
    headers, body = receiver.wait_for("hook", 5)[4]
    assert client.webhooks.unwrap(body, headers, secret=new_secret).type == "batch.failed"
    assert client.webhooks.unwrap(body, headers, secret=old_secret).type == "batch.failed"

    # Without overlap the old secret stops at once.
    newest = client.webhooks.rotate_secret(endpoint.id).signing_secret
    client.webhooks.test(endpoint.id, event_type="batch.expired")
    headers, body = receiver.wait_for("hook", 6)[5]
    assert client.webhooks.unwrap(body, headers, secret=newest).type == "batch.expired"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(body, headers, secret=new_secret)


def metric(server, sample: str) -> float:
    """The value of one sample of batchd's /metrics, e.g. `name{label="value"}`."""
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return next(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(f"{sample} "))


def eventually(check, timeout: float = 10.0) -> bool:
    """Whether `check()` holds within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_quiet_batch_is_reported_stalled_only_to_endpoints_that_asked(batchd_quick_to_stall, receiver):
    server = batchd_quick_to_stall
    owner, worker = server.key("stall-owner"), server.key("stall-worker", "worker")
    client = server.client(owner)
    stalls = client.webhooks.create(name="stalls", url=receiver.url("stalls"), event_types=["batch.stalled"])
    openai_only = client.webhooks.create(name="openai", url=receiver.url("openai"), event_types=OPENAI_EVENT_TYPES)
    batch = client.batches.create(
        input_file_id="file-stalls", endpoint="/v1/chat/completions", completion_window="24h"
    )
    status, _, running = server.http(
        "PATCH", f"/v1/batches/{batch.id}", worker,
        {"status": "in_progress", "request_counts": {"total": 10, "completed": 0, "failed": 0}},
    )
    assert (status, running["stalled_at"]) == (200, None), running

    # Quiet for STALL_AFTER seconds, the batch is marked by the next sweep (every second).
    headers, body = receiver.wait_for("stalls", 1, timeout=STALL_AFTER + 8)[0]
    event = client.webhooks.unwrap(body, headers, secret=stalls.signing_secret)
    assert (event.type, event.data.id) == ("batch.stalled", batch.id)
    assert headers["webhook-id"] == event.id
    assert json.loads(body) == {
        "id": event.id, "object": "event", "type": "batch.stalled",
        "created_at": event.created_at, "data": {"id": batch.id},
    }

    # The SDK reads the marked batch as any other; the mark is the version after the
    # last change, and a stalled batch has no estimate.
    retrieved = client.batches.with_raw_response.retrieve(batch.id)
    raw, parsed = retrieved.http_response.json(), retrieved.parse()
    assert (parsed.id, parsed.status) == (batch.id, "in_progress")
    assert raw["version"] == running["version"] + 1
    assert raw["stalled_at"] == raw["updated_at"] >= running["updated_at"] + STALL_AFTER, raw
    assert parsed.model_extra["stalled_at"] == raw["stalled_at"]
    assert raw["estimated_completion_at"] is None
    assert "progress_rate" in raw

    # Lists and counts filter on the mark; the change feed refuses the filter.
    listed = lambda stalled: [b.id for b in client.batches.list(extra_query={"stalled": stalled})]
    assert (listed("true"), listed("false")) == ([batch.id], [])
    status, _, counts = server.http("GET", "/v1/batch_counts?stalled=true", owner)
    assert (status, counts["total"], counts["counts"]["in_progress"]) == (200, 1, 1), counts
    for path in ["/v1/batches?stalled=maybe", "/v1/batch_counts?stalled=maybe", "/v1/batch_events?stalled=true"]:
        status, _, refused = server.http("GET", path, owner)
        assert (status, refused["error"]["param"]) == (400, "stalled"), (path, refused)
    assert eventually(lambda: metric(server, 'batchd_stalled_batches{status="in_progress"}') == 1)
    assert metric(server, 'batchd_batches_stalled_total{status="in_progress"}') == 1

    # The batch's next change clears the mark.
    status, _, moved = server.http(
        "PATCH", f"/v1/batches/{batch.id}", worker,
        {"request_counts": {"total": 10, "completed": 4, "failed": 0}},
    )
    assert (status, moved["stalled_at"]) == (200, None), moved
    assert listed("true") == []
    for step in ["finalizing", "completed"]:
        status, _, body = server.http("PATCH", f"/v1/batches/{batch.id}", worker, {"status": step})
        assert status == 200, body

    # The dispatcher follows the feed in order, so once batch.completed arrives every
    # change before it has been dispatched: the stall went to the endpoint that asked
    # for it, and never to the one subscribed to OpenAI's events only. (That a stall is
    # marked once, tests/api/stalls.rs shows on a manual clock: here a slow moment
    # between the reports above could rightly be a second stall.)
    headers, body = receiver.wait_for("openai", 1)[0]
    completed = client.webhooks.unwrap(body, headers, secret=openai_only.signing_secret)
    assert (completed.type, completed.data.id) == ("batch.completed", batch.id)
    queued = lambda endpoint: [
        (d["event_type"], d["batch_id"])
        for d in server.http("GET", f"/v1/webhook_endpoints/{endpoint.id}/deliveries", owner)[2]["data"]
    ]
    assert queued(openai_only) == [("batch.completed", batch.id)]
    assert set(queued(stalls)) == {("batch.stalled", batch.id)}
    assert len(receiver.at("openai")) == 1
    assert eventually(lambda: metric(server, 'batchd_stalled_batches{status="in_progress"}') == 0)
