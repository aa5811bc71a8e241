//! Deliveries: one event for one endpoint, from the moment the dispatcher queues it
//! until a 2xx ends it or its retries run out, and the schedule its retries follow.

use std::time::Duration;

use crate::domain::random_hex;
use crate::error::{Error, Result};

/// Where a delivery is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for its next attempt (or in one).
    Pending,
    /// A 2xx answered it.
    Delivered,
    /// Its retries ran out, or the endpoint answered 410 Gone.
    Failed,
}

impl DeliveryState {
    /// The stored and displayed spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }

    /// Reads the stored spelling.
    pub fn parse(text: &str) -> Result<DeliveryState> {
        match text {
            "pending" => Ok(DeliveryState::Pending),
            "delivered" => Ok(DeliveryState::Delivered),
            "failed" => Ok(DeliveryState::Failed),
            other => Err(Error::Internal(format!(
                "a webhook delivery has the unknown state `{other}`"
            ))),
        }
    }
}

/// A delivery the dispatcher queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    /// `wd_` and 24 hex digits.
    pub id: String,
    /// The endpoint it goes to.
    pub endpoint_id: String,
    /// The event's id: the `webhook-id` of every attempt.
    pub event_id: String,
    /// The event type's name.
    pub event_type: String,
    /// The batch the event is about.
    pub batch_id: String,
    /// The JSON body every attempt sends.
    pub payload: String,
    /// When the event happened, Unix seconds.
    pub created_at: i64,
}

impl NewDelivery {
    /// A new delivery id.
    pub fn new_id() -> String {
        format!("wd_{}", random_hex::<12>())
    }
}

/// A delivery as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// What was queued.
    pub queued: NewDelivery,
    /// Where it is.
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: i64,
    /// When the next attempt is due, Unix milliseconds (pending deliveries).
    pub next_attempt_at_ms: i64,
    /// The last attempt, if any.
    pub last_attempt: Option<AttemptReport>,
    /// When it was delivered or given up, Unix milliseconds.
    pub finished_at_ms: Option<i64>,
}

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptReport {
    /// When it started, Unix milliseconds.
    pub at_ms: i64,
    /// How long it took.
    pub duration_ms: i64,
    /// The receiver's HTTP status, if it answered.
    pub status_code: Option<i32>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    /// A 2xx ended it.
    Delivered,
    /// Another attempt at this time, Unix milliseconds.
    RetryAt(i64),
    /// No more attempts.
    GiveUp,
}

/// What an attempt says about its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointHealth {
    /// Nothing changes: it failed and was failing already.
    Unchanged,
    /// It answered 2xx: not failing.
    Healthy,
    /// It failed; it has been failing since then unless it already was.
    Failing(i64),
    /// It stops receiving: it answered 410, or has failed for too long.
    Disable {
        /// When, Unix seconds.
        at: i64,
        /// Why, as the endpoint's state shows it.
        reason: String,
    },
}

/// An attempt and its consequences, recorded at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// What it found.
    pub report: AttemptReport,
    /// What happens to the delivery.
    pub after: AfterAttempt,
    /// What happens to the endpoint.
    pub endpoint: EndpointHealth,
}

/// Waits before each attempt after a failure: Standard Webhooks' schedule by default
/// (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h after the first, immediate
/// attempt), each with up to 10% jitter so that many retries do not arrive at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule {
    waits: Vec<Duration>,
}

/// Longest wait a `Retry-After` header can ask for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Most retries a schedule may list.
const MAX_RETRIES: usize = 50;

impl Default for RetrySchedule {
    fn default() -> Self {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        RetrySchedule {
            waits: vec![
                Duration::from_secs(5),
                minutes(5),
                minutes(30),
                minutes(120),
                minutes(300),
                minutes(600),
                minutes(840),
                minutes(1200),
                minutes(1440),
            ],
        }
    }
}

