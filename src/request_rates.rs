//! Per-API-key request rates: a token bucket per key (governor's GCRA), per replica.
//! Every authenticated request (a stream's opening included) takes one token; a key
//! with none left is refused with [`Error::RateLimited`] until the next one is due.
//! N replicas allow a key N times the rate.
//!
//! Only keys that authenticated reach a bucket (unknown keys are refused before, by
//! the key lookup and its own bounds), and a bucket that has refilled is
//! indistinguishable from a new one, so [`RequestRates::forget_idle`] drops it: memory
//! grows with the keys active in the last `burst / rate` seconds, not with every key
//! ever seen.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::error::{Error, Result};

/// The highest rate and burst accepted: far above what one replica serves, low enough
/// that the arithmetic of the bucket stays exact.
pub const MAX_RATE: f64 = 1_000_000.0;

/// The lowest rate accepted (one request every 1,000 seconds): below it, a bucket's
/// refill period and reset times leave the range of the arithmetic.
pub const MIN_RATE: f64 = 0.001;

/// A key's rate limit: a flag pair of `serve`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestRateOptions {
    /// Requests per second per key, sustained (more than 0).
    pub per_second: f64,
    /// Requests a key may send at once after being idle (at least 1).
    pub burst: u32,
}

impl RequestRateOptions {
    /// The options of `--rate-limit-per-key RATE` and `--rate-limit-burst N`, which
    /// the command line has checked against [`MAX_RATE`]: `None` when RATE is 0 (off);
    /// a burst of 0 means the rate rounded up (at least 1).
    pub fn from_flags(per_second: f64, burst: u32) -> Option<RequestRateOptions> {
        if !(per_second.is_finite() && per_second > 0.0) {
            return None;
        }
        let per_second = per_second.clamp(MIN_RATE, MAX_RATE);
        let burst = if burst == 0 {
            per_second.ceil().max(1.0) as u32
        } else {
            burst
        };
        Some(RequestRateOptions { per_second, burst })
    }

    /// How long the bucket takes to refill one token.
    fn period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second)
    }
}

/// What a key may still send: OpenAI's `x-ratelimit-*-requests` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBudget {
    /// Requests the key may send at once (the burst).
    pub limit: u32,
    /// Requests it may send now, besides this one.
    pub remaining: u32,
    /// Until its bucket is full again.
    pub reset: Duration,
}

type KeyedLimiter =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// The buckets of every API key that sent a request recently, on this replica.
pub struct RequestRates {
    limiter: KeyedLimiter,
    options: RequestRateOptions,
}

impl RequestRates {
    /// Buckets with these options.
    pub fn new(options: RequestRateOptions) -> RequestRates {
        let burst = NonZeroU32::new(options.burst).unwrap_or(NonZeroU32::MIN);
        // A period of at least 1 µs: `from_flags` caps the rate at 10^6 per second.
        let quota = Quota::with_period(options.period().max(Duration::from_micros(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        RequestRates {
            limiter: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            options,
        }
    }

    /// Takes a token for a request of the key `key_id`, or refuses it with
    /// [`Error::RateLimited`], saying when the next one is due.
    pub fn admit(&self, key_id: &String) -> Result<RequestBudget> {
        match self.limiter.check_key(key_id) {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity();
                let used = self.options.burst.saturating_sub(remaining);
                Ok(RequestBudget {
                    limit: self.options.burst,
                    remaining,
                    reset: self.options.period() * used,
                })
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                Err(Error::RateLimited {
                    reason: format!(
                        "this API key sent more than its {} requests per second (bursts of {}); retry after {} ms",
                        self.options.per_second,
                        self.options.burst,
                        wait.as_millis().max(1)
                    ),
                    retry_after: wait.max(Duration::from_millis(1)),
                })
            }
        }
    }

    /// What a key that was just refused may send: nothing until its next token, and
    /// its whole burst once the bucket refilled.
    pub fn exhausted(&self) -> RequestBudget {
        RequestBudget {
            limit: self.options.burst,
            remaining: 0,
            reset: self.options.period() * self.options.burst,
        }
    }

    /// Drops the buckets that have refilled (a new one would be the same), so that
    /// keys that went idle cost no memory. Returns how many keys are still tracked.
    pub fn forget_idle(&self) -> usize {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.limiter.len()
    }

    /// How often [`RequestRates::forget_idle`] is worth running: once a bucket has had
    /// the time to refill completely, and at least every second.
    pub fn idle_sweep_period(&self) -> Duration {
        (self.options.period() * self.options.burst)
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_zero_is_the_rate_rounded_up_and_a_rate_of_zero_is_off() {
        assert_eq!(RequestRateOptions::from_flags(0.0, 0), None);
        assert_eq!(
            RequestRateOptions::from_flags(2.5, 0),
            Some(RequestRateOptions {
                per_second: 2.5,
                burst: 3
            })
        );
        assert_eq!(
            RequestRateOptions::from_flags(0.5, 0),
            Some(RequestRateOptions {
                per_second: 0.5,
                burst: 1
            })
        );
    }

    #[test]
    fn a_key_gets_its_burst_then_waits_for_the_next_token_and_keys_are_apart() {
        let rates = RequestRates::new(RequestRateOptions {
            per_second: 10.0,
            burst: 3,
        });
        let alice = "key_alice".to_owned();
        let remaining: Vec<u32> = (0..3)
            .map(|_| rates.admit(&alice).unwrap().remaining)
            .collect();
        assert_eq!(remaining, [2, 1, 0]);
        match rates.admit(&alice).unwrap_err() {
            Error::RateLimited { retry_after, .. } => {
                assert!(
                    retry_after > Duration::ZERO && retry_after <= Duration::from_millis(100),
                    "{retry_after:?}"
                );
            }
            other => panic!("expected RateLimited, got {other:?}"),
        }
        let bob = rates.admit(&"key_bob".to_owned()).unwrap();
        assert_eq!((bob.limit, bob.remaining), (3, 2));
        assert_eq!(rates.forget_idle(), 2);
    }

    #[test]
    fn an_idle_key_is_forgotten_once_its_bucket_refilled() {
        let rates = RequestRates::new(RequestRateOptions {
            per_second: 1_000.0,
            burst: 2,
        });
        rates.admit(&"key_idle".to_owned()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(rates.forget_idle(), 0);
    }
}
