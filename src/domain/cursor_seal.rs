//! Change feed cursors as clients see them: sealed, so that they reveal nothing and
//! are bound to whose changes they follow.
//!
//! A [`FeedCursor`] is a position in the one feed every tenant's changes go through:
//! shown as it is, the number moves with every tenant's writes, so a tenant could
//! watch other tenants' activity through its own cursors. A client therefore gets
//! `fc_` and the cursor encrypted with XChaCha20-Poly1305 under the deployment's cursor
//! key (shared by every replica through the database) with a nonce never used before
//! (a random 128-bit prefix per process and a count): every
//! cursor handed out, bookmarks included, looks new and has one length, whatever
//! happened in between. The scope it was handed out for (one owner's batches, or every
//! owner's) is authenticated with it, so a cursor opens only for the scope it came
//! from, and a forged or altered one does not open at all.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use super::feed::FeedCursor;
use crate::error::{Error, Result};

const PREFIX: &str = "fc_";
const NONCE_BYTES: usize = 24;
const PLAIN_BYTES: usize = 16;
const TAG_BYTES: usize = 16;
/// Characters of a sealed cursor: the prefix and 56 bytes in unpadded base64url.
const SEALED_CHARS: usize =
    PREFIX.len() + ((NONCE_BYTES + PLAIN_BYTES + TAG_BYTES) * 4).div_ceil(3);
/// What the associated data starts with, so that a cursor key never opens anything
/// else it might one day seal.
const CONTEXT: &[u8] = b"batchd change feed cursor v1\0";

/// Bytes of a cursor key.
pub const CURSOR_KEY_BYTES: usize = 32;

/// Seals and opens change feed cursors with the deployment's cursor key.
#[derive(Clone)]
pub struct CursorSealer {
    cipher: XChaCha20Poly1305,
    /// Nonces are this sealer's random prefix and a count: unique without a system
    /// call per cursor (every change to every stream is sealed).
    nonce_prefix: [u8; NONCE_BYTES - 8],
    sealed: Arc<AtomicU64>,
}

impl std::fmt::Debug for CursorSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorSealer(<key>)")
    }
}

impl CursorSealer {
    /// A sealer with this key.
    pub fn new(key: &[u8; CURSOR_KEY_BYTES]) -> CursorSealer {
        CursorSealer {
            cipher: XChaCha20Poly1305::new(key.into()),
            nonce_prefix: random_bytes(),
            sealed: Arc::default(),
        }
    }

    /// A sealer with a key of its own, for a process that hands out no cursor another
    /// replica must open.
    pub fn with_random_key() -> CursorSealer {
        CursorSealer::new(&random_bytes())
    }

    /// A new random cursor key, in the text form a database keeps.
    pub fn generate_key_text() -> String {
        URL_SAFE_NO_PAD.encode(random_bytes::<CURSOR_KEY_BYTES>())
    }

    /// The key in `text` (what [`CursorSealer::generate_key_text`] made).
    pub fn from_key_text(text: &str) -> Result<CursorSealer> {
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| {
            Error::Internal("the stored change feed cursor key is not base64url".into())
        })?;
        let key: [u8; CURSOR_KEY_BYTES] = bytes.try_into().map_err(|_| {
            Error::Internal("the stored change feed cursor key is not 32 bytes".into())
        })?;
        Ok(CursorSealer::new(&key))
    }

    /// `cursor`, sealed for the scope `owner` (`None`: every owner's batches).
    pub fn seal(&self, cursor: FeedCursor, owner: Option<&str>) -> String {
        let mut plain = [0u8; PLAIN_BYTES];
        plain[..8].copy_from_slice(&cursor.transaction.to_be_bytes());
        plain[8..].copy_from_slice(&cursor.position.to_be_bytes());
        let mut nonce = [0u8; NONCE_BYTES];
        nonce[..NONCE_BYTES - 8].copy_from_slice(&self.nonce_prefix);
        let count = self.sealed.fetch_add(1, Ordering::Relaxed);
        nonce[NONCE_BYTES - 8..].copy_from_slice(&count.to_be_bytes());
        let aad = associated_data(owner);
        let sealed = self
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            // Encryption fails only for messages beyond the cipher's length limit.
            .expect("16 bytes are always sealed");
        let mut bytes = Vec::with_capacity(NONCE_BYTES + sealed.len());
        bytes.extend_from_slice(&nonce);
        bytes.extend_from_slice(&sealed);
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The cursor sealed in `text` for the scope `owner`; `field` names the input in
    /// errors, which say the same of every cursor that does not open here (malformed,
    /// altered, sealed for another scope or by another deployment), and quote none.
    pub fn open(&self, field: &str, text: &str, owner: Option<&str>) -> Result<FeedCursor> {
        let refused = || {
            Error::invalid(
                field,
                "is not a change feed cursor of this API key's batches; send the cursor of an event the feed sent to this key's owner",
            )
        };
        if is_unsealed_cursor(text) {
            // What releases before sealing handed out: it was a cursor, so its holder
            // starts over (410 / FAILED_PRECONDITION, which clients already handle)
            // rather than being told it sent something malformed.
            return Err(Error::FeedCompacted {
                after: "an unsealed cursor of an earlier release".into(),
                oldest: "unknown".into(),
            });
        }
        let encoded = text.strip_prefix(PREFIX).ok_or_else(refused)?;
        if text.len() != SEALED_CHARS {
            return Err(refused());
        }
        let bytes = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| refused())?;
        let (nonce, sealed) = bytes.split_at(NONCE_BYTES);
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| refused())?;
        let aad = associated_data(owner);
        let plain = self
            .cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| refused())?;
        let part = |range: std::ops::Range<usize>| {
            i64::from_be_bytes(plain[range].try_into().expect("8 bytes of 16"))
        };
        Ok(FeedCursor {
            transaction: part(0..8),
            position: part(8..16),
        })
    }
}

