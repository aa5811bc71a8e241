//! A deadline on every database call. A database that stops answering with its
//! connections still open (a network partition, a frozen host) never returns an
//! error by itself: without a deadline each call would hang until the client gives up,
//! holding its connection and its caller. Every call of a [`WithinDeadline`] store ends
//! within the deadline, with `UNAVAILABLE` when it did not finish in time.
//!
//! The deadline is applied in one place: [`store_trait!`] declares each store trait
//! together with the one implementation that forwards its calls through
//! [`WithinDeadline::within`], so a method gets its deadline by being declared, and no
//! wrapper repeats the methods by hand. Migrations and closing the pool
//! ([`Lifecycle`](super::Lifecycle)) are exempt: they run at start and stop, where
//! waiting is the right thing to do.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{ChangeNotifier, Lifecycle};
use crate::error::{Error, Result};

/// A store whose calls each end within `deadline`.
pub struct WithinDeadline<S> {
    inner: S,
    deadline: Duration,
}

impl<S> WithinDeadline<S> {
    /// Wraps `inner`; every call ends within `deadline`.
    pub fn new(inner: S, deadline: Duration) -> WithinDeadline<S> {
        WithinDeadline { inner, deadline }
    }

    /// The store inside, whose calls have no deadline.
    pub(super) fn inner(&self) -> &S {
        &self.inner
    }

    /// `call`, or `UNAVAILABLE` if it did not finish within the deadline.
    pub(super) async fn within<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.deadline, call).await {
            Ok(outcome) => outcome,
            Err(_) => {
                metrics::counter!("batchd_db_errors_total", "kind" => "unavailable").increment(1);
                Err(Error::Unavailable(format!(
                    "the database did not answer within {:?}",
                    self.deadline
                )))
            }
        }
    }
}

/// Declares a store trait of async methods (each `&self` and named arguments, returning
/// a `Result`) and implements it for [`WithinDeadline`] of any store that has it, each
/// call forwarded within the deadline.
macro_rules! store_trait {
    (
        $(#[$trait_meta:meta])*
        pub trait $name:ident {
            $(
                $(#[$meta:meta])*
                async fn $method:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $ret:ty;
            )*
        }
    ) => {
        $(#[$trait_meta])*
        #[async_trait::async_trait]
        pub trait $name: Send + Sync + 'static {
            $(
                $(#[$meta])*
                async fn $method(&self $(, $arg: $ty)*) -> $ret;
            )*
        }

        #[async_trait::async_trait]
        impl<S: $name> $name for $crate::store::deadline::WithinDeadline<S> {
            $(
                async fn $method(&self $(, $arg: $ty)*) -> $ret {
                    self.within(self.inner().$method($($arg),*)).await
                }
            )*
        }
    };
}
pub(super) use store_trait;

/// Forwarded as they are: the exempt calls, and those that do not wait.
#[async_trait]
impl<S: Lifecycle> Lifecycle for WithinDeadline<S> {
    async fn migrate(&self) -> Result<()> {
        self.inner.migrate().await
    }

    fn notifier(&self) -> Option<Arc<dyn ChangeNotifier>> {
        self.inner.notifier()
    }

    fn pool_usage(&self) -> (u32, u32) {
        self.inner.pool_usage()
    }

    fn database_status(&self) -> super::DatabaseStatus {
        self.inner.database_status()
    }

    async fn close(&self) {
        self.inner.close().await
    }
}
