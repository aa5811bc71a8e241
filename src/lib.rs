//! batchd keeps and serves batch jobs in the shape of the OpenAI Batch API, over gRPC
//! and an OpenAI-compatible REST shim, on SQLite or PostgreSQL.
//!
//! The architecture, module by module:

#![warn(missing_docs)]

pub mod app; // builds the listeners, wires every part, runs until shutdown
pub mod cache; // API keys (valid and unknown), terminal and latest batches, bounded in bytes
pub mod cli; // the client commands, apart from the server: watch, health, migrate, keys
pub mod clock; // the injectable source of "now"
pub mod config; // clap flags, each with a BATCHD_* environment variable
pub mod domain; // the batch, its state machine, validated input, API key rules; no I/O
pub mod error; // the one error type and its transport-neutral code
pub mod grpc; // tonic handlers: proto <-> domain, call the service, map errors
pub mod health; // background database checks feeding gRPC health and /readyz
pub mod proto; // code generated from proto/batchd/v1/batch.proto
pub mod rest; // axum handlers of the HTTP port
pub mod service; // the use cases; the only caller of the store
pub mod shutdown; // the stop signal shared by every background task
pub mod store; // the Store trait, SQLite and PostgreSQL behind it
pub mod telemetry; // logging setup
pub mod watch; // WatchBatch: the per-replica hub, its feeds, cross-replica fan-out
