//! The one run-time switch between the faster kernels and the plain reference paths they
//! replaced and are tested against: the environment variable `TOKENFORMER_FUSED`.
//!
//! The faster versions run by default. `0` selects every plain path, `1` every faster one, and
//! a comma-separated list sets ops one by one, as in `attention:0` or `0,matmul:1`; an op the
//! list does not name follows a bare `0` or `1` in the list, or is on. So one run can time both
//! versions of an op on the same device, and a faster kernel that misbehaves on some machine
//! never blocks the rest. The variable is read once per process.
//!
//! | op | device | faster (on) | plain (off) |
//! |---|---|---|---|
//! | `attention` | CPU, CUDA | one fused kernel: row tiles, online softmax, no T×T matrix | two matmuls around a causal softmax |
//! | `pattention` | CPU | the layer fused over blocks of rows | two matmuls and Θ |
//! | `matmul` | CPU | the packed AVX-512 or AVX2 GEMM (the fused Pattention is built on it) | the reference GEMM (matrixmultiply) |
//! | `softmax` | CUDA | rows read once for their max and sum, blocks fitted to the row | three passes over a row, 256-thread blocks |
//! | `cross_entropy` | CUDA | as `softmax` | as `softmax` |
//! | `layer_norm` | CUDA | blocks fitted to the row; weight and bias gradients in one two-level pass | 256-thread blocks, a kernel per feature and a column sum |
//! | `reduce` | CUDA | two-level column sums | one thread per column |
//! | `adamw` | CUDA | multi-tensor clipping and AdamW in a handful of launches | one tensor at a time |
//!
//! Each pair gives the same values up to rounding, and `pattention` the same bits, and is tested
//! that way.

use std::sync::OnceLock;
use tokenformer_core::{Error, Result};

/// The name of the variable.
pub const VAR: &str = "TOKENFORMER_FUSED";

/// The ops the switch sets, by the name it uses.
pub const OPS: &[&str] = &[
    "attention",
    "pattention",
    "matmul",
    "softmax",
    "cross_entropy",
    "layer_norm",
    "reduce",
    "adamw",
];

/// Whether `op` runs its faster version in this process (the variable is read once).
pub fn enabled(op: &str) -> Result<bool> {
    static SPEC: OnceLock<Option<String>> = OnceLock::new();
    let spec = SPEC.get_or_init(|| std::env::var(VAR).ok());
    match spec {
        Some(spec) => parse(spec, op),
        None => Ok(true),
    }
}

/// Whether `spec` (a value of the variable) turns `op` on, or an error naming what it cannot
/// read.
pub fn parse(spec: &str, op: &str) -> Result<bool> {
    let bad = |why: String| {
        Error::invalid(format!(
            "{VAR}={spec:?}: {why} (expected 0, 1 or a list like attention:0; ops: {})",
            OPS.join(", ")
        ))
    };
    let switch = |value: &str| match value.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(bad(format!("{other:?} is not 0 or 1"))),
    };
    let (mut default, mut this_op) = (true, None);
    for item in spec.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        match item.split_once(':') {
            Some((name, value)) => {
                let name = name.trim();
                if !OPS.contains(&name) {
                    return Err(bad(format!("no fused op is called {name:?}")));
                }
                let on = switch(value)?;
                if name == op {
                    this_op = Some(on);
                }
            }
            None => default = switch(item)?,
        }
    }
    Ok(this_op.unwrap_or(default))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_turn_ops_on_and_off() {
        for (spec, on) in [
            ("", true),
            ("1", true),
            ("0", false),
            (" 0 ", false),
            ("attention:0", false),
            ("attention:1", true),
            ("0,attention:1", true),
            ("attention:1, 0", true),
            ("1,attention:0", false),
        ] {
            assert_eq!(parse(spec, "attention").unwrap(), on, "{spec:?}");
        }
    }

    #[test]
    fn every_op_can_be_set_alone() {
        for &op in OPS {
            let alone = format!("{op}:0");
            assert!(!parse(&alone, op).unwrap(), "{alone}");
            for &other in OPS.iter().filter(|&&o| o != op) {
                assert!(parse(&alone, other).unwrap(), "{alone} turns {other} off");
                assert!(!parse("0", other).unwrap());
            }
        }
        assert!(parse("0,matmul:1", "matmul").unwrap() && !parse("0,matmul:1", "adamw").unwrap());
    }

    #[test]
    fn unreadable_values_are_errors_that_say_what_is_expected() {
        for spec in ["yes", "attention", "attention:2", "atention:0", "2"] {
            let err = parse(spec, "attention").unwrap_err().to_string();
            assert!(err.contains(VAR) && err.contains("expected 0, 1"), "{spec}: {err}");
        }
    }
}
