//! Kernels without a graph. Each op family lives in one folder: `mod.rs` states the math
//! (forward formula and backward derivation), validates its operands and dispatches on the
//! device; `cpu.rs` is the reference kernel; `cuda.rs` and `kernels.cu` are the GPU version.
//!
//! Every CPU kernel is deterministic: each output element is computed by one thread with a
//! fixed summation order, so results do not depend on the number of threads. Reductions over a
//! row run left to right, so appending exact zeros to a row never changes the result (this is
//! what makes growing a Pattention layer output-preserving).
//!
//! "SPEC §n" in these comments is section n of `docs/SPEC.md` at the root of the repository:
//! the model, its growth rules and its file formats.

use tokenformer_core::{Device, Error, Result, Shape, Storage, Tensor};

pub mod adamw;
pub mod attention;
pub mod binary;
pub mod cross_entropy;
pub mod embedding;
pub mod fused;
pub mod kernels;
pub mod layer_norm;
pub mod layout;
pub mod matmul;
pub mod pattention;
pub mod pattention_norm;
pub mod reduce;
pub mod rope;
pub mod softmax;
pub mod unary;

/// The device every operand lives on, or `Error::DeviceMismatch` naming `op`.
pub fn same_device(op: &'static str, tensors: &[&Tensor]) -> Result<Device> {
    let Some(first) = tensors.first() else {
        return Err(Error::argument(op, "no operands"));
    };
    let device = first.device();
    for t in &tensors[1..] {
        if t.device() != device {
            return Err(Error::DeviceMismatch {
                op,
                lhs: device.to_string(),
                rhs: t.device().to_string(),
            });
        }
    }
    Ok(device)
}

/// Below this many elements a kernel runs on the calling thread: splitting the work across
/// rayon's pool costs more than it saves.
pub(crate) const PARALLEL_MIN_ELEMS: usize = 32 * 1024;

/// A CPU tensor owning `data`; callers have already checked that the sizes agree.
pub(crate) fn cpu_tensor(data: Vec<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cpu(data), Shape::new(dims))
}

/// Checks that two tensors have the same shape (the usual precondition of a backward).
pub(crate) fn check_same_dims(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(Error::shape(op, format!("shapes {} and {} differ", a.shape(), b.shape())));
    }
    Ok(())
}

/// Splits a tensor of rank >= 1 into (rows, row length) over its last axis.
pub(crate) fn rows_and_len(op: &'static str, x: &Tensor) -> Result<(usize, usize)> {
    match x.dims().split_last() {
        Some((&len, leading)) => Ok((leading.iter().product(), len)),
        None => Err(Error::shape(op, "expected a tensor of rank >= 1, got a scalar".to_string())),
    }
}

/// Checks that every value of `ids` (an f32 tensor of token ids or targets) is an integer in
/// [0, bound), naming the first one that is not.
///
/// Only CPU tensors are checked here. Checking ids that live on a GPU would copy them to the
/// host and make the host wait for the device on every lookup and every loss, inside each
/// training step. So on a GPU, ids are checked where they are made: the trainer, `eval` and
/// `generate` check them on the host before the upload. An invalid id that still reaches a
/// kernel is memory-safe: the embedding writes NaN into that row, the cross-entropy gives a NaN
/// loss and a NaN gradient row, and the embedding's backward pass skips it, so the mistake
/// shows up as a non-finite loss instead of a read out of bounds.
pub(crate) fn check_ids(op: &'static str, ids: &Tensor, bound: usize) -> Result<()> {
    let Some(values) = ids.cpu_data() else {
        return Ok(());
    };
    for (position, &id) in values.iter().enumerate() {
        // Written so that NaN fails the test; `fract` of ±inf is NaN, so it fails too.
        let valid = id >= 0.0 && id.fract() == 0.0 && (id as usize) < bound;
        if !valid {
            return Err(Error::index(
                op,
                format!("id {id} at position {position} is not an integer in [0, {bound})"),
            ));
        }
    }
    Ok(())
}

/// Calls `f(row_index, row)` for every row of `out`, in parallel when the work is large.
/// Each row is written by exactly one call, so the result does not depend on the thread count.
pub(crate) fn for_each_row_mut<F>(out: &mut [f32], row_len: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if row_len == 0 || out.is_empty() {
        return;
    }
    if out.len() >= PARALLEL_MIN_ELEMS {
        use rayon::prelude::*;
        let rows_per_task = (4096 / row_len).max(1);
        out.par_chunks_mut(row_len)
            .with_min_len(rows_per_task)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    } else {
        out.chunks_mut(row_len).enumerate().for_each(|(i, row)| f(i, row));
    }
}

/// `f` applied to every element, in parallel when the work is large.
pub(crate) fn map1(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    use rayon::prelude::*;
    if x.len() >= PARALLEL_MIN_ELEMS {
        x.par_iter().with_min_len(4096).map(|&a| f(a)).collect()
    } else {
        x.iter().map(|&a| f(a)).collect()
    }
}

/// `f` applied to every pair of elements of two equally long slices.
pub(crate) fn map2(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    use rayon::prelude::*;
    if x.len() >= PARALLEL_MIN_ELEMS {
        x.par_iter().zip(y.par_iter()).with_min_len(4096).map(|(&a, &b)| f(a, b)).collect()
    } else {
        x.iter().zip(y).map(|(&a, &b)| f(a, b)).collect()
    }
}

/// Where row `row` of a row-major output (every axis but the last, `outer_dims`) starts in a
/// source read through `outer_strides` (one stride per outer axis, 0 on broadcast axes).
pub(crate) fn strided_row_offset(
    mut row: usize,
    outer_dims: &[usize],
    outer_strides: &[usize],
) -> usize {
    let mut offset = 0;
    for (&dim, &stride) in outer_dims.iter().zip(outer_strides).rev() {
        offset += (row % dim) * stride;
        row /= dim;
    }
    offset
}

pub mod testing;

#[cfg(test)]
mod tests {
    use crate::testing::{randn, tensor};
    use tokenformer_core::Error;

    #[test]
    fn errors_say_what_kind_of_mistake_they_are() {
        let table = randn(&[4, 2], 1);
        let bad_id = crate::embedding::embedding(&table, &tensor(vec![0.0, 4.0], &[2]));
        assert!(matches!(bad_id, Err(Error::Index { op: "embedding", .. })), "{bad_id:?}");
        let bad_tau = crate::pattention_norm::pattention_norm(&table, Default::default(), 0.0);
        assert!(matches!(bad_tau, Err(Error::Argument { op: "pattention_norm", .. })));
        let bad_base = crate::rope::rope_tables(4, 2, -1.0);
        assert!(matches!(bad_base, Err(Error::Argument { op: "rope_tables", .. })));
        assert!(matches!(super::same_device("concat", &[]), Err(Error::Argument { .. })));
        let bad_shape = crate::binary::add(&table, &randn(&[3], 2));
        assert!(matches!(bad_shape, Err(Error::Shape { op: "add", .. })), "{bad_shape:?}");
    }
}
