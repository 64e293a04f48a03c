//! The fused CPU Pattention: rows in blocks that stay in cache, each block through the scores,
//! Θ and the value product (forward) or Θ, g_S, g_A and g_X (backward) in turn, on the packed
//! GEMM with K and V packed once per call and shared by the blocks.

use crate::cpu_tensor;
use crate::matmul::packed::{self, gemm_rows, pack_b, Isa, View};
use crate::pattention_norm::cpu::{forward_backward_rows, forward_rows};
use crate::pattention_norm::Theta;
use rayon::prelude::*;
use std::cell::RefCell;
use tokenformer_core::{Result, Tensor};

/// Rows per block: a multiple of both GEMM tiles' heights (6 and 8), small enough that the
/// blocks share out evenly between threads (512 rows make 22 blocks) and that a block's
/// [rows, n] arrays stay in a core's L2 cache.
const BLOCK_ROWS: usize = 24;

/// Below this many multiply-adds the blocks run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

thread_local! {
    /// Per-thread scratch for one block of S, kept between calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a scratch slice of `len` floats (contents unspecified) owned by this thread.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    // Taken out of the cell, so a nested call on this thread gets its own buffer.
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    SCRATCH.with(|s| {
        let mut cell = s.borrow_mut();
        if cell.len() < buf.len() {
            *cell = buf;
        }
    });
    out
}

/// `f(block_index, ...)` for every block of rows, in parallel when the work is large. The
/// blocks depend only on the shape.
fn for_each_block<T: Send>(items: Vec<T>, macs: usize, f: impl Fn(usize, T) + Sync + Send) {
    if macs >= PARALLEL_MIN_MACS {
        items.into_par_iter().enumerate().for_each(|(i, item)| f(i, item));
    } else {
        items.into_iter().enumerate().for_each(|(i, item)| f(i, item));
    }
}

pub(crate) fn pattention(
    isa: Isa,
    x: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    theta: Theta,
    tau: f32,
    d_out: usize,
) -> Result<(Tensor, Tensor)> {
    let op = "pattention";
    let (xs, ks, vs) = (x.cpu_slice(op)?, keys.cpu_slice(op)?, values.cpu_slice(op)?);
    let (n, d_in) = (keys.dims()[0], keys.dims()[1]);
    let rows = xs.len() / d_in;
    // Kᵀ [d_in, n] and V [n, d_out], packed once for every block.
    let keys_t = pack_b(isa, View::new(ks, n, d_in, true), d_in, n);
    let vals = pack_b(isa, View::new(vs, d_out, n, false), n, d_out);
    let mut scores = vec![0.0f32; rows * n];
    let mut out = vec![0.0f32; rows * d_out];
    let blocks: Vec<_> =
        scores.chunks_mut(BLOCK_ROWS * n).zip(out.chunks_mut(BLOCK_ROWS * d_out)).collect();
    let x_view = View::new(xs, d_in, rows, false);
    for_each_block(blocks, rows * n * (d_in + d_out), |i, (a_block, o_block)| {
        let block_rows = a_block.len() / n;
        gemm_rows(x_view.rows_from(i * BLOCK_ROWS), block_rows, &keys_t, a_block, n, false);
        with_scratch(block_rows * n, |s| {
            forward_rows(theta, tau, n, a_block, s);
            gemm_rows(View::new(s, n, block_rows, false), block_rows, &vals, o_block, d_out, false);
        });
    });
    Ok((cpu_tensor(out, &super::with_last(x, d_out)), cpu_tensor(scores, &super::with_last(x, n))))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn pattention_backward(
    isa: Isa,
    x: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    scores: &Tensor,
    theta: Theta,
    tau: f32,
    g_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "pattention_backward";
    let (xs, ks, vs) = (x.cpu_slice(op)?, keys.cpu_slice(op)?, values.cpu_slice(op)?);
    let (a, g) = (scores.cpu_slice(op)?, g_out.cpu_slice(op)?);
    let (n, d_in, d_out) = (keys.dims()[0], keys.dims()[1], values.dims()[1]);
    let rows = xs.len() / d_in;
    // Vᵀ [d_out, n] and K [n, d_in], packed once for every block.
    let vals_t = pack_b(isa, View::new(vs, n, d_out, true), d_out, n);
    let keys_p = pack_b(isa, View::new(ks, d_in, n, false), n, d_in);
    let mut weights = vec![0.0f32; rows * n];
    let mut g_scores = vec![0.0f32; rows * n];
    let mut g_x = vec![0.0f32; rows * d_in];
    let blocks: Vec<_> = weights
        .chunks_mut(BLOCK_ROWS * n)
        .zip(g_scores.chunks_mut(BLOCK_ROWS * n))
        .zip(g_x.chunks_mut(BLOCK_ROWS * d_in))
        .collect();
    let g_view = View::new(g, d_out, rows, false);
    for_each_block(blocks, rows * n * (d_in + d_out), |i, ((s_block, ga_block), gx_block)| {
        let block_rows = s_block.len() / n;
        let first = i * BLOCK_ROWS;
        let a_block = &a[first * n..][..block_rows * n];
        // g_S = g_O·Vᵀ; then S = Θ(A) and, in place, g_A by Θ's backward rule; g_X = g_A·K.
        gemm_rows(g_view.rows_from(first), block_rows, &vals_t, ga_block, n, false);
        forward_backward_rows(theta, tau, n, a_block, s_block, ga_block);
        gemm_rows(
            View::new(ga_block, n, block_rows, false),
            block_rows,
            &keys_p,
            gx_block,
            d_in,
            false,
        );
    });
    // The two sums over rows: g_V = Sᵀ·g_O and g_K = g_Aᵀ·X.
    let mut g_values = vec![0.0f32; n * d_out];
    let s_t = View::new(&weights, rows, n, true);
    packed::gemm(isa, s_t, g_view, n, rows, d_out, &mut g_values, false);
    drop(weights);
    let mut g_keys = vec![0.0f32; n * d_in];
    let ga_t = View::new(&g_scores, rows, n, true);
    packed::gemm(isa, ga_t, View::new(xs, d_in, rows, false), n, rows, d_in, &mut g_keys, false);
    Ok((
        cpu_tensor(g_x, x.dims()),
        cpu_tensor(g_keys, keys.dims()),
        cpu_tensor(g_values, values.dims()),
    ))
}
