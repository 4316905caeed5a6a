// Shared by the root package and `common` (both link libtorch and build test binaries).
//
// 1. rpath: the binaries find libtorch without LD_LIBRARY_PATH.
// 2. CUDA: rustc links with --as-needed, which drops libtorch_cuda.so because no symbol
//    of it is referenced directly; then tch::Cuda::is_available() is false on a GPU
//    machine. When setup installed the CUDA build (it leaves `.venv/.cuda`), or
//    POISON_LINK_CUDA=1, force the library in. Not runnable on CPU-only machines: there
//    libtorch_cuda.so's own CUDA dependencies are absent, so we must not link it.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=POISON_LINK_CUDA");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB; is LIBTORCH set? run `make setup`");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");

    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    let marker = Path::new(&manifest)
        .ancestors()
        .map(|d| d.join(".venv/.cuda"))
        .find(|p| p.exists());
    let forced = std::env::var("POISON_LINK_CUDA").map(|v| v == "1").unwrap_or(false);
    if (forced || marker.is_some()) && Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
