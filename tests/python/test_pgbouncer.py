"""batchd behind PgBouncer, each test with a PgBouncer of its own in front of the test
PostgreSQL: two replicas through a session-pooling PgBouncer share batches and wake each
other's change feeds (LISTEN/NOTIFY holds a server connection for the session), and
transaction pooling is shown to break batchd, whose statements are named and prepared
(sqlx), before any request."""

import contextlib
import http.client
import json
import os
import pwd
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import BATCHD, POSTGRES_URL, SKIP_POSTGRES, postgres_database, serving

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"

# Longer than the whole module: within PROMPTLY, only a NOTIFY from the other replica
# can have woken a change feed, never its own safety poll.
SAFETY_POLL = "60s"
PROMPTLY = 5.0


def require_pgbouncer() -> None:
    """Skips without PostgreSQL; without PgBouncer, skips, or fails under CI."""
    if SKIP_POSTGRES:
        pytest.skip("PostgreSQL unreachable (scripts/test said so)")
    if not os.access(PGBOUNCER, os.X_OK):
        message = f"PgBouncer is not at {PGBOUNCER} (apt-get install pgbouncer)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}, and CI=true requires the PgBouncer suite")
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PgBouncer:
    """A running PgBouncer in front of the test PostgreSQL."""

    process: subprocess.Popen
    port: int
    user: str

    def url(self, database: str) -> str:
        return f"postgres://{self.user}@127.0.0.1:{self.port}/{database}"