/// Whether `text` has the form of the cursors releases before sealing sent,
/// `<transaction>.<position>` in decimal digits.
fn is_unsealed_cursor(text: &str) -> bool {
    let digits =
        |part: &str| (1..=19).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit());
    text.split_once('.')
        .is_some_and(|(transaction, position)| digits(transaction) && digits(position))
}

/// What a cursor is bound to: the context and the scope.
fn associated_data(owner: Option<&str>) -> Vec<u8> {
    let mut aad = CONTEXT.to_vec();
    match owner {
        // A user id never holds NUL (see `ApiKey::new`), so "*" cannot be an owner's.
        None => aad.extend_from_slice(b"*"),
        Some(owner) => {
            aad.extend_from_slice(b"owner\0");
            aad.extend_from_slice(owner.as_bytes());
        }
    }
    aad
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // The operating system's generator failing is not something to go on from.
    getrandom::fill(&mut bytes).expect("the system random number generator works");
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(result: Result<FeedCursor>) -> String {
        match result.unwrap_err() {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    const CURSOR: FeedCursor = FeedCursor {
        transaction: 9_223_372_036_854_775_807,
        position: 3,
    };

    #[test]
    fn a_sealed_cursor_opens_for_its_own_scope_only() {
        let sealer = CursorSealer::with_random_key();
        for scope in [None, Some("alice"), Some("")] {
            let sealed = sealer.seal(CURSOR, scope);
            assert_eq!(sealer.open("c", &sealed, scope).unwrap(), CURSOR);
        }
        let alices = sealer.seal(CURSOR, Some("alice"));
        for other in [None, Some("bob"), Some("alice\0"), Some("Alice")] {
            assert_eq!(
                field_of(sealer.open("after_cursor", &alices, other)),
                "after_cursor"
            );
        }
        let everyones = sealer.seal(CURSOR, None);
        assert!(sealer.open("c", &everyones, Some("*")).is_err());
        let elsewhere = CursorSealer::with_random_key();
        assert!(
            elsewhere.open("c", &alices, Some("alice")).is_err(),
            "another key"
        );
    }

    #[test]
    fn sealed_cursors_reveal_nothing_not_even_sameness() {
        let sealer = CursorSealer::with_random_key();
        let small = FeedCursor::default();
        let a = sealer.seal(small, Some("alice"));
        let b = sealer.seal(small, Some("alice"));
        let c = sealer.seal(CURSOR, Some("alice"));
        assert_ne!(a, b, "the same position looks new every time");
        assert_eq!(a.len(), SEALED_CHARS);
        assert_eq!(c.len(), SEALED_CHARS, "every position has one length");
    }

    #[test]
    fn malformed_or_altered_cursors_are_refused_without_quoting_them() {
        let sealer = CursorSealer::with_random_key();
        let sealed = sealer.seal(CURSOR, Some("alice"));
        let mut flipped = sealed.clone().into_bytes();
        let last = flipped.len() - 2;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        let huge = "f".repeat(100_000);
        for bad in [
            "",
            "1.2.3",
            "-1.2",
            "fc_",
            &sealed[..sealed.len() - 1],
            &format!("{sealed}A"),
            &flipped,
            &sealed.replacen("fc_", "fd_", 1),
            &format!("fc_{}", "!".repeat(SEALED_CHARS - 3)),
            &huge,
        ] {
            let error = sealer.open("after_cursor", bad, Some("alice")).unwrap_err();
            let message = error.to_string();
            assert!(matches!(error, Error::InvalidArgument { .. }), "{bad:.30}");
            assert!(message.len() < 300, "{bad:.30}");
            if bad.len() > 3 {
                assert!(!message.contains(&bad[3..]), "the message quotes nothing");
            }
        }
    }

    #[test]
    fn a_cursor_of_an_earlier_release_starts_over() {
        let sealer = CursorSealer::with_random_key();
        for old in ["0.3", "9223372036854775807.12"] {
            assert!(
                matches!(
                    sealer.open("after_cursor", old, None),
                    Err(Error::FeedCompacted { .. })
                ),
                "{old}"
            );
        }
    }

    #[test]
    fn a_stored_key_text_gives_the_same_sealer() {
        let text = CursorSealer::generate_key_text();
        let one = CursorSealer::from_key_text(&text).unwrap();
        let two = CursorSealer::from_key_text(&text).unwrap();
        assert_eq!(
            two.open("c", &one.seal(CURSOR, None), None).unwrap(),
            CURSOR
        );
        assert!(CursorSealer::from_key_text("not base64!").is_err());
        assert!(CursorSealer::from_key_text("AAAA").is_err());
    }
}
