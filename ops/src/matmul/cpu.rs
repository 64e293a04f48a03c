//! CPU matmul. Two implementations of the same product:
//!
//! - the fast path, `packed.rs`: our register-tile kernel (AVX-512 or AVX2 + FMA, picked at run
//!   time), in which every output element is one chain of fused multiply-adds in index order;
//! - the reference, below: matrixmultiply's GEMM (through ndarray's `general_mat_mul`) on views
//!   of the row-major slices, transposes taken as strided views. It is what the fast path is
//!   tested against, and what runs on processors without AVX2 and FMA.
//!
//! Either way work is split across rayon threads by batch entry, or, for a single product, by
//! blocks of output rows; the split depends only on the shapes, and every output element is
//! computed by one thread in the same way whatever the split, so results do not depend on the
//! thread count.

use super::packed::{self, View};
use super::plan;
use crate::cpu_tensor;
use ndarray::linalg::general_mat_mul;
use ndarray::{s, ArrayView2, ArrayViewMut2};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use tokenformer_core::{Error, Result, Tensor};

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

pub(crate) fn matmul(a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    match packed::isa()? {
        Some(isa) => fast_matmul(isa, a, b, trans_a, trans_b),
        None => reference_matmul(a, b, trans_a, trans_b),
    }
}

/// The product on the packed kernel: B prepared once per product, rows of C in parallel blocks.
fn fast_matmul(
    isa: packed::Isa,
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> Result<Tensor> {
    let p = plan("matmul", a, b, trans_a, trans_b)?;
    let (a_data, b_data) = (a.cpu_slice("matmul")?, b.cpu_slice("matmul")?);
    let (m, k, n) = (p.m, p.k, p.n);
    let len = p.batch * m * n;
    if len == 0 || k == 0 {
        return Ok(cpu_tensor(vec![0.0; len], &p.out_dims));
    }
    // Not zero-filled first: the products write every value (row stride n).
    let mut out = Vec::with_capacity(len);
    let c = &mut out.spare_capacity_mut()[..len];
    if p.batch == 1 || (p.b_shared && !trans_a) {
        // One product; a shared B lets A's batch fold into its rows.
        let rows = p.batch * m;
        let a_view = View::new(a_data, k, rows, trans_a);
        let b_view = View::new(b_data, n, k, trans_b);
        packed::gemm(isa, a_view, b_view, rows, k, n, c, false);
    } else {
        let a_stride = if p.a_shared { 0 } else { m * k };
        let b_stride = if p.b_shared { 0 } else { k * n };
        let product = |(i, c): (usize, &mut [MaybeUninit<f32>])| {
            let a_view = View::new(&a_data[i * a_stride..][..m * k], k, m, trans_a);
            let b_view = View::new(&b_data[i * b_stride..][..k * n], n, k, trans_b);
            let packed_b = packed::pack_b(isa, b_view, k, n);
            packed::gemm_rows(a_view, m, &packed_b, c, n, false);
        };
        if p.batch * m * k * n >= PARALLEL_MIN_MACS {
            c.par_chunks_mut(m * n).enumerate().for_each(product);
        } else {
            c.chunks_mut(m * n).enumerate().for_each(product);
        }
    }
    // SAFETY: the products above wrote all `len` values.
    unsafe { out.set_len(len) };
    Ok(cpu_tensor(out, &p.out_dims))
}

/// The reference product, on matrixmultiply.
pub(crate) fn reference_matmul(
    a: &Tensor,
    b: &Tensor,
    trans_a: bool,
    trans_b: bool,
) -> Result<Tensor> {
    let p = plan("matmul", a, b, trans_a, trans_b)?;
    let (a_data, b_data) = (a.cpu_slice("matmul")?, b.cpu_slice("matmul")?);
    let (m, k, n) = (p.m, p.k, p.n);
    let mut out = vec![0.0f32; p.batch * m * n];
    if out.is_empty() || k == 0 {
        return Ok(cpu_tensor(out, &p.out_dims));
    }
    if p.batch == 1 || (p.b_shared && !trans_a) {
        // One product; a shared B lets A's batch fold into its rows.
        let rows = p.batch * m;
        let a_view = matrix_view(a_data, rows, k, trans_a)?;
        let b_view = matrix_view(b_data, k, n, trans_b)?;
        gemm_row_blocks(&a_view, &b_view, &mut out, n)?;
    } else {
        let a_stride = if p.a_shared { 0 } else { m * k };
        let b_stride = if p.b_shared { 0 } else { k * n };
        let product = |(i, c): (usize, &mut [f32])| -> Result<()> {
            let a_view = matrix_view(&a_data[i * a_stride..][..m * k], m, k, trans_a)?;
            let b_view = matrix_view(&b_data[i * b_stride..][..k * n], k, n, trans_b)?;
            gemm(&a_view, &b_view, c, n)
        };
        if p.batch * m * k * n >= PARALLEL_MIN_MACS {
            out.par_chunks_mut(m * n).enumerate().try_for_each(product)?;
        } else {
            out.chunks_mut(m * n).enumerate().try_for_each(product)?;
        }
    }
    Ok(cpu_tensor(out, &p.out_dims))
}

/// The logical (rows × cols) matrix held in `data`, stored transposed when `transposed`.
fn matrix_view(
    data: &[f32],
    rows: usize,
    cols: usize,
    transposed: bool,
) -> Result<ArrayView2<'_, f32>> {
    let view = if transposed {
        ArrayView2::from_shape((cols, rows), data).map(|v| v.reversed_axes())
    } else {
        ArrayView2::from_shape((rows, cols), data)
    };
    view.map_err(|e| {
        Error::shape("matmul", format!("cannot view {} values as {rows}x{cols}: {e}", data.len()))
    })
}

/// c = a·b for one product, into the row-major slice `c` with `n` columns.
fn gemm(a: &ArrayView2<'_, f32>, b: &ArrayView2<'_, f32>, c: &mut [f32], n: usize) -> Result<()> {
    let rows = c.len() / n;
    let mut c_view = ArrayViewMut2::from_shape((rows, n), c).map_err(|e| {
        Error::shape("matmul", format!("cannot view the output as {rows}x{n}: {e}"))
    })?;
    general_mat_mul(1.0, a, b, 0.0, &mut c_view);
    Ok(())
}

/// c = a·b with the rows of c split into blocks computed in parallel. The number of blocks
/// depends only on the row count, never on the thread count.
fn gemm_row_blocks(
    a: &ArrayView2<'_, f32>,
    b: &ArrayView2<'_, f32>,
    c: &mut [f32],
    n: usize,
) -> Result<()> {
    let (rows, k) = a.dim();
    if rows * k * n < PARALLEL_MIN_MACS {
        return gemm(a, b, c, n);
    }
    let blocks = (rows / 64).clamp(1, 16);
    let rows_per_block = rows.div_ceil(blocks);
    c.par_chunks_mut(rows_per_block * n).enumerate().try_for_each(|(i, c_block)| {
        let first = i * rows_per_block;
        let a_block = a.slice(s![first..first + c_block.len() / n, ..]);
        gemm(&a_block, b, c_block, n)
    })
}
