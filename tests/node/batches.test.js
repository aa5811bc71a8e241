// The official openai Node SDK against a real batchd, on SQLite and on PostgreSQL:
// create, retrieve, list with auto-pagination over several pages, cancel, and the
// SDK's error classes for another tenant's batch, a bad key and a bad request.

import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { randomUUID } from "node:crypto";
import { createInterface } from "node:readline";

import OpenAI, { AuthenticationError, BadRequestError, NotFoundError } from "openai";

const ROOT = resolve(import.meta.dirname, "..", "..");
const BATCHD = process.env.BATCHD_BIN ?? join(ROOT, "target", "debug", "batchd");
const POSTGRES_URL =
  process.env.BATCHD_TEST_POSTGRES_URL ?? "postgres://postgres@127.0.0.1:5432/postgres";
const SKIP_POSTGRES = process.env.BATCHD_TEST_SKIP_POSTGRES === "1";

/** Starts `batchd serve` on random ports; resolves once it says where it serves. */
function serve(databaseUrl) {
  const child = spawn(BATCHD, ["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"], {
    env: { ...process.env, BATCHD_DATABASE_URL: databaseUrl, RUST_LOG: "warn" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const lines = [];
  return new Promise((resolvePromise, reject) => {
    child.on("exit", (code) => reject(new Error(`batchd exited (${code}) before serving: ${lines}`)));
    createInterface({ input: child.stdout }).on("line", (line) => {
      lines.push(line);
      const serving = line.match(/batchd is serving gRPC on \S+ and HTTP on (\S+)/);
      if (serving) {
        resolvePromise({
          child,
          databaseUrl,
          baseURL: `http://${serving[1]}/v1`,
          adminKey: lines.find((l) => l.startsWith("bd_sk_")),
        });
      }
    });
  });
}

/** A new API key made with `batchd keys create` (its last stdout line). */
function key(server, user, scope = "batches") {
  const out = execFileSync(BATCHD, ["keys", "create", "--user", user, "--scope", scope], {
    env: { ...process.env, BATCHD_DATABASE_URL: server.databaseUrl },
  });
  return out.toString().trim().split("\n").at(-1);
}

const stores = [
  {
    name: "sqlite",
    async open() {
      const dir = mkdtempSync(join(tmpdir(), "batchd-node-"));
      return { url: `sqlite://${join(dir, "batchd.db")}`, close: () => rmSync(dir, { recursive: true }) };
    },
  },
  {
    name: "postgres",
    skip: SKIP_POSTGRES && "PostgreSQL unreachable (scripts/test said so)",
    async open() {
      const name = `batchd_node_${randomUUID().replaceAll("-", "").slice(0, 12)}`;
      execFileSync("psql", [POSTGRES_URL, "-qc", `CREATE DATABASE ${name}`]);
      return {
        url: `${POSTGRES_URL.slice(0, POSTGRES_URL.lastIndexOf("/"))}/${name}`,
        close: () => execFileSync("psql", [POSTGRES_URL, "-qc", `DROP DATABASE IF EXISTS ${name} WITH (FORCE)`]),
      };
    },
  },
];

for (const store of stores) {
  describe(`openai Node SDK on ${store.name}`, { skip: store.skip }, () => {
    let database;
    let server;
    let alice;
    let bob;

    before(async () => {
      database = await store.open();
      server = await serve(database.url);
      const client = (apiKey) => new OpenAI({ apiKey, baseURL: server.baseURL, maxRetries: 0 });
      alice = client(key(server, "alice"));
      bob = client(key(server, "bob"));
    });

    after(async () => {
      server?.child.kill("SIGTERM");
      await new Promise((done) => (server ? server.child.once("close", done) : done()));
      database?.close();
    });

    test("create, retrieve, list page by page, cancel", async () => {
      const created = [];
      for (let i = 0; i < 7; i++) {
        created.push(
          await alice.batches.create({
            input_file_id: `file-${i}`,
            endpoint: "/v1/chat/completions",
            completion_window: "24h",
            metadata: { run: String(i) },
          }),
        );
      }
      const first = created[0];
      assert.equal(first.object, "batch");
      assert.equal(first.status, "validating");
      assert.equal(first.expires_at, first.created_at + 24 * 3600);
      assert.deepEqual(first.metadata, { run: "0" });
      assert.deepEqual(await alice.batches.retrieve(first.id), first);

      // Auto-pagination follows `after` over three pages of three.
      const seen = [];
      for await (const batch of alice.batches.list({ limit: 3 })) {
        seen.push(batch.id);
      }
      assert.deepEqual(seen, created.map((b) => b.id).reverse());
      const page = await alice.batches.list({ limit: 3 });
      assert.equal(page.data.length, 3);
      assert.equal(page.hasNextPage(), true);

      const cancelled = await alice.batches.cancel(first.id);
      assert.equal(cancelled.status, "cancelling");
      assert.equal(typeof cancelled.cancelling_at, "number");
    });

    test("the SDK's error classes", async () => {
      const mine = await alice.batches.create({
        input_file_id: "file-x",
        endpoint: "/v1/embeddings",
        completion_window: "24h",
      });
      await assert.rejects(bob.batches.retrieve(mine.id), NotFoundError);
      const stranger = new OpenAI({ apiKey: "bd_sk_not_a_key", baseURL: server.baseURL, maxRetries: 0 });
      await assert.rejects(stranger.batches.list(), AuthenticationError);
      await assert.rejects(alice.batches.list({ limit: 0 }), (error) => {
        assert.ok(error instanceof BadRequestError);
        assert.equal(error.param, "limit");
        return true;
      });
      await assert.rejects(
        alice.batches.create({ input_file_id: "f", endpoint: "/v1/audio/speech", completion_window: "24h" }),
        (error) => error instanceof BadRequestError && error.param === "endpoint",
      );
    });
  });
}
