"""Fixtures: a real batchd process per store (SQLite file, fresh PostgreSQL database),
on random ports, with API keys created through its own command line."""

import contextlib
import os
import re
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import json
import urllib.error
import urllib.request

import jsonschema
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
BATCHD = os.environ.get("BATCHD_BIN", str(ROOT / "target" / "debug" / "batchd"))
POSTGRES_URL = os.environ.get(
    "BATCHD_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"
)
SKIP_POSTGRES = os.environ.get("BATCHD_TEST_SKIP_POSTGRES") == "1"


def _nullable_unless_required(node):
    """OpenAI's live API sends `null` for optional fields it has no value for, which
    its published schemas do not say: every property that is not required may be null."""
    if isinstance(node, list):
        return [_nullable_unless_required(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_unless_required(value) for key, value in node.items()}
    required = set(node.get("required", []))
    for name, schema in node.get("properties", {}).items():
        if name not in required:
            node["properties"][name] = {"anyOf": [schema, {"type": "null"}]}
    return node


# OpenAI's published schemas of the batch object and the list page (openai_schemas.json
# says where from and when).
_OPENAI = json.loads((Path(__file__).with_name("openai_schemas.json")).read_text())
_OPENAI_COMPONENTS = {"schemas": _nullable_unless_required(_OPENAI["schemas"])}


def conforms_to_openai(body: dict) -> None:
    """Validates a batch or a page of batches against OpenAI's own schema."""
    name = {"batch": "Batch", "list": "ListBatchesResponse"}[body["object"]]
    schema = {"$ref": f"#/components/schemas/{name}", "components": _OPENAI_COMPONENTS}
    jsonschema.Draft202012Validator(schema).validate(body)


def _check_response(response) -> None:
    """Every successful batch response the SDK receives must conform to OpenAI's schema."""
    if response.status_code == 200 and "/batches" in response.url.path:
        response.read()
        body = response.json()
        if isinstance(body, dict) and body.get("object") in ("batch", "list"):
            conforms_to_openai(body)


@dataclass
class Batchd:
    """A running `batchd serve`."""

    process: subprocess.Popen
    database_url: str
    http_url: str
    grpc_target: str
    # The admin key batchd printed at its first start on an empty database; None when
    # the database already had a key (a second replica).
    admin_key: str | None
    keys: dict = field(default_factory=dict)

    def key(self, user: str, scope: str = "batches") -> str:
        """A new API key, made with `batchd keys create` (its last stdout line)."""
        if (user, scope) not in self.keys:
            out = subprocess.run(
                [BATCHD, "keys", "create", "--user", user, "--scope", scope],
                env={**os.environ, "BATCHD_DATABASE_URL": self.database_url},
                check=True,
                capture_output=True,
                text=True,
            )
            self.keys[(user, scope)] = out.stdout.strip().splitlines()[-1]
        return self.keys[(user, scope)]

    def client(self, key: str, max_retries: int = 0, on_response=None) -> openai.OpenAI:
        """The official SDK, pointed at batchd; every batch or page it receives is
        checked against OpenAI's published schemas. No retries unless asked for (a test
        then sees each answer); `on_response` sees every HTTP response, retries included."""
        hooks = [_check_response] + ([on_response] if on_response else [])
        return openai.OpenAI(
            api_key=key,
            base_url=f"{self.http_url}/v1",
            max_retries=max_retries,
            http_client=openai.DefaultHttpxClient(event_hooks={"response": hooks}),
        )

    def http(self, method: str, path: str, key: str, body: dict | None = None, timeout: float = 30):
        """One raw HTTP call, for what the SDK has no method for or hides (a worker's
        PATCH, a DELETE, the headers of a 429): (status, headers, JSON body or None).
        `timeout` bounds it, so a stream opened by mistake fails instead of hanging."""
        request = urllib.request.Request(
            f"{self.http_url}{path}",
            method=method,
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
            data=None if body is None else json.dumps(body).encode(),
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, headers, raw = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            status, headers, raw = error.code, error.headers, error.read()
        return status, headers, json.loads(raw) if raw else None


def _serve(database_url: str, env: dict) -> Batchd:
    process = subprocess.Popen(
        [BATCHD, "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
        env={**os.environ, **env, "BATCHD_DATABASE_URL": database_url, "RUST_LOG": "warn"},
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        serving = re.match(r"batchd is serving gRPC on (\S+) and HTTP on (\S+)", line)
        if serving:
            key = next((l for l in lines if l.startswith("bd_sk_")), None)
            return Batchd(
                process, database_url, f"http://{serving.group(2)}", serving.group(1), key
            )
    raise RuntimeError(f"batchd exited before serving: {lines}")


@contextlib.contextmanager
def serving(database_url: str, env: dict | None = None):
    """A `batchd serve` on `database_url`, with `env` added to its environment; stopped
    on leaving."""
    server = _serve(database_url, env or {})
    try:
        yield server
    finally:
        server.process.terminate()
        server.process.wait(timeout=30)


@contextlib.contextmanager
def postgres_database():
    """The name of a fresh database on the test PostgreSQL, dropped on leaving."""
    import psycopg

    name = f"batchd_pytest_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _batchd_on(store: str, env: dict):
    """batchd on a fresh database of `store`, with `env` added to its environment."""
    if store == "sqlite":
        with tempfile.TemporaryDirectory() as directory, serving(f"sqlite://{directory}/batchd.db", env) as server:
            yield server
        return
    if SKIP_POSTGRES:
        pytest.skip("PostgreSQL unreachable (scripts/test said so)")
    with postgres_database() as name, serving(f"{POSTGRES_URL.rsplit('/', 1)[0]}/{name}", env) as server:
        yield server


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def batchd(request):
    """batchd on a fresh database of each store."""
    yield from _batchd_on(request.param, {})


# Webhooks to a receiver on this machine over plain http, retried quickly.
LOCAL_WEBHOOKS = {
    "BATCHD_WEBHOOK_ALLOW_HTTP": "true",
    "BATCHD_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true",
    "BATCHD_WEBHOOK_POLL": "100ms",
    "BATCHD_WEBHOOK_RETRY_SCHEDULE": "100ms,200ms,300ms",
}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def batchd_with_local_webhooks(request):
    """batchd on a fresh database of each store, allowed to send webhooks to a
    receiver on this machine over plain http, retrying quickly."""
    yield from _batchd_on(request.param, LOCAL_WEBHOOKS)


# Seconds without a change after which the quick-to-stall fixture marks a batch stalled.
STALL_AFTER = 2


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def batchd_quick_to_stall(request):
    """batchd on a fresh database of each store, with local webhooks, marking a batch
    stalled after STALL_AFTER seconds without a change and sweeping every second."""
    yield from _batchd_on(
        request.param,
        {
            **LOCAL_WEBHOOKS,
            "BATCHD_STALL_AFTER": f"{STALL_AFTER}s",
            "BATCHD_SWEEP_INTERVAL": "1s",
        },
    )


# The per-key rate limit of the rate-limited fixture: requests per second, and burst.
RATE_LIMIT = 20
RATE_LIMIT_BURST = 20


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def batchd_rate_limited(request):
    """batchd on a fresh database of each store, each API key limited to RATE_LIMIT
    requests per second with a burst of RATE_LIMIT_BURST."""
    yield from _batchd_on(
        request.param,
        {
            "BATCHD_RATE_LIMIT_PER_KEY": str(RATE_LIMIT),
            "BATCHD_RATE_LIMIT_BURST": str(RATE_LIMIT_BURST),
        },
    )
