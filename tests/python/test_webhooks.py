"""The official openai SDK manages batchd's webhook endpoints (create, list with
paging, retrieve, update, rotate_secret, test, delete, event types), and
`client.webhooks.unwrap` accepts every delivery batchd sends to a local receiver."""

import http.server
import json
import threading
import time

import urllib.request

import openai
import pytest


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

    assert client.webhooks.event_types.list().data[:4] == [
        "batch.completed",
        "batch.failed",
        "batch.expired",
        "batch.cancelled",
    ]

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
    assert [(e.type, e.data.id) for e in events] == [
        ("batch.created", batch.id),
        ("batch.cancelling", batch.id),
        ("batch.cancelled", batch.id),
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
