//! The CUDA C kernel files of the crate, as embedded in the binary.
//!
//! The list is made by the build script from every `.cu` file under `src/`, so a new kernel
//! file is registered by existing. Each entry's source is `common.cuh` followed by the file:
//! NVRTC compiles one string, not a tree of files, so the shared helpers (block reductions,
//! GELU, the `Dims` struct) come first in every module. A family's cuda.rs names its module with
//! `kernels::source("family")`, checked at compile time.

/// One kernel file: the module name kernels are launched under, its path under `ops/src`, and
/// the complete source NVRTC compiles.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub module: &'static str,
    pub file: &'static str,
    pub source: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The kernel file registered as `module`; a name that is not registered fails the build when
/// used in a constant.
pub const fn source(module: &str) -> &'static KernelSource {
    let mut i = 0;
    while i < ALL.len() {
        if same(ALL[i].module, module) {
            return &ALL[i];
        }
        i += 1;
    }
    panic!("no kernel file is registered under this module name")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_with_kernels_is_registered_once() {
        for module in [
            "adamw",
            "attention",
            "binary",
            "cross_entropy",
            "embedding",
            "layer_norm",
            "layout",
            "pattention_norm",
            "reduce",
            "rope",
            "softmax",
            "unary",
        ] {
            let k = source(module);
            assert!(k.file.ends_with(".cu"), "{module}: {}", k.file);
            assert!(k.source.contains("__global__"), "{module} has no kernel");
            assert_eq!(ALL.iter().filter(|k| k.module == module).count(), 1, "{module}");
        }
        assert!(ALL.iter().all(|k| k.source.starts_with(include_str!("common.cuh"))));
    }

    #[test]
    fn the_header_and_the_host_agree_on_max_rank() {
        let define = format!("#define MAX_RANK {}\n", tokenformer_core::cuda::MAX_RANK);
        assert!(include_str!("common.cuh").contains(&define), "common.cuh lacks {define:?}");
    }
}
