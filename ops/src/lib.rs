//! Kernels without a graph. Each op family lives in one folder: `mod.rs` states the math
//! (forward formula and backward derivation), validates its operands and dispatches on the
//! device; `cpu.rs` is the reference kernel; `cuda.rs` and `kernels.cu` are the GPU version.
//!
//! Every CPU kernel is deterministic: each output element is computed by one thread with a
//! fixed summation order, so results do not depend on the number of threads. Reductions over a
//! row run left to right or in the fixed lanes of `lanes.rs`; either way appending exact zeros
//! to a row never changes the result (this is what makes growing a Pattention layer
//! output-preserving).
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
mod lanes;
pub mod layer_norm;
pub mod layout;
pub mod matmul;
pub mod pattention;
pub mod pattention_norm;
pub mod processor;
pub mod reduce;
pub mod rope;
pub mod softmax;
pub mod unary;
mod vector;

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

/// A new vector of `len` floats whose rows of `row_len` values are each written by one call
/// `f(row_index, row)`, split as in [`for_each_row_mut`]. Nothing is zero-filled first: a
/// `vec![0.0; len]` is one more pass over memory, on the calling thread alone.
///
/// # Safety
/// `f` writes every element of each row it is given (and `len` is a multiple of `row_len`,
/// or 0).
pub(crate) unsafe fn rows_written<F>(len: usize, row_len: usize, f: F) -> Vec<f32>
where
    F: Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync + Send,
{
    let mut out = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    let spare = &mut out.spare_capacity_mut()[..len];
    if len >= PARALLEL_MIN_ELEMS {
        use rayon::prelude::*;
        let rows_per_task = (4096 / row_len).max(1);
        spare
            .par_chunks_mut(row_len)
            .with_min_len(rows_per_task)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    } else {
        spare.chunks_mut(row_len).enumerate().for_each(|(i, row)| f(i, row));
    }
    // SAFETY: the rows cover all `len` values, and the caller vouches that `f` wrote each.
    unsafe { out.set_len(len) };
    out
}

