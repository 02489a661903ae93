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
    println!("cargo:rerun-if-env-changed=MLP_PIE");
    let pie = std::env::var("MLP_PIE").is_ok_and(|v| v == "1");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    if linux && !pie {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
