//! `batchd.v1.WatchBatchResponse`, written by hand instead of generated (build.rs maps
//! the message here), so that one encoding of a change can be sent to every stream
//! that watches the batch: 10,000 streams of one batch would otherwise each clone,
//! convert and encode the same version. On the wire it is exactly the generated
//! message: field 1 the event type, field 2 the batch.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType};
use prost::{DecodeError, Message};

use super::batchd::v1::{Batch, EventType};

/// One message of a `WatchBatch` stream.
#[derive(Clone, Default)]
pub struct WatchBatchResponse {
    /// The kind of message, an [`EventType`].
    pub r#type: i32,
    /// The batch: current state, committed version, or (heartbeat) bookmark.
    pub batch: Option<Batch>,
    /// The message already encoded, sent as it is; `r#type` and `batch` are then
    /// unset: a server-side message, never decoded into.
    encoded: Option<Bytes>,
}

impl WatchBatchResponse {
    /// A message from its fields.
    pub fn new(kind: EventType, batch: Batch) -> WatchBatchResponse {
        WatchBatchResponse {
            r#type: kind.into(),
            batch: Some(batch),
            encoded: None,
        }
    }

    /// A message that sends `encoded`, the encoding of another one, as it is.
    pub fn pre_encoded(encoded: Bytes) -> WatchBatchResponse {
        WatchBatchResponse {
            encoded: Some(encoded),
            ..WatchBatchResponse::default()
        }
    }

    /// The kind of message; `Unspecified` for a value this version does not know.
    pub fn r#type(&self) -> EventType {
        EventType::try_from(self.r#type).unwrap_or_default()
    }
}

impl std::fmt::Debug for WatchBatchResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.encoded {
            Some(encoded) => f
                .debug_struct("WatchBatchResponse")
                .field("encoded_bytes", &encoded.len())
                .finish(),
            None => f
                .debug_struct("WatchBatchResponse")
                .field("type", &self.r#type())
                .field("batch", &self.batch)
                .finish(),
        }
    }
}

impl PartialEq for WatchBatchResponse {
    /// Equal when they encode the same.
    fn eq(&self, other: &Self) -> bool {
        self.encode_to_vec() == other.encode_to_vec()
    }
}

impl Message for WatchBatchResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if let Some(encoded) = &self.encoded {
            buf.put_slice(encoded);
            return;
        }
        if self.r#type != 0 {
            prost::encoding::int32::encode(1, &self.r#type, buf);
        }
        if let Some(batch) = &self.batch {
            prost::encoding::message::encode(2, batch, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => prost::encoding::int32::merge(wire_type, &mut self.r#type, buf, ctx),
            2 => prost::encoding::message::merge(
                wire_type,
                self.batch.get_or_insert_with(Batch::default),
                buf,
                ctx,
            ),
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        if let Some(encoded) = &self.encoded {
            return encoded.len();
        }
        let kind = if self.r#type != 0 {
            prost::encoding::int32::encoded_len(1, &self.r#type)
        } else {
            0
        };
        kind + self
            .batch
            .as_ref()
            .map_or(0, |batch| prost::encoding::message::encoded_len(2, batch))
    }

    fn clear(&mut self) {
        *self = WatchBatchResponse::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            id: "batch_1".into(),
            status: 2,
            version: 7,
            metadata: [("team".to_owned(), "search".to_owned())].into(),
            ..Batch::default()
        }
    }

    #[test]
    fn fields_round_trip_and_a_pre_encoded_message_is_the_same_bytes() {
        let message = WatchBatchResponse::new(EventType::Change, batch());
        let bytes = message.encode_to_vec();
        let decoded = WatchBatchResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.r#type(), EventType::Change);
        assert_eq!(decoded.batch, Some(batch()));

        let shared = WatchBatchResponse::pre_encoded(Bytes::from(bytes.clone()));
        assert_eq!(shared.encoded_len(), bytes.len());
        assert_eq!(shared.encode_to_vec(), bytes);
        assert_eq!(shared, message);
        // Unknown fields are skipped, as the generated code would.
        let mut with_unknown = bytes.clone();
        prost::encoding::string::encode(9, &"later".to_owned(), &mut with_unknown);
        let decoded = WatchBatchResponse::decode(with_unknown.as_slice()).unwrap();
        assert_eq!(decoded.batch, Some(batch()));
    }
}
