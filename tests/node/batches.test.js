// The official openai Node SDK against a real batchd, on SQLite and on PostgreSQL:
// create, retrieve, list with auto-pagination over several pages, cancel, and the
// SDK's error classes for another tenant's batch, a bad key and a bad request; and its
// default retries getting through a per-key rate limit by honouring Retry-After.

import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";

import OpenAI, { AuthenticationError, BadRequestError, NotFoundError } from "openai";

import { key, serve, stores } from "./support.js";

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
      // batchd's own estimate and stall fields ride along; the SDK passes them through.
      assert.deepEqual(
        [first.progress_rate, first.estimated_completion_at, first.stalled_at],
        [null, null, null],
      );
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

// Each API key limited to RATE requests per second with a burst of BURST.
const RATE = 20;
const BURST = 20;

for (const store of stores) {
  describe(`openai Node SDK under a per-key rate limit on ${store.name}`, { skip: store.skip }, () => {
    let database;
    let server;

    before(async () => {
      database = await store.open();
      server = await serve(database.url, {
        BATCHD_RATE_LIMIT_PER_KEY: String(RATE),
        BATCHD_RATE_LIMIT_BURST: String(BURST),
      });
    });

    after(async () => {
      server?.child.kill("SIGTERM");
      await new Promise((done) => (server ? server.child.once("close", done) : done()));
      database?.close();
    });

    test("the SDK's default retries honour Retry-After and get every call through", async () => {
      const statuses = [];
      // The SDK's default retries (no maxRetries); every HTTP answer, retries included, counted.
      const client = new OpenAI({
        apiKey: key(server, "node-patient"),
        baseURL: server.baseURL,
        fetch: async (url, init) => {
          const response = await fetch(url, init);
          statuses.push(response.status);
          return response;
        },
      });
      const batch = await client.batches.create({
        input_file_id: "file-limited",
        endpoint: "/v1/chat/completions",
        completion_window: "24h",
      });
      statuses.length = 0;
      const calls = 60;
      const started = performance.now();
      for (let i = 0; i < calls; i++) {
        assert.equal((await client.batches.retrieve(batch.id)).id, batch.id);
      }
      const elapsed = (performance.now() - started) / 1000;
      // A full bucket holds the burst; the rest of the calls wait for the rate.
      assert.ok(elapsed >= (calls - BURST) / RATE - 0.5, `${elapsed} s`);
      assert.equal(statuses.filter((s) => s === 200).length, calls);
      assert.ok(statuses.includes(429), `no call was limited: ${statuses}`);
      assert.deepEqual(new Set(statuses), new Set([200, 429]));
    });
  });
}
