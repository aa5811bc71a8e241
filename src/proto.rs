//! The code generated from `proto/` at build time: the `batchd.v1` messages and tonic
//! stubs, and the encoded descriptor set that gRPC reflection serves.

/// `batchd.v1`, the contract.
pub mod batchd {
    /// Version 1 of the contract.
    pub mod v1 {
        #![allow(missing_docs)]
        tonic::include_proto!("batchd.v1");
        pub use crate::proto::watch_response::WatchBatchResponse;
    }
}

pub mod watch_response;

/// The descriptor set of `batchd.v1` and its imports, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("batchd_descriptor");
