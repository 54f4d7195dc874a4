//! Compiles `proto/tcc/v1/tcc.proto` with protox (pure Rust, no system
//! `protoc`) and generates prost messages plus tonic clients and servers. The
//! encoded descriptor set is kept for gRPC server reflection.
//!
//! Two passes: messages and clients with tonic-prost's codec, then the
//! servers alone (into `OUT_DIR/server`, messages referred to by path) with
//! [`RequestCodec`](../src/codec.rs), which answers an undecodable request
//! with INVALID_ARGUMENT instead of INTERNAL.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tcc/v1/tcc.proto";
    println!("cargo:rerun-if-changed={proto}");

    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("tcc_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure().build_client(true).build_server(false).compile_fds(fds.clone())?;
    let servers = out.join("server");
    fs::create_dir_all(&servers)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(".tcc.v1", "crate::v1")
        .codec_path("crate::codec::RequestCodec")
        .out_dir(&servers)
        .compile_fds(fds)?;
    Ok(())
}
