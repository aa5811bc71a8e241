//! batchd keeps and serves batch jobs in the shape of the OpenAI Batch API, over gRPC
//! and an OpenAI-compatible REST shim, on SQLite or PostgreSQL.
//!
//! The architecture, module by module. Requests enter through one of two thin
//! transports (`grpc`, `rest`), which call the use cases (`service`, and
//! `webhooks::service` for webhook endpoints) and nothing else; the service applies the
//! domain's rules and is the only reader and writer of batches and keys in the `store`.
//! The watch hub reads committed versions through the store's read-only event log; the
//! webhook dispatcher follows the same log into the store's delivery queue, which each
//! replica's deliverer drains; `app` builds these parts and hands the store to the
//! health checks and metrics as well. The web console (`console`) is static files on the
//! HTTP port that call the REST API like any client. Dependencies point down this list's
//! layers: `domain` and `error` depend on nothing of batchd's but each other (`domain`
//! on `error`).

#![warn(missing_docs)]

pub mod app; // builds the parts (store, hub, service), serves them on listeners, stops in order
pub mod cache; // API keys (valid and unknown), terminal and latest batches, bounded in bytes
pub mod cli; // the client commands, apart from the server: watch, health, migrate, keys
pub mod clock; // the injectable source of "now"
pub mod config; // clap flags, each with a BATCHD_* environment variable; defaults on the options structs
pub mod console; // the web console: console/'s static files, embedded, hashed, compressed, served with a strict CSP
pub mod domain; // the batch, its state machine, validated input, API key rules, change feed cursors (sealed for clients); no I/O
pub mod error; // the one error type; each transport maps every variant exhaustively
pub mod grpc; // tonic handlers: proto <-> domain, call the service, map errors
pub mod health; // background database checks feeding gRPC health and /readyz
pub mod proto; // code generated from proto/batchd/v1/*.proto, and WatchBatchResponse by hand (one encoding shared by many streams)
pub mod rest; // axum handlers of the HTTP port: OpenAI JSON, SSE, probes, metrics, OpenAPI
pub mod service; // the use cases; the only reader and writer of batches and keys
pub mod shutdown; // the stop signal shared by every background task
pub mod store; // Store and its read-only EventLog; SQLite and PostgreSQL behind one generic SQL store
pub mod telemetry; // logs, OTLP traces, metrics, the request observers
pub mod watch; // WatchBatch and WatchBatches: the per-replica hub, its feeds, the change feed reader, one task per stream
pub mod webhooks; // OpenAI's webhooks: endpoint use cases, the dispatcher from the change feed, the deliverer, the per-replica bounds both sends share