@contextlib.contextmanager
def pgbouncer(pool_mode: str, pool_size: int = 40):
    """A PgBouncer on a free local port with `pool_mode`, its files in a directory of
    its own; stopped on leaving. It refuses to run as root, so as root it runs as the
    postgres account (nobody without one)."""
    server = urllib.parse.urlsplit(POSTGRES_URL)
    user = urllib.parse.unquote(server.username or "postgres")
    password = urllib.parse.unquote(server.password or "")
    unprivileged = {}
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            account = pwd.getpwnam("nobody")
        unprivileged = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    with tempfile.TemporaryDirectory(prefix="batchd-pgbouncer-") as directory:
        home = Path(directory)
        port = free_port()
        # trust: clients are not asked for a password; PgBouncer logs in to PostgreSQL
        # with the one in the auth file. sqlx sends extra_float_digits, and batchd its
        # statement_timeout and keepalives in `options`: PgBouncer passes on neither,
        # and without ignoring them refuses the connection (README "Poolers").
        (home / "userlist.txt").write_text(f'"{user}" "{password}"\n')
        (home / "pgbouncer.ini").write_text(
            f"""[databases]
* = host={server.hostname} port={server.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {home / "userlist.txt"}
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_client_conn = 200
ignore_startup_parameters = extra_float_digits, options
pidfile = {home / "pgbouncer.pid"}
logfile = {home / "pgbouncer.log"}
"""
        )
        if unprivileged:
            os.chown(home, unprivileged["user"], unprivileged["group"])
        process = subprocess.Popen(
            [PGBOUNCER, str(home / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **unprivileged,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                if process.poll() is not None:
                    log = home / "pgbouncer.log"
                    pytest.fail(f"PgBouncer exited: {log.read_text() if log.exists() else 'no log'}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
                assert time.monotonic() < deadline, "PgBouncer did not listen within 10 s"
                time.sleep(0.05)
            yield PgBouncer(process, port, user)
        finally:
            process.terminate()
            process.wait(timeout=10)


class ChangeFeed:
    """`GET /v1/batch_events` of one replica (Server-Sent Events), read on a thread."""

    def __init__(self, server, key: str):
        self.events: queue.Queue = queue.Queue()
        # The heartbeat (15 s) comes well within the read timeout.
        self.connection = http.client.HTTPConnection(urllib.parse.urlsplit(server.http_url).netloc, timeout=30)
        self.connection.request(
            "GET",
            "/v1/batch_events?send_initial_state=true",
            headers={"authorization": f"Bearer {key}", "accept": "text/event-stream"},
        )
        response = self.connection.getresponse()
        assert response.status == 200, response.read()
        self.reader = threading.Thread(target=self._read, args=(response,), daemon=True)
        self.reader.start()
        self.next(lambda kind, _: kind == "synced", timeout=10)

    def _read(self, response) -> None:
        kind, data = None, []
        with contextlib.suppress(OSError, ValueError), response:
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if data:
                        self.events.put((kind, json.loads("\n".join(data))))
                    kind, data = None, []
                elif line.startswith("event:"):
                    kind = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    data.append(line.removeprefix("data:").removeprefix(" "))

    def next(self, wanted, timeout: float) -> dict:
        """The next event for which `wanted(kind, data)` holds, within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no such event within {timeout} s"
            try:
                kind, data = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if wanted(kind, data):
                return data

    def change(self, batch_id: str, status: str) -> dict:
        """The CHANGE that brings `batch_id` to `status`, within PROMPTLY."""
        return self.next(
            lambda kind, data: kind == "change"
            and data["batch"]["id"] == batch_id
            and data["batch"]["status"] == status,
            timeout=PROMPTLY,
        )

    def close(self) -> None:
        # Shut down rather than close: the reader may be waiting on the socket.
        with contextlib.suppress(OSError):
            self.connection.sock.shutdown(socket.SHUT_RDWR)
        self.reader.join(timeout=5)
        self.connection.close()


@pytest.fixture(scope="module")
def replicas():
    """Two batchd replicas on one fresh database, both through one session-pooling
    PgBouncer, with safety polls too slow to matter."""
    require_pgbouncer()
    env = {"BATCHD_WATCH_SAFETY_POLL": SAFETY_POLL, "BATCHD_SHUTDOWN_DELAY": "0s"}
    with postgres_database() as name, pgbouncer("session") as bouncer:
        with serving(bouncer.url(name), env) as a, serving(bouncer.url(name), env) as b:
            yield a, b


def test_replicas_behind_session_pooling_share_batches_and_wake_each_other(replicas):
    a, b = replicas
    owner, worker = a.key("pooled-owner"), a.key("pooled-worker", "worker")
    feed_a, feed_b = ChangeFeed(a, owner), ChangeFeed(b, owner)
    try:
        batch = a.client(owner).batches.create(
            input_file_id="file-pooled", endpoint="/v1/chat/completions", completion_window="24h"
        )
        # Created on A: listed on B, and on B's change feed through A's NOTIFY.
        assert batch.id in [listed.id for listed in b.client(owner).batches.list()]
        assert feed_b.change(batch.id, "validating")["batch"]["version"] == 1

        # Changed on B (a worker's update, then the owner's cancel): on A's change feed.
        status, _, body = b.http("PATCH", f"/v1/batches/{batch.id}", worker, {"status": "in_progress"})
        assert status == 200, body
        assert feed_a.change(batch.id, "in_progress")["batch"]["version"] == body["version"]
        assert b.client(owner).batches.cancel(batch.id).status == "cancelling"
        assert feed_a.change(batch.id, "cancelling")["batch"]["version"] == body["version"] + 1
        assert a.client(owner).batches.retrieve(batch.id).status == "cancelling"
    finally:
        feed_a.close()
        feed_b.close()


def test_transaction_pooling_breaks_batchd_before_it_serves():
    """Named prepared statements belong to a server connection, which transaction
    pooling hands from client to client: sqlx's `sqlx_s_1` of one connection is found
    already there by the next. (PgBouncer 1.21 and later can track them with
    max_prepared_statements; LISTEN would still need a session.)"""
    require_pgbouncer()
    # One server connection, so every client lands on the one the last client used.
    with postgres_database() as name, pgbouncer("transaction", pool_size=1) as bouncer:
        started = subprocess.run(
            [BATCHD, "serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"],
            env={**os.environ, "BATCHD_DATABASE_URL": bouncer.url(name), "RUST_LOG": "warn"},
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert started.returncode != 0, started.stdout
        assert "batchd is serving" not in started.stdout
        assert "internal error" in started.stderr, started.stderr
