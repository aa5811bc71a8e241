// What the Node suites share: a real `batchd serve` on random ports, API keys made
// with its own command line, and the two stores to run on.

import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { randomUUID } from "node:crypto";
import { createInterface } from "node:readline";

const ROOT = resolve(import.meta.dirname, "..", "..");
const BATCHD = process.env.BATCHD_BIN ?? join(ROOT, "target", "debug", "batchd");
const POSTGRES_URL =
  process.env.BATCHD_TEST_POSTGRES_URL ?? "postgres://postgres@127.0.0.1:5432/postgres";
const SKIP_POSTGRES = process.env.BATCHD_TEST_SKIP_POSTGRES === "1";

/** Starts `batchd serve` on random ports (HTTP on `httpAddr` when given, to restart
 * on the same one), with `env` added to its environment; resolves once it says where
 * it serves. */
export function serve(databaseUrl, env = {}, httpAddr = "127.0.0.1:0") {
  const child = spawn(BATCHD, ["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", httpAddr], {
    env: { ...process.env, ...env, BATCHD_DATABASE_URL: databaseUrl, RUST_LOG: "warn" },
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
          httpAddr: serving[1],
          adminKey: lines.find((l) => l.startsWith("bd_sk_")),
        });
      }
    });
  });
}

/** A new API key made with `batchd keys create` (its last stdout line). */
export function key(server, user, scope = "batches") {
  const out = execFileSync(BATCHD, ["keys", "create", "--user", user, "--scope", scope], {
    env: { ...process.env, BATCHD_DATABASE_URL: server.databaseUrl },
  });
  return out.toString().trim().split("\n").at(-1);
}

export const stores = [
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
