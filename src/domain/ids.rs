//! Batch ids and the random hex that ids and secrets are made of.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The id of a batch: `batch_` followed by 1 to 64 ASCII letters and digits. Ids that
/// batchd generates carry 128 random bits as 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BatchId(String);

const BATCH_ID_PREFIX: &str = "batch_";

impl BatchId {
    /// What [`BatchId::parse`] accepts, as an ECMA-262 regular expression.
    pub const PATTERN: &'static str = "^batch_[A-Za-z0-9]{1,64}$";

    /// A new unguessable id from the operating system's CSPRNG.
    pub fn generate() -> BatchId {
        BatchId(format!("{BATCH_ID_PREFIX}{}", random_hex::<16>()))
    }

    /// Parses an id sent by a client; `field` names the request field for the error.
    pub fn parse(field: &str, text: &str) -> Result<BatchId> {
        let suffix = text.strip_prefix(BATCH_ID_PREFIX).unwrap_or_default();
        let well_formed =
            (1..=64).contains(&suffix.len()) && suffix.bytes().all(|b| b.is_ascii_alphanumeric());
        if well_formed {
            Ok(BatchId(text.to_owned()))
        } else {
            Err(Error::invalid(
                field,
                format!(
                    "`{}` is not a batch id (expected `batch_` followed by 1 to 64 letters or digits)",
                    truncate_for_message(text)
                ),
            ))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `N` random bytes from the OS CSPRNG, as lowercase hex.
pub(crate) fn random_hex<const N: usize>() -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = [0u8; N];
    // getrandom fails only when the OS has no entropy source at all, in which case no
    // id or key can be made safely and stopping is the right answer.
    getrandom::fill(&mut bytes).expect("the operating system's random number generator failed");
    bytes
        .iter()
        .flat_map(|b| [DIGITS[(b >> 4) as usize], DIGITS[(b & 15) as usize]])
        .map(char::from)
        .collect()
}

/// Echoes at most 80 characters of a client value in an error message.
pub(super) fn truncate_for_message(text: &str) -> String {
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}
