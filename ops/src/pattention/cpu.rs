//! The fused CPU Pattention: rows in blocks that stay in cache, each block through the scores,
//! Θ and the value product (forward) or Θ, g_S, g_A and g_X (backward) in turn, on the packed
//! GEMM with K and V packed once per call and shared by the blocks.
//!
//! The backward pass walks the rows in chunks of a few hundred. Each chunk's blocks leave S and
//! g_A in a chunk-sized workspace, and the two sums over rows, g_V = Sᵀ·g_O and g_K = g_Aᵀ·X,
//! then continue their chains with that chunk's rows. Compared with S and g_A built for all
//! rows and summed at the end, that keeps them in cache between being written and read, and
//! never allocates two [rows, n] arrays. The two phases of a chunk run one after the other,
//! each on all threads. Running a chunk's sums beside the next chunk's blocks, with two
//! workspaces used in turn, was slower (the Pattention backward passes of a `tiny` step at
//! 16 × 256 took 118-122 ms that way against 113-115 ms, on two Zen 4 cores with AVX2).
//! The chunks run in row order, so every element of g_V and g_K is still one FMA chain over
//! the rows in order: the bits of the plain product.
//!
//! Outputs are not zero-filled before the kernels overwrite them: the GEMM writes into
//! uninitialised blocks directly, and the backward pass's workspace is kept between calls,
//! where a `vec![0.0; _]` would be one more serial pass over memory (several MB per call).

use crate::cpu_tensor;
use crate::matmul::packed::{self, gemm_rows, pack_b, Isa, PackedB, View};
use crate::pattention_norm::cpu::{forward_backward_rows, forward_rows};
use crate::pattention_norm::Theta;
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;
use tokenformer_core::{Result, Tensor};

/// Rows per block: the first multiple of the GEMM tile's height (MR) from 24 on (24 for the
/// tiles of 6 and 8 rows), so that no block ends in a partial tile, small enough that
/// the blocks share out evenly between threads (512 rows make 22 blocks) and that a
/// block's [rows, n] arrays stay in a core's L2 cache.
fn block_rows(isa: Isa) -> usize {
    24usize.next_multiple_of(isa.blocking().mr)
}

/// Rows per chunk of the backward pass: 16 blocks, enough to share out between threads.
fn chunk_rows(isa: Isa) -> usize {
    16 * block_rows(isa)
}

/// Below this many multiply-adds the blocks run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;

thread_local! {
    /// Per-thread scratch, kept between calls: one block of S in the forward pass, the chunk
    /// workspace of S and g_A (2 · chunk_rows · n values) on the thread that runs a backward.
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

/// An output buffer of `len` floats that is filled block by block: [`Self::blocks`] hands out
/// its parts uninitialised, the kernels write every value of every part, and [`Self::finish`]
/// gives the buffer once all of them have.
struct BlockOutput {
    data: Vec<f32>,
    len: usize,
}

impl BlockOutput {
    fn new(len: usize) -> BlockOutput {
        BlockOutput { data: Vec::with_capacity(len), len }
    }

    /// The buffer in parts of `part` floats (the last one shorter).
    fn blocks(&mut self, part: usize) -> std::slice::ChunksMut<'_, MaybeUninit<f32>> {
        self.data.spare_capacity_mut()[..self.len].chunks_mut(part.max(1))
    }

    /// # Safety
    /// Every value of every part handed out by one call of [`Self::blocks`] was written.
    unsafe fn finish(mut self) -> Vec<f32> {
        // SAFETY: the caller vouches that all `len` values were initialised.
        unsafe { self.data.set_len(self.len) };
        self.data
    }
}

/// `part` as the floats it holds.
///
/// # Safety
/// Every element of `part` was written.
unsafe fn written(part: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and the caller vouches for the values.
    unsafe { &mut *(part as *mut [MaybeUninit<f32>] as *mut [f32]) }
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
    let mut scores = BlockOutput::new(rows * n);
    let mut out = BlockOutput::new(rows * d_out);
    let block = block_rows(isa);
    let blocks: Vec<_> = scores.blocks(block * n).zip(out.blocks(block * d_out)).collect();
    let x_view = View::new(xs, d_in, rows, false);
    for_each_block(blocks, rows * n * (d_in + d_out), |i, (a_block, o_block)| {
        let block_rows = a_block.len() / n;
        gemm_rows(x_view.rows_from(i * block), block_rows, &keys_t, a_block, n, false);
        // SAFETY: the product wrote all block_rows × n scores (its row stride is n).
        let a_block = unsafe { written(a_block) };
        with_scratch(block_rows * n, |s| {
            forward_rows(theta, tau, n, a_block, s);
            gemm_rows(View::new(s, n, block_rows, false), block_rows, &vals, o_block, d_out, false);
        });
    });
    // SAFETY: `for_each_block` ran on every part of both buffers, and the products wrote each
    // whole (row stride n, d_out).
    let (scores, out) = unsafe { (scores.finish(), out.finish()) };
    Ok((cpu_tensor(out, &super::with_last(x, d_out)), cpu_tensor(scores, &super::with_last(x, n))))
}

/// What the blocks of a backward pass read: the operands and Vᵀ and K, packed.
struct Backward<'a> {
    theta: Theta,
    tau: f32,
    x: &'a [f32],
    scores: &'a [f32],
    g_out: &'a [f32],
    vals_t: PackedB<'a>,
    keys: PackedB<'a>,
    n: usize,
    d_in: usize,
    d_out: usize,
    /// Rows per block and per chunk ([`block_rows`], [`chunk_rows`]).
    block_rows: usize,
    chunk_rows: usize,
}

