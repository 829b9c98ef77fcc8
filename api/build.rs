//! Compiles `proto/weft/v1/*.proto` into Rust with protox (pure Rust, so no
//! `protoc` is needed) and tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/weft/v1/mesh.proto",
        "proto/weft/v1/config.proto",
        "proto/weft/v1/ca.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
