//! The wire contract of the TCC coordinator, package `tcc.v1`.
//!
//! `proto/tcc/v1/tcc.proto` is the single source of truth and documents every
//! field; this crate compiles it once (with protox, so no system `protoc` is
//! needed) into prost messages and tonic clients/servers that every other
//! crate of the workspace uses.

/// Messages, clients (`*_client`) and servers (`*_server`) of `tcc.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod v1 {
    tonic::include_proto!("tcc.v1");
    include!(concat!(env!("OUT_DIR"), "/server/tcc.v1.rs"));
}

pub mod codec;
pub mod identity;

/// The encoded `FileDescriptorSet` of `tcc.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tcc_descriptor");
