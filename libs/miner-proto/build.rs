//! Compiles the versioned protos with the vendored `protoc` (no system protoc needed).
//!
//! The proto root is taken from `CARGO_MANIFEST_DIR` at run time (not baked in when this script
//! is compiled) and the script re-runs when the invoking checkout changes (`PWD`): several
//! checkouts (git worktrees) sharing one `CARGO_TARGET_DIR` share this script's build and
//! output directories, and each must get the code of its own `proto/`.
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
    println!("cargo:rerun-if-env-changed=PWD");
    Ok(())
}
