//! Link the `mlp` binary as a position-dependent executable (`-no-pie`).
//!
//! Every CLI call is a whole process start of a binary of several hundred MB. As a PIE, the
//! dynamic loader applies ~70,000 relative relocations at each start, which writes (and so
//! copies) every page of `.data.rel.ro`: ~320 page faults and ~0.7 ms of a 2.3 ms
//! `mlp --version` on the build machine (docs/benchmarks.md, "Where one CLI call goes").
//! Linked at a fixed address there is nothing to relocate. This is the default of Go's
//! toolchain on linux/amd64, and so of the Nomad, etcd and Kubernetes binaries; the cost is
//! that the main image is not randomised by ASLR (libraries, heap, stacks and mmaps still
//! are). `MLP_PIE=1` at build time keeps the usual PIE.
fn main() {
    // `mlp --version` names the target it was built for (a glibc or a static musl binary).
    if let Ok(target) = std::env::var("TARGET") {
        println!("cargo:rustc-env=MLP_BUILD_TARGET={target}");
    }
    println!("cargo:rerun-if-env-changed=MLP_PIE");
    let pie = std::env::var("MLP_PIE").is_ok_and(|v| v == "1");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    // musl (the static release binary) gets the same from `-C relocation-model=static` in
    // .cargo/config.toml: rustc then links it with musl's non-PIE start file, which `-no-pie`
    // alone would not change (the static-PIE start file relocates a binary that is not PIE, and
    // crashes).
    let gnu = std::env::var("CARGO_CFG_TARGET_ENV").is_ok_and(|env| env == "gnu");
    if linux && gnu && !pie {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
    if linux && gnu {
        static_libgcc();
    }
}

/// Link GCC's unwinder statically (`libgcc_eh.a`) instead of loading `libgcc_s.so.1` at every
/// start. Rust's std asks for `-lgcc_s` on linux-gnu unless the whole binary is static; a linker
/// script of that name in a directory searched first points the request at `libgcc_eh` (what
/// `gcc -static-libgcc` does for C programs). The shared library costs each process its
/// loading, its relocations and its constructor, which runs `cpuid` for GCC's CPU-feature table
/// that mlp never reads: `cpuid` traps to the hypervisor on a VM (~7 µs each on the build
/// machine). `MLP_SHARED_LIBGCC=1` at build time keeps the shared library.
fn static_libgcc() {
    println!("cargo:rerun-if-env-changed=MLP_SHARED_LIBGCC");
    if std::env::var("MLP_SHARED_LIBGCC").is_ok_and(|v| v == "1") {
        return;
    }
    let Some(out) = std::env::var_os("OUT_DIR") else { return };
    let dir = std::path::Path::new(&out).join("static-libgcc");
    let script = dir.join("libgcc_s.so");
    if std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&script, "INPUT(-lgcc_eh)\n")).is_err() {
        println!("cargo:warning=could not write {}; linking the shared libgcc_s", script.display());
        return;
    }
    println!("cargo:rustc-link-search=native={}", dir.display());
}
