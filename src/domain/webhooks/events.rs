//! The webhook events of a batch, in OpenAI's shape: `{"id": "evt_...", "object":
//! "event", "type": "batch.completed", "created_at": <unix s>, "data": {"id":
//! "batch_..."}}`. OpenAI sends the four terminal ones; batchd offers every status a
//! batch can reach as well, and `batch.stalled` when it marks a batch stalled.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::domain::{Batch, BatchStatus};

/// What a webhook endpoint can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WebhookEventType {
    /// A batch was created (`validating`). batchd's own.
    BatchCreated,
    /// A batch began running. batchd's own.
    BatchInProgress,
    /// A batch is preparing its results. batchd's own.
    BatchFinalizing,
    /// Cancellation of a batch was requested. batchd's own.
    BatchCancelling,
    /// A batch completed. OpenAI's.
    BatchCompleted,
    /// A batch failed. OpenAI's.
    BatchFailed,
    /// A batch expired. OpenAI's.
    BatchExpired,
    /// A batch was cancelled. OpenAI's.
    BatchCancelled,
    /// batchd marked a batch stalled: no change for the stall time. batchd's own.
    BatchStalled,
}

impl WebhookEventType {
    /// Every event type, OpenAI's first.
    pub const ALL: [WebhookEventType; 9] = [
        WebhookEventType::BatchCompleted,
        WebhookEventType::BatchFailed,
        WebhookEventType::BatchExpired,
        WebhookEventType::BatchCancelled,
        WebhookEventType::BatchCreated,
        WebhookEventType::BatchInProgress,
        WebhookEventType::BatchFinalizing,
        WebhookEventType::BatchCancelling,
        WebhookEventType::BatchStalled,
    ];

    /// The name on the wire, e.g. `batch.completed`.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEventType::BatchCreated => "batch.created",
            WebhookEventType::BatchInProgress => "batch.in_progress",
            WebhookEventType::BatchFinalizing => "batch.finalizing",
            WebhookEventType::BatchCancelling => "batch.cancelling",
            WebhookEventType::BatchCompleted => "batch.completed",
            WebhookEventType::BatchFailed => "batch.failed",
            WebhookEventType::BatchExpired => "batch.expired",
            WebhookEventType::BatchCancelled => "batch.cancelled",
            WebhookEventType::BatchStalled => "batch.stalled",
        }
    }

    /// The event type named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<WebhookEventType> {
        WebhookEventType::ALL
            .into_iter()
            .find(|kind| kind.as_str() == name)
    }

    /// Whether OpenAI sends this event type too.
    pub fn is_openai(self) -> bool {
        matches!(
            self,
            WebhookEventType::BatchCompleted
                | WebhookEventType::BatchFailed
                | WebhookEventType::BatchExpired
                | WebhookEventType::BatchCancelled
        )
    }

    /// The event a batch reaching `status` makes.
    pub fn of_status(status: BatchStatus) -> WebhookEventType {
        match status {
            BatchStatus::Validating => WebhookEventType::BatchCreated,
            BatchStatus::InProgress => WebhookEventType::BatchInProgress,
            BatchStatus::Finalizing => WebhookEventType::BatchFinalizing,
            BatchStatus::Cancelling => WebhookEventType::BatchCancelling,
            BatchStatus::Completed => WebhookEventType::BatchCompleted,
            BatchStatus::Failed => WebhookEventType::BatchFailed,
            BatchStatus::Expired => WebhookEventType::BatchExpired,
            BatchStatus::Cancelled => WebhookEventType::BatchCancelled,
        }
    }

    /// The event of a committed version, if it changed the status: version 1 (the
    /// batch was created), or a version whose status differs from the one before; or
    /// `batch.stalled` for the version that marked the batch stalled (the only one that
    /// carries `stalled_at`: the next change clears it). `previous` is the status of
    /// the version before, as the change feed carries it.
    pub fn of_change(previous: Option<BatchStatus>, batch: &Batch) -> Option<WebhookEventType> {
        if batch.stalled_at.is_some() {
            return Some(WebhookEventType::BatchStalled);
        }
        let changed = match previous {
            Some(before) => before != batch.status,
            None => batch.version == 1,
        };
        changed.then(|| WebhookEventType::of_status(batch.status))
    }
}

