//! batchd keeps and serves batch jobs in the shape of the OpenAI Batch API, over gRPC
//! and an OpenAI-compatible REST shim, on SQLite or PostgreSQL.
//!
//! The architecture, in layers from the bottom up; a module uses its own layer and
//! those below, never one above (the test `layering` in `tests/api` reads every
//! `crate::` path of `src/` and fails on one that points up):
//! - **domain**: `domain` (the batch, its state machine, validated input, API keys,
//!   feed cursors, the webhook types), `error`, `clock`, `shutdown`, `proto`. No I/O.
//! - **store**: SQL behind narrow traits, SQLite and PostgreSQL; the coalesced reads
//!   and grouped commits (each round reading the batches it changes) in front of it;
//!   the frequent statements run on a few connections kept between statements.
//! - **use cases**: `service` (batches and keys: the only writer of batches, with its
//!   per-key `request_rates`), `watch`
//!   (the per-replica hub and the change feed readers), `webhooks` (endpoint use
//!   cases, the dispatcher from the change feed, the deliverer), `cache`, `health`.
//! - **transports**: `grpc` and `rest`, thin over the use cases; `console` (static
//!   files calling the REST API); `telemetry` (logs, traces, metrics, the request
//!   observers).
//! - **app**: builds the parts from plain options structs, serves them, stops them.
//! - **command line**: `config` (every flag, converted into the options structs) and
//!   `cli` (the client commands: watch, webhooks, keys, health, migrate), with
//!   `main.rs` on top.

#![warn(missing_docs)]

pub mod app; // builds the parts (store, hub, service), serves them on listeners, stops in order
pub mod cache; // API keys (valid and unknown), terminal and latest batches, bounded in bytes
pub mod cli; // the client commands, apart from the server: watch, webhooks, keys, health, migrate
pub mod clock; // the injectable source of "now"
pub mod config; // the command line: every flag, each with a BATCHD_* variable, converted into the plain options structs below
pub mod console; // the web console: console/'s static files, embedded, hashed, compressed, served with a strict CSP
pub mod domain; // the batch, its state machine, validated input, API key rules, change feed cursors (sealed for clients), webhook types; no I/O
pub mod error; // the one error type; each transport maps every variant exhaustively
pub mod grpc; // tonic handlers: proto <-> domain, call the service, map errors
pub mod health; // background database checks feeding gRPC health and /readyz
pub mod proto; // code generated from proto/batchd/v1/*.proto, and WatchBatchResponse by hand (one encoding shared by many streams)
pub mod request_rates; // per-API-key request rates: a token bucket per key, idle keys dropped
pub mod rest; // axum handlers of the HTTP port: OpenAI JSON, SSE, probes, metrics, OpenAPI
pub mod service; // the use cases; the only reader and writer of batches and keys
pub mod shutdown; // the stop signal shared by every background task
pub mod store; // Store and its read-only EventLog; SQLite and PostgreSQL behind one generic SQL store
pub mod telemetry; // logs, OTLP traces, metrics, the request observers
pub mod watch; // WatchBatch and WatchBatches: the per-replica hub, its feeds, the change feed reader, one task per stream
pub mod webhooks; // OpenAI's webhooks: endpoint use cases, the dispatcher from the change feed, the deliverer, the per-replica bounds both sends share
