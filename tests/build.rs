//! Compiles the conformance echo app's gRPC service
//! (`conformance/grpcecho.proto`) with protox (pure Rust, no `protoc`) and
//! tonic-prost-build, for `weft-echo`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "conformance/grpcecho.proto";
    println!("cargo:rerun-if-changed={file}");
    let descriptors = protox::compile([file], ["conformance"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
