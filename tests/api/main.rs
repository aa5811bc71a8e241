//! batchd's integration tests: a real server on random ports, real tonic clients, and
//! every store-dependent test run on SQLite and on PostgreSQL
//! (`<module>::sqlite::<test>` and `<module>::postgres::<test>`).

mod helpers;
mod operations;
mod process;
mod proxy;

mod auth;
mod batches;
mod cache;
mod cli;
mod concurrency;
mod hardening;
mod health;
mod idempotency;
mod list_filters;
mod replicas;
mod rest;
mod store;
mod store_contract;
mod watch;
mod watch_hardening;