/// One webhook event, exactly as OpenAI sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WebhookEvent {
    /// `evt_` and 32 hex digits, the same for a version of a batch wherever and however
    /// often it is derived: the `webhook-id` receivers deduplicate by.
    pub id: String,
    /// Always `event`.
    pub object: &'static str,
    /// The event type's name.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// When the change was committed, Unix seconds.
    pub created_at: i64,
    /// The batch.
    pub data: EventData,
}

/// The `data` of a batch event: the batch's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventData {
    /// The batch's id.
    pub id: String,
}

impl WebhookEvent {
    /// The event of `kind` for the version of `batch` that made it.
    pub fn of(kind: WebhookEventType, batch: &Batch) -> WebhookEvent {
        let digest = Sha256::digest(format!("{}:{}:{}", batch.id, batch.version, kind.as_str()));
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        WebhookEvent {
            id: format!("evt_{hex}"),
            object: "event",
            kind: kind.as_str(),
            created_at: batch.updated_at.unwrap_or(batch.created_at),
            data: EventData {
                id: batch.id.to_string(),
            },
        }
    }
}

impl WebhookEvent {
    /// A sample event of `kind` for a test delivery: a made-up batch, a fresh id.
    pub fn sample(kind: WebhookEventType, now: i64) -> WebhookEvent {
        WebhookEvent {
            id: format!("evt_test_{}", crate::domain::random_hex::<12>()),
            object: "event",
            kind: kind.as_str(),
            created_at: now,
            data: EventData {
                id: "batch_test_delivery".to_owned(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::fixtures;

    #[test]
    fn every_type_reads_back_from_its_name_and_every_status_has_one() {
        for kind in WebhookEventType::ALL {
            assert_eq!(WebhookEventType::from_name(kind.as_str()), Some(kind));
        }
        assert_eq!(WebhookEventType::from_name("batch.done"), None);
        let openai: Vec<&str> = WebhookEventType::ALL
            .into_iter()
            .filter(|kind| kind.is_openai())
            .map(WebhookEventType::as_str)
            .collect();
        assert_eq!(
            openai,
            [
                "batch.completed",
                "batch.failed",
                "batch.expired",
                "batch.cancelled"
            ]
        );
        let of_statuses: std::collections::BTreeSet<_> = BatchStatus::ALL
            .into_iter()
            .map(WebhookEventType::of_status)
            .collect();
        // Every type is a status's, but the stall mark's, which moves no status.
        assert_eq!(of_statuses.len(), WebhookEventType::ALL.len() - 1);
        assert!(!of_statuses.contains(&WebhookEventType::BatchStalled));
    }

    #[test]
    fn only_a_status_change_makes_an_event() {
        let mut batch = fixtures::batch();
        assert_eq!(
            WebhookEventType::of_change(None, &batch),
            Some(WebhookEventType::BatchCreated)
        );
        batch.version = 2;
        batch.status = BatchStatus::InProgress;
        assert_eq!(
            WebhookEventType::of_change(Some(BatchStatus::Validating), &batch),
            Some(WebhookEventType::BatchInProgress)
        );
        batch.version = 3;
        assert_eq!(
            WebhookEventType::of_change(Some(BatchStatus::InProgress), &batch),
            None,
            "a progress report is not an event"
        );
    }

    #[test]
    fn an_event_is_openais_json_with_an_id_stable_across_derivations() {
        let mut batch = fixtures::batch();
        batch.version = 4;
        batch.status = BatchStatus::Completed;
        batch.updated_at = Some(batch.created_at + 60);
        let event = WebhookEvent::of(WebhookEventType::BatchCompleted, &batch);
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": event.id,
                "object": "event",
                "type": "batch.completed",
                "created_at": batch.created_at + 60,
                "data": {"id": batch.id.to_string()},
            })
        );
        assert!(event.id.starts_with("evt_") && event.id.len() == 4 + 32);
        assert_eq!(
            WebhookEvent::of(WebhookEventType::BatchCompleted, &batch),
            event
        );
        batch.version = 5;
        assert_ne!(
            WebhookEvent::of(WebhookEventType::BatchCompleted, &batch).id,
            event.id
        );
    }
}
