//! One encoding of each watch message, shared by every stream that sends it.
//!
//! The hub hands every watcher of a batch the same `Arc<Batch>` for a version, so the
//! streams of one batch can share one encoding of it: the first stream to send a
//! version encodes it, the others send those bytes. Without this, 10,000 streams of
//! one batch each cloned, converted and encoded the same version, and that, not the
//! sockets, was most of the fan-out's time.
//!
//! Bounded: the most recent encodings only, at most [`MAX_ENTRIES`] and [`MAX_BYTES`] of
//! them together, and none of a message over [`MAX_SHARED_MESSAGE`] (each stream encodes
//! those itself). Entries are found by the address of their `Arc<Batch>` and hold it,
//! so that address cannot be reused by another batch while the entry exists.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use prost::Message as _;

use crate::domain::Batch;
use crate::proto::batchd::v1 as pb;
use crate::watch::{WatchEvent, WatchEventKind};

/// Most encodings kept at once.
const MAX_ENTRIES: usize = 4_096;
/// Most bytes of encodings kept at once.
const MAX_BYTES: usize = 4 << 20;
/// Messages larger than this are encoded by each stream.
const MAX_SHARED_MESSAGE: usize = 256 << 10;

struct Entry {
    /// Held, never read: while the entry exists, the key's address is this batch's.
    _batch: Arc<Batch>,
    encoded: Bytes,
}

/// An entry's key: the address of its batch, and the kind of message.
type Key = (usize, WatchEventKind);

fn key_of(event: &WatchEvent) -> Key {
    (Arc::as_ptr(&event.batch) as usize, event.kind)
}

/// Recent encodings of watch messages.
#[derive(Default)]
pub(super) struct SharedEncodings {
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    entries: HashMap<Key, Entry>,
    /// Keys oldest first.
    order: VecDeque<Key>,
    bytes: usize,
}

impl SharedEncodings {
    /// The message of `event`, encoded once for every stream that sends it.
    pub(super) fn response(&self, event: WatchEvent) -> pb::WatchBatchResponse {
        let key = key_of(&event);
        if let Some(entry) = self.lock().entries.get(&key) {
            return pb::WatchBatchResponse::pre_encoded(entry.encoded.clone());
        }
        let batch = event.batch.clone();
        let message = pb::WatchBatchResponse::from(event);
        if message.encoded_len() > MAX_SHARED_MESSAGE {
            return message;
        }
        let encoded = Bytes::from(message.encode_to_vec());
        self.keep(key, batch, encoded.clone());
        pb::WatchBatchResponse::pre_encoded(encoded)
    }

    fn keep(&self, key: Key, batch: Arc<Batch>, encoded: Bytes) {
        let mut kept = self.lock();
        let bytes = encoded.len();
        // Another stream may have encoded it meanwhile.
        if kept
            .entries
            .insert(
                key,
                Entry {
                    _batch: batch,
                    encoded,
                },
            )
            .is_some()
        {
            return;
        }
        kept.bytes += bytes;
        kept.order.push_back(key);
        while kept.bytes > MAX_BYTES || kept.order.len() > MAX_ENTRIES {
            let Some(oldest) = kept.order.pop_front() else {
                break;
            };
            if let Some(entry) = kept.entries.remove(&oldest) {
                kept.bytes -= entry.encoded.len();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(batch: &Arc<Batch>, kind: WatchEventKind) -> WatchEvent {
        WatchEvent {
            kind,
            batch: batch.clone(),
        }
    }

    #[test]
    fn streams_of_one_version_share_its_encoding_and_send_what_each_would_have() {
        let encodings = SharedEncodings::default();
        let version = Arc::new(crate::domain::fixtures::batch());
        let first = encodings.response(event(&version, WatchEventKind::Change));
        let second = encodings.response(event(&version, WatchEventKind::Change));
        let own = pb::WatchBatchResponse::from(event(&version, WatchEventKind::Change));
        assert_eq!(first.encode_to_vec(), own.encode_to_vec());
        assert_eq!(second.encode_to_vec(), own.encode_to_vec());
        assert_eq!(encodings.lock().entries.len(), 1, "encoded once");

        // Another kind, or an equal batch that is another version's allocation, is
        // another message.
        let heartbeat = encodings.response(event(&version, WatchEventKind::Heartbeat));
        assert_eq!(
            heartbeat.encode_to_vec(),
            pb::WatchBatchResponse::from(event(&version, WatchEventKind::Heartbeat))
                .encode_to_vec()
        );
        let mut next = (*version).clone();
        next.version += 1;
        let next = Arc::new(next);
        let changed = encodings.response(event(&next, WatchEventKind::Change));
        assert_eq!(
            pb::WatchBatchResponse::decode(changed.encode_to_vec().as_slice())
                .unwrap()
                .batch
                .unwrap()
                .version,
            next.version
        );
        assert_eq!(encodings.lock().entries.len(), 3);
    }

    #[test]
    fn the_kept_encodings_stay_within_their_bytes() {
        let encodings = SharedEncodings::default();
        let mut batch = crate::domain::fixtures::batch();
        batch.remark = Some("x".repeat(100_000));
        for version in 0..100 {
            batch.version = version;
            encodings.response(event(&Arc::new(batch.clone()), WatchEventKind::Change));
        }
        let kept = encodings.lock();
        let bytes: usize = kept.entries.values().map(|e| e.encoded.len()).sum();
        assert!(bytes <= MAX_BYTES, "{bytes} bytes kept");
        assert_eq!(bytes, kept.bytes);
        assert_eq!(kept.entries.len(), kept.order.len());
        assert!(kept.entries.len() >= 30, "the recent ones are kept");
    }
}
