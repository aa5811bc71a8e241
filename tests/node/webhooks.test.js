// The official openai Node SDK verifies batchd's webhook deliveries: an endpoint made
// over REST (the Node SDK has no endpoint methods; it reaches them with client.post),
// a real batch's event sent to a local receiver, and `client.webhooks.unwrap`
// accepting it with the endpoint's secret and refusing it with another.

import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";

import OpenAI from "openai";

import { key, serve, stores } from "./support.js";

/** A receiver on a random local port that answers 200 and keeps every delivery. */
async function receiver() {
  const received = [];
  const server = createServer((request, response) => {
    let body = "";
    request.on("data", (chunk) => (body += chunk));
    request.on("end", () => {
      received.push({ headers: request.headers, body });
      response.writeHead(200).end();
    });
  });
  await new Promise((done) => server.listen(0, "127.0.0.1", done));
  return { server, received, url: `http://127.0.0.1:${server.address().port}/hook` };
}

const sqlite = stores.find((store) => store.name === "sqlite");

describe("openai Node SDK unwraps batchd's webhooks", () => {
  let database;
  let server;
  let hook;

  before(async () => {
    database = await sqlite.open();
    server = await serve(database.url, {
      BATCHD_WEBHOOK_ALLOW_HTTP: "true",
      BATCHD_WEBHOOK_ALLOW_PRIVATE_NETWORKS: "true",
      BATCHD_WEBHOOK_POLL: "100ms",
    });
    hook = await receiver();
  });

  after(() => {
    hook?.server.close();
    server?.child.kill();
    database?.close();
  });

  test("a batch.created delivery unwraps with the endpoint's secret", async () => {
    const client = new OpenAI({ apiKey: key(server, "node-hooks"), baseURL: server.baseURL, maxRetries: 0 });
    const endpoint = await client.post("/webhook_endpoints", {
      body: { name: "node", url: hook.url, event_types: ["batch.created"] },
    });
    assert.match(endpoint.signing_secret, /^whsec_/);
    const batch = await client.batches.create({
      input_file_id: "file-node-hooks",
      endpoint: "/v1/chat/completions",
      completion_window: "24h",
    });
    const deadline = Date.now() + 20_000;
    while (hook.received.length === 0) {
      assert.ok(Date.now() < deadline, "no delivery within 20 s");
      await new Promise((done) => setTimeout(done, 50));
    }
    const { headers, body } = hook.received[0];
    const event = await client.webhooks.unwrap(body, headers, endpoint.signing_secret);
    assert.equal(event.type, "batch.created");
    assert.equal(event.data.id, batch.id);
    assert.equal(event.id, headers["webhook-id"]);
    const other = "whsec_" + Buffer.alloc(32, 7).toString("base64");
    await assert.rejects(client.webhooks.unwrap(body, headers, other));
  });
});
