//! Compiles the versioned protos with the vendored `protoc` (no system protoc needed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest).join("../../proto");
    let files = [
        root.join("miner/common/v1/checkpoint.proto"),
        root.join("miner/trainer/v1/trainer.proto"),
        root.join("miner/chainsync/v1/chainsync.proto"),
    ];
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("miner_descriptor.bin"))
        .compile_with_config(config, &files, std::slice::from_ref(&root))?;
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    Ok(())
}
