//! The gRPC API (`proto/hearth/v1`): the only module that knows protobuf types. Handlers
//! validate, record the desired change in one commit, wake the machine's run and return;
//! they never do host work.

pub mod authority;
pub mod convert;
pub mod images;
pub mod machines;
pub mod metrics;
pub mod node;
pub mod registry;
pub mod server;
pub mod status;
pub mod timing;

/// The API's encoded protobuf descriptors, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/hearth_descriptor.bin"));

/// Generated protobuf and gRPC code.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("hearth.v1");
}