/// The schedule as [`RetrySchedule::parse`] reads it: `5s,5m,30m` (empty for none).
impl std::fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, wait) in self.waits.iter().enumerate() {
            let separator = if i == 0 { "" } else { "," };
            write!(f, "{separator}{}", humantime::format_duration(*wait))?;
        }
        Ok(())
    }
}

impl RetrySchedule {
    /// Parses a comma-separated list of waits (`5s,5m,30m`); `field` names the
    /// setting in errors. An empty list means no retries.
    pub fn parse(field: &str, text: &str) -> Result<RetrySchedule> {
        let mut waits = Vec::new();
        for (i, part) in text.split(',').map(str::trim).enumerate() {
            if part.is_empty() && text.trim().is_empty() {
                break;
            }
            let wait = humantime::parse_duration(part).map_err(|e| {
                Error::invalid(
                    field,
                    format!(
                        "wait {} (`{}`) is not a duration: {e}",
                        i + 1,
                        part.escape_debug()
                    ),
                )
            })?;
            waits.push(wait);
        }
        if waits.len() > MAX_RETRIES {
            return Err(Error::invalid(
                field,
                format!("lists {} retries; at most {MAX_RETRIES}", waits.len()),
            ));
        }
        Ok(RetrySchedule { waits })
    }

    /// The wait before the next attempt after `attempts` failed ones, at least what
    /// the receiver's `Retry-After` asked for (capped at a day); `None` once the
    /// retries have run out.
    pub fn wait_after(&self, attempts: i64, retry_after: Option<Duration>) -> Option<Duration> {
        let index = usize::try_from(attempts.checked_sub(1)?).ok()?;
        let planned = *self.waits.get(index)?;
        let jitter = planned.mul_f64(jitter_fraction() * 0.1);
        let wait = planned + jitter;
        Some(match retry_after {
            Some(asked) => wait.max(asked.min(MAX_RETRY_AFTER)),
            None => wait,
        })
    }

    /// How many attempts a delivery gets in all.
    pub fn attempts(&self) -> usize {
        self.waits.len() + 1
    }
}

/// A random fraction in [0, 1).
fn jitter_fraction() -> f64 {
    let mut bytes = [0u8; 4];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.0;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_is_standard_webhooks_with_jitter_of_at_most_a_tenth() {
        let schedule = RetrySchedule::default();
        assert_eq!(schedule.attempts(), 10);
        let first = schedule.wait_after(1, None).unwrap();
        assert!(first >= Duration::from_secs(5) && first <= Duration::from_millis(5_500));
        let last = schedule.wait_after(9, None).unwrap();
        assert!(last >= Duration::from_secs(86_400));
        assert_eq!(schedule.wait_after(10, None), None, "ten attempts in all");
        assert_eq!(schedule.wait_after(0, None), None);
    }

    #[test]
    fn retry_after_lengthens_a_wait_up_to_a_day() {
        let schedule = RetrySchedule::parse("retries", "1s,2s").unwrap();
        let asked = schedule
            .wait_after(1, Some(Duration::from_secs(60)))
            .unwrap();
        assert_eq!(asked, Duration::from_secs(60));
        let capped = schedule
            .wait_after(2, Some(Duration::from_secs(10 * 86_400)))
            .unwrap();
        assert_eq!(capped, MAX_RETRY_AFTER);
        let shorter = schedule.wait_after(2, Some(Duration::ZERO)).unwrap();
        assert!(shorter >= Duration::from_secs(2));
    }

    #[test]
    fn a_schedule_parses_from_a_list_and_names_a_bad_wait() {
        assert_eq!(RetrySchedule::parse("r", "").unwrap().attempts(), 1);
        assert_eq!(
            RetrySchedule::parse("r", "100ms, 1s").unwrap().attempts(),
            3
        );
        let message = RetrySchedule::parse("webhook_retry_schedule", "5s,soon")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("wait 2") && message.contains("soon"),
            "{message}"
        );
        let long = vec!["1s"; MAX_RETRIES + 1].join(",");
        assert!(RetrySchedule::parse("r", &long).is_err());
    }
}
