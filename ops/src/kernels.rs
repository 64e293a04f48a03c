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

/// The value of the line `#define OP_<NAME> <code>` in `k`'s source, `NAME` being `op` in
/// capitals: how an op code shared by a family's host code and its kernels is written once, in
/// the kernel file. Meant for constants, so that a missing line fails the build.
pub const fn op_code(k: &KernelSource, op: &str) -> i32 {
    const DEFINE: &[u8] = b"#define OP_";
    let (src, op) = (k.source.as_bytes(), op.as_bytes());
    let mut start = 0;
    while start + DEFINE.len() + op.len() < src.len() {
        let mut matches = start == 0 || src[start - 1] == b'\n';
        let mut i = 0;
        while matches && i < DEFINE.len() {
            matches = src[start + i] == DEFINE[i];
            i += 1;
        }
        let mut j = 0;
        while matches && j < op.len() {
            matches = src[start + DEFINE.len() + j] == op[j].to_ascii_uppercase();
            j += 1;
        }
        let mut at = start + DEFINE.len() + op.len();
        if matches && src[at] == b' ' {
            while at < src.len() && src[at] == b' ' {
                at += 1;
            }
            let (mut code, mut digits) = (0i32, 0);
            while at < src.len() && src[at].is_ascii_digit() {
                code = code * 10 + (src[at] - b'0') as i32;
                at += 1;
                digits += 1;
            }
            if digits > 0 {
                return code;
            }
        }
        start += 1;
    }
    panic!("the kernel file has no `#define OP_<NAME> <code>` line for this op")
}

/// Checks that a family's op table (`names`, in declaration order) and its kernel file define
/// the same ops, each with its own code: a `#define OP_` line the table lacks would be a kernel
/// case the host can never reach.
#[cfg(test)]
pub(crate) fn check_op_table(module: &str, names: &[&str]) {
    let k = source(module);
    let defined = k.source.lines().filter(|line| line.starts_with("#define OP_")).count();
    assert_eq!(
        defined,
        names.len(),
        "{}: {defined} op codes, {} ops in the table",
        k.file,
        names.len()
    );
    let mut codes: Vec<i32> = names.iter().map(|name| op_code(k, name)).collect();
    codes.sort_unstable();
    codes.dedup();
    assert_eq!(codes.len(), names.len(), "{}: two ops share a code", k.file);
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
    fn op_codes_are_read_from_their_define_lines() {
        let k = KernelSource {
            module: "m",
            file: "m.cu",
            source: "#define OP_EXPM1 7\n// #define OP_EXP 9\n#define OP_EXP  12\n",
        };
        assert_eq!(op_code(&k, "exp"), 12);
        assert_eq!(op_code(&k, "expm1"), 7);
        let missing = std::panic::catch_unwind(|| op_code(&k, "log"));
        assert!(missing.is_err(), "an op without a define line must not get a code");
    }

    #[test]
    fn the_header_and_the_host_agree_on_max_rank() {
        let define = format!("#define MAX_RANK {}\n", tokenformer_core::cuda::MAX_RANK);
        assert!(include_str!("common.cuh").contains(&define), "common.cuh lacks {define:?}");
    }
}