impl Backward<'_> {
    /// For the rows first.. of one chunk: S and g_A into `weights` and `g_scores` (the halves
    /// of the chunk's workspace) and g_X into `g_x`, block by block.
    fn chunk_blocks(
        &self,
        first: usize,
        weights: &mut [f32],
        g_scores: &mut [f32],
        g_x: &mut [MaybeUninit<f32>],
    ) {
        let (n, d_in, d_out) = (self.n, self.d_in, self.d_out);
        let rows = g_x.len() / d_in;
        let block = self.block_rows;
        let blocks: Vec<_> = weights[..rows * n]
            .chunks_mut(block * n)
            .zip(g_scores[..rows * n].chunks_mut(block * n))
            .zip(g_x.chunks_mut(block * d_in))
            .collect();
        for_each_block(blocks, rows * n * (d_in + d_out), |i, ((s_block, ga_block), gx_block)| {
            let block_rows = s_block.len() / n;
            let block_first = first + i * block;
            let a_block = &self.scores[block_first * n..][..block_rows * n];
            let g_block = View::new(self.g_out, d_out, block_first + block_rows, false);
            // g_S = g_O·Vᵀ; then S = Θ(A) and, in place, g_A by Θ's backward rule; g_X = g_A·K.
            gemm_rows(g_block.rows_from(block_first), block_rows, &self.vals_t, ga_block, n, false);
            forward_backward_rows(self.theta, self.tau, n, a_block, s_block, ga_block);
            let ga_view = View::new(ga_block, n, block_rows, false);
            gemm_rows(ga_view, block_rows, &self.keys, gx_block, d_in, false);
        });
    }

    /// g_V += Sᵀ·g_O and g_K += g_Aᵀ·X over the `rows` rows first.. of one chunk (`=` for the
    /// first chunk), from the chunk's S and g_A.
    #[allow(clippy::too_many_arguments)]
    fn chunk_sums(
        &self,
        isa: Isa,
        first: usize,
        rows: usize,
        weights: &[f32],
        g_scores: &[f32],
        g_values: &mut [f32],
        g_keys: &mut [f32],
    ) {
        let (n, d_in, d_out) = (self.n, self.d_in, self.d_out);
        let s_t = View::new(&weights[..rows * n], rows, n, true);
        let ga_t = View::new(&g_scores[..rows * n], rows, n, true);
        let g_chunk = View::new(&self.g_out[first * d_out..], d_out, rows, false);
        let x_chunk = View::new(&self.x[first * d_in..], d_in, rows, false);
        let more = first > 0;
        rayon::join(
            || packed::gemm(isa, s_t, g_chunk, n, rows, d_out, g_values, more),
            || packed::gemm(isa, ga_t, x_chunk, n, rows, d_in, g_keys, more),
        );
    }
    /// The pass over all `rows` rows, chunk by chunk: each chunk's blocks write its S and g_A
    /// into `work` (and its g_X into `g_x_chunks`), then its rows are added to the sums in
    /// `g_values` and `g_keys`.
    fn chunks(
        &self,
        isa: Isa,
        rows: usize,
        work: &mut [f32],
        g_x_chunks: Vec<&mut [MaybeUninit<f32>]>,
        g_values: &mut [f32],
        g_keys: &mut [f32],
    ) {
        let (weights, g_scores) = work.split_at_mut(work.len() / 2);
        for (c, g_x_chunk) in g_x_chunks.into_iter().enumerate() {
            let first = c * self.chunk_rows;
            let rows_c = self.chunk_rows.min(rows - first);
            self.chunk_blocks(first, weights, g_scores, g_x_chunk);
            self.chunk_sums(isa, first, rows_c, weights, g_scores, g_values, g_keys);
        }
    }
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
    let (n, d_in, d_out) = (keys.dims()[0], keys.dims()[1], values.dims()[1]);
    let rows = xs.len() / d_in;
    let bw = Backward {
        theta,
        tau,
        x: xs,
        scores: scores.cpu_slice(op)?,
        g_out: g_out.cpu_slice(op)?,
        // Vᵀ [d_out, n] and K [n, d_in], packed once for every block.
        vals_t: pack_b(isa, View::new(vs, n, d_out, true), d_out, n),
        keys: pack_b(isa, View::new(ks, d_in, n, false), n, d_in),
        n,
        d_in,
        d_out,
        block_rows: block_rows(isa),
        chunk_rows: chunk_rows(isa),
    };
    let mut g_x = BlockOutput::new(rows * d_in);
    let mut g_values = vec![0.0f32; n * d_out];
    let mut g_keys = vec![0.0f32; n * d_in];
    // The workspace for S and g_A of a chunk. Every value is written (S by Θ, g_A by the
    // product g_O·Vᵀ) before it is read.
    let chunk_len = bw.chunk_rows.min(rows) * n;
    with_scratch(2 * chunk_len, |work| {
        let g_x_chunks = g_x.blocks(bw.chunk_rows * d_in).collect();
        bw.chunks(isa, rows, work, g_x_chunks, &mut g_values, &mut g_keys)
    });
    // SAFETY: `chunks` ran `chunk_blocks` on every chunk of g_x, whose products wrote each
    // whole (row stride d_in).
    let g_x = unsafe { g_x.finish() };
    Ok((
        cpu_tensor(g_x, x.dims()),
        cpu_tensor(g_keys, keys.dims()),
        cpu_tensor(g_values, values.dims()),
    ))
}
