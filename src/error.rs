//! The one error type of batchd. It knows nothing of tonic or axum: each transport maps
//! every variant to its own status in one exhaustive `match` without a catch-all arm
//! (`grpc::convert`'s `From<Error> for Status`, `rest::error`'s `From<Error> for
//! ApiError`), so a new variant does not build until both have decided.

/// Everything that can go wrong in a use case, with what the caller needs to fix it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A field of the request is malformed or out of range.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The request field, e.g. `metadata` or `request_counts.total`.
        field: String,
        /// What is wrong with it, naming the offending value.
        reason: String,
    },
    /// No API key was sent, or the key is unknown or revoked.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The API key is valid but its scope does not cover the operation.
    #[error("an API key with scope `{scope}` may not {action}")]
    PermissionDenied {
        /// The caller's scope, as `Scope::as_str` spells it.
        scope: &'static str,
        /// What the caller tried to do, e.g. `update batches`.
        action: &'static str,
    },
    /// No such batch, or it belongs to another owner (the two are indistinguishable).
    #[error("no batch found with id `{0}`")]
    BatchNotFound(String),
    /// No API key with this id.
    #[error("no API key found with id `{0}`")]
    ApiKeyNotFound(String),
    /// No such thing (a webhook endpoint, a delivery), or it belongs to another owner
    /// (the two are indistinguishable).
    #[error("no {what} found with id `{id}`")]
    NotFound {
        /// What was looked for, e.g. `webhook endpoint`.
        what: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The state machine does not allow this move.
    #[error("a batch cannot move from `{from}` to `{to}`")]
    IllegalTransition {
        /// The batch's current status, as `BatchStatus::as_str` spells it.
        from: &'static str,
        /// The status the caller asked for, likewise.
        to: &'static str,
    },
    /// The request is well formed but conflicts with the batch's current state
    /// (a terminal batch, request counts that would go down).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The idempotency key was used by the same owner, within its window, for a
    /// different request.
    #[error(
        "idempotency key `{0}` was already used with a different request in the last 24 hours; send a new key for a new request"
    )]
    IdempotencyKeyReused(String),
    /// The caller's `expected_version` is not the batch's version.
    #[error("batch is at version {actual}, not the expected version {expected}")]
    VersionMismatch {
        /// What the caller expected.
        expected: i64,
        /// What the batch is at.
        actual: i64,
    },
    /// Too many writers changed the batch at once for this one to get through.
    #[error("batch `{0}` is being changed by too many writers at once; retry")]
    Contended(String),
    /// The API key has as many open watch streams as it may have.
    #[error("this API key already has {limit} open watch streams, the most it may have")]
    TooManyWatches {
        /// The limit (`--max-watches-per-key`).
        limit: usize,
    },
    /// A bounded resource is in use as much as it may be, or the caller's API key sent
    /// more requests than its rate allows; the caller retries later.
    #[error("{reason}")]
    RateLimited {
        /// What is busy.
        reason: String,
        /// When to retry (REST: `Retry-After` in whole seconds, at least 1, and
        /// `retry-after-ms`; gRPC: a `RetryInfo` detail).
        retry_after: std::time::Duration,
    },
    /// The owner has as many active (not terminal) batches as it may have.
    #[error(
        "this owner already has {limit} active batches, the most it may have; wait for one to reach a terminal status, or cancel one"
    )]
    ActiveBatchLimit {
        /// The limit (`--max-active-batches-per-owner`).
        limit: u32,
    },
    /// The change feed no longer holds every change after the client's cursor:
    /// compaction removed some. The client lists again (an initial state). The
    /// positions are for the log: the feed's positions are every tenant's, so the
    /// message names neither.
    #[error(
        "the change feed no longer holds every change after this cursor; start again with send_initial_state and continue from its SYNCED cursor"
    )]
    FeedCompacted {
        /// The client's cursor, in its internal text form (never sent).
        after: String,
        /// The oldest cursor still resumable, in its internal text form (never sent).
        oldest: String,
    },
    /// This replica is shutting down; the client should resume on another one.
    #[error("batchd is shutting down; resume the watch with after_version on another replica")]
    ShuttingDown,
    /// The database does not answer. The detail is logged, never sent to clients.
    #[error("the database is unavailable; retry later")]
    Unavailable(String),
    /// A bug or an unexpected database answer. The detail is logged, never sent.
    #[error("internal error")]
    Internal(String),
}

/// The name errors give the idempotency key: the REST header's (gRPC calls it
/// `request_id`).
pub const IDEMPOTENCY_KEY_FIELD: &str = "Idempotency-Key";

/// A shorthand for results of batchd's use cases.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// This replica's own queue for `what` is full: batchd's load, not the
    /// database's health, so it is [`Error::RateLimited`] (gRPC `RESOURCE_EXHAUSTED`,
    /// REST 429 with `Retry-After`), never [`Error::Unavailable`], whose message blames
    /// the database.
    pub fn overloaded(what: impl std::fmt::Display) -> Error {
        Error::RateLimited {
            reason: format!("this batchd replica is at its limit: {what}; retry shortly"),
            retry_after: std::time::Duration::from_secs(1),
        }
    }

    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The request field at fault, for transports that report it (OpenAI's `param`).
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::InvalidArgument { field, .. } => Some(field),
            Error::IdempotencyKeyReused(_) => Some(IDEMPOTENCY_KEY_FIELD),
            _ => None,
        }
    }

    /// The same error naming the field `to` where it named `from`: for a transport
    /// that carries a value under another name (gRPC's `request_id` is REST's
    /// `Idempotency-Key` header).
    pub fn renaming_field(self, from: &str, to: &str) -> Error {
        match self {
            Error::InvalidArgument { field, reason } if field == from => Error::InvalidArgument {
                field: to.to_owned(),
                reason,
            },
            other => other,
        }
    }

    /// Logs the internal detail of server-side errors; the client sees only `Display`.
    pub fn log_detail(&self) {
        match self {
            Error::Unavailable(detail) => tracing::warn!(%detail, "database unavailable"),
            Error::Internal(detail) => tracing::error!(%detail, "internal error"),
            Error::FeedCompacted { after, oldest } => {
                tracing::debug!(%after, %oldest, "a change feed cursor was compacted away")
            }
            _ => {}
        }
    }
}