/// Zeroes `part` and returns it as floats: an output handed to parallel tasks uninitialised,
/// each task zeroing its own part while it is in cache, costs no serial pass over memory
/// before the tasks start.
pub(crate) fn zeroed(part: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    part.fill(std::mem::MaybeUninit::new(0.0));
    // SAFETY: every element was just initialised, and MaybeUninit<f32> has f32's layout.
    unsafe { &mut *(part as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// Elements per parallel task of [`map1`] and [`map2`]: enough work to outweigh a task's cost,
/// few enough that a few hundred thousand elements still split across the threads.
const MAP_CHUNK: usize = 8192;

/// `f` applied to every element, in parallel when the work is large.
///
/// The elements go through plain slice loops compiled for the widest vector unit the processor
/// has (see [`wide_loops`]): GELU alone took almost half of a Transformer's CPU step when each
/// element went through rayon's iterator one at a time. Every element is computed by the same
/// scalar formula whatever the width, so the bits do not depend on the processor or the
/// thread count.
pub(crate) fn map1(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    use rayon::prelude::*;
    let n = x.len();
    let mut out = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    if n >= PARALLEL_MIN_ELEMS {
        spare
            .par_chunks_mut(MAP_CHUNK)
            .zip(x.par_chunks(MAP_CHUNK))
            .for_each(|(out, x)| wide_loops::map1(x, out, &f));
    } else {
        wide_loops::map1(x, spare, &f);
    }
    // SAFETY: the loops wrote each of the n elements (the chunks of `spare` and `x` pair up
    // one to one, with equal lengths).
    unsafe { out.set_len(n) };
    out
}

/// `f` applied to every pair of elements of two equally long slices (see [`map1`]).
///
/// # Panics
/// If the slices differ in length (callers check the shapes first).
pub(crate) fn map2(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    use rayon::prelude::*;
    let n = x.len();
    assert_eq!(n, y.len(), "map2 over slices of different lengths");
    let mut out = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    if n >= PARALLEL_MIN_ELEMS {
        spare
            .par_chunks_mut(MAP_CHUNK)
            .zip(x.par_chunks(MAP_CHUNK).zip(y.par_chunks(MAP_CHUNK)))
            .for_each(|(out, (x, y))| wide_loops::map2(x, y, out, &f));
    } else {
        wide_loops::map2(x, y, spare, &f);
    }
    // SAFETY: as in `map1`; x and y have n elements each.
    unsafe { out.set_len(n) };
    out
}

/// The element loops of [`map1`] and [`map2`], compiled a second time for AVX-512 and AVX2
/// (each with FMA) and picked at run time. Rust never contracts a·b + c into a fused
/// multiply-add by itself, and an explicit `mul_add` rounds once in every variant (an FMA
/// instruction, or the library's correctly rounded `fmaf`), so every variant computes the same
/// bits; only the width of the registers differs.
pub(crate) mod wide_loops {
    use std::mem::MaybeUninit;
    #[inline(always)]
    fn map1_plain<F: Fn(f32) -> f32>(x: &[f32], out: &mut [MaybeUninit<f32>], f: &F) {
        for (o, &a) in out.iter_mut().zip(x) {
            o.write(f(a));
        }
    }

    #[inline(always)]
    fn map2_plain<F: Fn(f32, f32) -> f32>(
        x: &[f32],
        y: &[f32],
        out: &mut [MaybeUninit<f32>],
        f: &F,
    ) {
        for ((o, &a), &b) in out.iter_mut().zip(x).zip(y) {
            o.write(f(a, b));
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::mem::MaybeUninit;
        #[target_feature(enable = "avx512f,fma")]
        pub(super) unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx512f,fma")]
        pub(super) unsafe fn map1_avx512<F: Fn(f32) -> f32>(
            x: &[f32],
            out: &mut [MaybeUninit<f32>],
            f: &F,
        ) {
            super::map1_plain(x, out, f)
        }
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn map1_avx2<F: Fn(f32) -> f32>(
            x: &[f32],
            out: &mut [MaybeUninit<f32>],
            f: &F,
        ) {
            super::map1_plain(x, out, f)
        }
        #[target_feature(enable = "avx512f,fma")]
        pub(super) unsafe fn map2_avx512<F: Fn(f32, f32) -> f32>(
            x: &[f32],
            y: &[f32],
            out: &mut [MaybeUninit<f32>],
            f: &F,
        ) {
            super::map2_plain(x, y, out, f)
        }
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn map2_avx2<F: Fn(f32, f32) -> f32>(
            x: &[f32],
            y: &[f32],
            out: &mut [MaybeUninit<f32>],
            f: &F,
        ) {
            super::map2_plain(x, y, out, f)
        }
    }

    /// Which compiled copy of the element and row loops this processor runs: the AVX-512 or
    /// AVX2 copy, each with FMA, or the plain one. One choice for every family that keeps such
    /// copies (these maps, Θ, layer norm, cross-entropy).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Width {
        #[cfg(target_arch = "x86_64")]
        Avx512,
        #[cfg(target_arch = "x86_64")]
        Avx2,
        Plain,
    }

    /// The widest copy this processor can run (held to `TOKENFORMER_CPU_ISA` where set).
    pub(crate) fn width() -> Width {
        match crate::processor::vector_isa() {
            #[cfg(target_arch = "x86_64")]
            crate::processor::VectorIsa::Avx512 => Width::Avx512,
            #[cfg(target_arch = "x86_64")]
            crate::processor::VectorIsa::Avx2 => Width::Avx2,
            _ => Width::Plain,
        }
    }

    /// Runs `f`, inlined into a copy compiled for the widest vector unit the processor has:
    /// for element loops that are not a plain map (the AdamW update, for one).
    #[inline(always)]
    pub(crate) fn widest<R>(f: impl FnOnce() -> R) -> R {
        match width() {
            // SAFETY: `width()` picks each variant only where the processor has its instructions.
            #[cfg(target_arch = "x86_64")]
            Width::Avx512 => unsafe { x86::run_avx512(f) },
            #[cfg(target_arch = "x86_64")]
            Width::Avx2 => unsafe { x86::run_avx2(f) },
            Width::Plain => f(),
        }
    }

    pub(crate) fn map1<F: Fn(f32) -> f32>(x: &[f32], out: &mut [MaybeUninit<f32>], f: &F) {
        match width() {
            // SAFETY: `width()` picks each variant only where the processor has its instructions.
            #[cfg(target_arch = "x86_64")]
            Width::Avx512 => unsafe { x86::map1_avx512(x, out, f) },
            #[cfg(target_arch = "x86_64")]
            Width::Avx2 => unsafe { x86::map1_avx2(x, out, f) },
            Width::Plain => map1_plain(x, out, f),
        }
    }

    pub(crate) fn map2<F: Fn(f32, f32) -> f32>(
        x: &[f32],
        y: &[f32],
        out: &mut [MaybeUninit<f32>],
        f: &F,
    ) {
        match width() {
            // SAFETY: `width()` picks each variant only where the processor has its instructions.
            #[cfg(target_arch = "x86_64")]
            Width::Avx512 => unsafe { x86::map2_avx512(x, y, out, f) },
            #[cfg(target_arch = "x86_64")]
            Width::Avx2 => unsafe { x86::map2_avx2(x, y, out, f) },
            Width::Plain => map2_plain(x, y, out, f),
        }
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

    /// Sizes that take the parallel path with a partial last chunk, and the empty slice: every
    /// element is written, and is `f` of its input.
    #[test]
    fn the_maps_write_every_element_at_every_size() {
        for n in [super::PARALLEL_MIN_ELEMS + 3 * super::MAP_CHUNK + 37, 1000, 0] {
            let x = crate::testing::values(&randn(&[n], 5));
            let y = crate::testing::values(&randn(&[n], 6));
            let f = |a: f32| crate::unary::cpu::gelu(a) * 3.0 - a;
            let expected1: Vec<f32> = x.iter().map(|&a| f(a)).collect();
            let expected2: Vec<f32> = x.iter().zip(&y).map(|(&a, &b)| a * b - f(b)).collect();
            assert_eq!(super::map1(&x, f), expected1, "map1, n {n}");
            assert_eq!(super::map2(&x, &y, |a, b| a * b - f(b)), expected2, "map2, n {n}");
        }
    }

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
