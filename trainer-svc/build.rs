//! Sets an rpath to the libtorch folder so the binaries run without LD_LIBRARY_PATH
//! (LD_LIBRARY_PATH still wins, which is how a GPU host points at its CUDA libtorch).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(dir) = std::env::var("LIBTORCH") {
        let lib = std::path::Path::new(&dir).join("lib");
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
