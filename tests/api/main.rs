//! batchd's integration tests: a real server on random ports, real tonic clients, and
//! every store-dependent test run on SQLite and on PostgreSQL
//! (`<module>::sqlite::<test>` and `<module>::postgres::<test>`).

mod helpers;
mod own_postgres;
mod process;
mod proxy;

mod auth;
mod batches;
mod cache;
mod change_feed;
mod cli;
mod concurrency;
mod console;
mod failover;
mod hardening;
mod health;
mod idempotency;
mod layering;
mod lifecycle_timers;
mod list_filters;
mod logs;
mod metrics;
mod outage;
mod replicas;
mod rest;
mod shutdown;
mod stalls;
mod store;
mod store_contract;
mod tenant_isolation;
mod tenants;
mod traces;
mod watch;
mod watch_hardening;
mod webhooks;
