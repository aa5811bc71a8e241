//! Compiles the protobuf contract with protox (pure Rust), so building needs nothing
//! outside cargo, and writes the encoded descriptor set that gRPC reflection serves.

use std::{env, fs, path::PathBuf};

const PROTO_ROOT: &str = "proto";
const CONTRACT: [&str; 2] = [
    "proto/batchd/v1/batch.proto",
    "proto/batchd/v1/webhook.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    // `sqlx::migrate!` embeds migrations/ at compile time; without this, a new
    // migration file is left out of the build until some source file changes.
    println!("cargo:rerun-if-changed=migrations");

    let mut compiler = protox::Compiler::new([PROTO_ROOT])?;
    compiler.include_imports(true).include_source_info(true);
    for file in CONTRACT {
        compiler.open_file(file)?;
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("batchd_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Written by hand, so that one encoding of a version can go to every stream
        // of its batch (src/proto/watch_response.rs).
        .extern_path(
            ".batchd.v1.WatchBatchResponse",
            "crate::proto::watch_response::WatchBatchResponse",
        )
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
