//! The batch lifecycle: the eight statuses and the one place that decides which moves
//! between them are legal.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a batch is in its lifecycle, spelled as OpenAI's lowercase strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    /// The input file is being validated before the batch can begin.
    Validating,
    /// Validation or processing failed.
    Failed,
    /// The batch is being run.
    InProgress,
    /// The batch has run; its results are being prepared.
    Finalizing,
    /// The batch has run and its results are ready.
    Completed,
    /// The batch did not complete within its completion window.
    Expired,
    /// Cancellation was requested and is being carried out.
    Cancelling,
    /// The batch was cancelled.
    Cancelled,
}

impl BatchStatus {
    /// Every status, in the order of the documented enum.
    pub const ALL: [BatchStatus; 8] = [
        BatchStatus::Validating,
        BatchStatus::Failed,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Completed,
        BatchStatus::Expired,
        BatchStatus::Cancelling,
        BatchStatus::Cancelled,
    ];

    /// The documented wire spelling, e.g. `in_progress`.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    /// The status named `text` (its [`as_str`](Self::as_str) spelling); `None` for
    /// anything else.
    pub fn from_name(text: &str) -> Option<BatchStatus> {
        BatchStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// The statuses a batch can be marked stalled in: every one but the final ones.
    pub const STALLABLE: [BatchStatus; 4] = [
        BatchStatus::Validating,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Cancelling,
    ];

    /// A terminal batch never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BatchStatus::Completed
                | BatchStatus::Failed
                | BatchStatus::Expired
                | BatchStatus::Cancelled
        )
    }

    /// The state machine: whether a batch in `self` may move to `next`.
    /// Staying in the same status is not a move and is not covered here.
    pub fn can_move_to(self, next: BatchStatus) -> bool {
        use BatchStatus::*;
        match self {
            Validating => matches!(next, InProgress | Failed | Cancelling | Expired),
            InProgress => matches!(next, Finalizing | Failed | Cancelling | Expired),
            Finalizing => matches!(next, Completed | Failed | Expired),
            Cancelling => matches!(next, Cancelled),
            Completed | Failed | Expired | Cancelled => false,
        }
    }
}

impl fmt::Display for BatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::BatchStatus::{self, *};

    #[test]
    fn the_documented_transitions_and_only_those_are_legal() {
        let legal = [
            (Validating, InProgress),
            (Validating, Failed),
            (Validating, Cancelling),
            (Validating, Expired),
            (InProgress, Finalizing),
            (InProgress, Failed),
            (InProgress, Cancelling),
            (InProgress, Expired),
            (Finalizing, Completed),
            (Finalizing, Failed),
            (Finalizing, Expired),
            (Cancelling, Cancelled),
        ];
        for from in BatchStatus::ALL {
            for to in BatchStatus::ALL {
                assert_eq!(
                    from.can_move_to(to),
                    legal.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn terminal_statuses_have_no_way_out() {
        for status in BatchStatus::ALL {
            let has_exit = BatchStatus::ALL.iter().any(|&to| status.can_move_to(to));
            assert_eq!(status.is_terminal(), !has_exit, "{status}");
        }
    }

    #[test]
    fn wire_spelling_round_trips() {
        for status in BatchStatus::ALL {
            assert_eq!(BatchStatus::from_name(status.as_str()), Some(status));
        }
        assert_eq!(BatchStatus::from_name("IN_PROGRESS"), None);
        assert_eq!(BatchStatus::from_name("progress"), None);
    }
}
