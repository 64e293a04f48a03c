//! CPU kernel of the fused causal attention (the math is in mod.rs).
//!
//! Work is cut into tiles: `QUERY_TILE` query rows against `KEY_TILE` keys of one head. Every
//! product inside a tile pair is a small matrix product C (+)= A·B computed by a register-blocked
//! kernel (`MR` rows × `NR` columns of C held in registers while the shared dimension streams
//! past), which the compiler turns into AVX2/FMA (or NEON) vector code, or written with
//! AVX-512 registers and twice the rows (one 16-lane register per row of C: each step of the
//! shared dimension does eight 16-lane FMAs from one load of B and eight broadcasts of A, where
//! AVX2 does eight 8-lane FMAs from two loads of B and four broadcasts). On Zen 4, whose 512-bit
//! FMAs take both 256-bit pipes, the two run at the same speed within noise; cores with two
//! full 512-bit FMA units (Intel's server cores) can do twice the FMAs per cycle in the AVX-512
//! one (not measured here). For finite inputs both give the same bits: the taller block only
//! adds masked terms, exact zeros, to its rows' sums (an infinity among the masked values would
//! turn them into NaN, as it does in any product with the mask's zeros). The q, k, v
//! and output-gradient tiles are first packed into panels, the order in which that kernel
//! reads them (`pack_panels`), with the head dim rounded up to `NR` and partial tiles filled
//! with zeros, so the kernel needs no edge cases; packing costs O(tile·d_h) against the
//! O(tile²·d_h) of the products. The probability tiles (P and its gradient), which only
//! head dim / NR register blocks read per row, are read where they lie instead. The forward
//! pass packs every key and value tile once per call (`PackedKeys`, a padded copy of k and v)
//! rather than once per query tile that reads it: on one Zen 4 core (AVX2) that took its
//! [16, 4, 256, 32] from 6.3-6.4 to 5.5-5.7 ms and [2, 4, 1024, 64] from 16.9-17.0 to 14.7 ms.
//!
//! Parallel work: the forward pass runs one task per (batch, head, query tile); the backward
//! pass one task per (batch, head), because the key gradients of a head sum over all its query
//! tiles (splitting them across threads would need either a race or a second pass over the
//! probabilities). Inside a task every sum runs in a fixed order, so the result is the same bit
//! for bit whatever the number of threads. Scratch buffers are allocated once per rayon job, not
//! per tile.

use super::score_scale;
use crate::{cpu_tensor, zeroed, PARALLEL_MIN_ELEMS};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use tokenformer_core::{Result, Tensor};

/// Query rows per tile and keys per tile. Measured on this kernel alone (CPU time of one
/// thread, [16, 4, 256, 32], [8, 6, 256, 64] and [8, 4, 64, 32]) against 64 × 64 and
/// 128 × 128: all three within 5% at d_h 32; at d_h 64 the 128-key tiles about 10% faster
/// (fewer key tiles, so fewer passes of the key gradients through the query tiles). 64 query
/// rows keep the forward pass's tasks small enough to balance across threads.
const QUERY_TILE: usize = 64;
const KEY_TILE: usize = 128;
/// Columns of the register block of the tile products, and its rows (MR, a parameter of the
/// kernels): 4 × 16 accumulators are eight 8-wide AVX2 registers, half of its 16, leaving room
/// for operands (the plain and NEON builds use the same block); with AVX-512, 8 × 16 are eight
/// of its 32 registers.
const NR: usize = 16;
const MR_AVX2: usize = 4;
const MR_AVX512: usize = 8;
const _: () = assert!(
    QUERY_TILE.is_multiple_of(MR_AVX512)
        && KEY_TILE.is_multiple_of(MR_AVX512)
        && KEY_TILE.is_multiple_of(NR)
        && MR_AVX512.is_multiple_of(MR_AVX2)
);
/// Lanes of the vectorised row sums.
const LANES: usize = 8;

/// How a multiply-add is computed, and the register block of the tile products. The kernels
/// are generic over it so that one source gives a fused (FMA) version for CPUs that have it, a
/// plain one for those that do not, and one whose register block is written for AVX-512.
trait Arith {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;

    /// One MR × NR block of C (+)= A·B from MR rows of A, read where they lie, and a B
    /// panel [k][NR]. The accumulators are a fixed-size array the compiler keeps in vector
    /// registers.
    #[inline(always)]
    fn micro_kernel<const MR: usize>(
        a: BlockOfA<MR>,
        b_panel: &[f32],
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[0.0f32; NR]; MR];
        if accumulate {
            for (r, acc_row) in acc.iter_mut().enumerate() {
                acc_row.copy_from_slice(&c[r * ldc..][..NR]);
            }
        }
        let (b_steps, _) = b_panel.as_chunks::<NR>();
        for (p, b) in b_steps.iter().enumerate().take(a.depth) {
            for (r, acc_row) in acc.iter_mut().enumerate() {
                // SAFETY: p < depth (the loop takes `a.depth` steps).
                let a_rp = unsafe { a.at(r, p) };
                for (acc_rj, &b_j) in acc_row.iter_mut().zip(b) {
                    *acc_rj = Self::mul_add(a_rp, b_j, *acc_rj);
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate() {
            c[r * ldc..][..NR].copy_from_slice(acc_row);
        }
    }
}

/// a·b + c rounded once (an FMA instruction where the target has one).
struct Fused;
impl Arith for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Fused multiply-adds, and a register block of one AVX-512 register (NR = 16 lanes) per row:
/// the bits of [`Fused`], for code compiled with AVX-512.
#[cfg(target_arch = "x86_64")]
struct FusedAvx512;
#[cfg(target_arch = "x86_64")]
impl Arith for FusedAvx512 {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        Fused::mul_add(a, b, c)
    }

    #[inline(always)]
    fn micro_kernel<const MR: usize>(
        a: BlockOfA<MR>,
        b_panel: &[f32],
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        use crate::vector::{x86::Avx512, Real};
        type Row = Avx512<1>;
        const { assert!(Row::LANES == NR) };
        let mut acc = [Row::splat(0.0); MR];
        if accumulate {
            for (r, acc_row) in acc.iter_mut().enumerate() {
                *acc_row = Row::load(&c[r * ldc..]);
            }
        }
        let (b_steps, _) = b_panel.as_chunks::<NR>();
        for (p, b) in b_steps.iter().enumerate().take(a.depth) {
            let b = Row::load(b);
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: p < depth (the loop takes `a.depth` steps).
                let a_rp = unsafe { a.at(r, p) };
                // a·b + acc lane by lane: the bits of `Fused`'s a(r, p)·b[j] + acc[r][j].
                *acc_r = Row::splat(a_rp).mul_add(b, *acc_r);
            }
        }
        for (r, acc_row) in acc.iter().enumerate() {
            acc_row.store(&mut c[r * ldc..]);
        }
    }
}

/// a·b + c rounded twice: on x86-64 without FMA, `f32::mul_add` would be a slow library call.
#[cfg_attr(target_arch = "aarch64", allow(dead_code))]
struct Separate;
impl Arith for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// The instruction set the kernels run with, detected once per call.
#[derive(Clone, Copy)]
enum Isa {
    /// x86-64 with AVX2 and FMA: the vector code is compiled for 8-wide registers.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// x86-64 with AVX-512F and FMA: 16-wide registers, and the taller register block.
    #[cfg(target_arch = "x86_64")]
    Avx512Fma,
    /// Whatever the build targets by default (SSE2 on x86-64, NEON with FMA on aarch64).
    Baseline,
}

impl Isa {
    /// The widest of AVX-512 and AVX2 (each with FMA) that the processor has and
    /// `TOKENFORMER_CPU_ISA` allows.
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::processor::{vector_isa, VectorIsa};
            if vector_isa() >= VectorIsa::Avx512 {
                return Isa::Avx512Fma;
            }
            if vector_isa() >= VectorIsa::Avx2 {
                return Isa::Avx2Fma;
            }
        }
        Isa::Baseline
    }
}

/// Sizes shared by every tile of one call.
struct Geometry {
    /// Sequence length and head dim.
    t: usize,
    d: usize,
    /// The head dim rounded up to a multiple of NR: the row length of the padded tiles.
    dp: usize,
    scale: f32,
}

impl Geometry {
    fn new(t: usize, d: usize) -> Geometry {
        Geometry { t, d, dp: d.next_multiple_of(NR), scale: score_scale(d) }
    }
    fn query_tiles(&self) -> usize {
        self.t.div_ceil(QUERY_TILE)
    }
    fn key_tiles(&self) -> usize {
        self.t.div_ceil(KEY_TILE)
    }
    /// Values in one packed key (or value) tile: KEY_TILE × dp.
    fn key_tile_len(&self) -> usize {
        KEY_TILE * self.dp
    }
}

/// One head's q, k and v, each [T, d_h] row-major.
#[derive(Clone, Copy)]
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

// ---------------------------------------------------------------------------------------------
// Elementwise helpers

/// e^x within about 2 ulp, for the exponents of a softmax. Written without branches or library
/// calls, so a loop of them vectorises. Range reduction x = n·ln2 + r with |r| ≤ ln2/2 (ln2 in
/// two parts so n·ln2 is exact), a degree-6 polynomial for e^r (the Cephes coefficients) and
/// 2^n put into the exponent bits. Below ln(f32::MIN_POSITIVE) ≈ −87.34 (where e^x is no longer
/// a normal f32) the result is 0, so e^−∞ = 0 as the online softmax needs; NaN stays NaN.
#[inline(always)]
fn exp<A: Arith>(x: f32) -> f32 {
    const LOWEST: f32 = -87.336_55;
    const HIGHEST: f32 = 88.3;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LOWEST, HIGHEST);
    let n_biased = A::mul_add(xc, std::f32::consts::LOG2_E, ROUND);
    let n = n_biased - ROUND;
    let r = A::mul_add(n, -LN2_LO, A::mul_add(n, -LN2_HI, xc));
    let mut p = 1.987_569_1e-4;
    p = A::mul_add(p, r, 1.398_199_9e-3);
    p = A::mul_add(p, r, 8.333_452e-3);
    p = A::mul_add(p, r, 4.166_579_6e-2);
    p = A::mul_add(p, r, 1.666_666_5e-1);
    p = A::mul_add(p, r, 0.5);
    let e_r = A::mul_add(p, r * r, r) + 1.0;
    // The integer n sits in the low bits of n_biased (|n| ≤ 128 after the clamp).
    let n_int = n_biased.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let two_n = f32::from_bits(((n_int + 127) as u32) << 23);
    let e = e_r * two_n;
    if x < LOWEST {
        0.0
    } else {
        e
    }
}

/// Sums `values` in LANES interleaved partial sums added in a fixed tree: the same bits every
/// time, and vector adds instead of a serial chain.
#[inline(always)]
fn lane_sum(lanes: [f32; LANES], tail: f32) -> f32 {
    let quad = [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
    ((quad[0] + quad[2]) + (quad[1] + quad[3])) + tail
}

/// Σ a_i·b_i.
#[inline(always)]
fn dot<A: Arith>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let mut tail = 0.0f32;
    for (&x, &y) in a_chunks.remainder().iter().zip(b_chunks.remainder()) {
        tail = A::mul_add(x, y, tail);
    }
    for (x, y) in a_chunks.zip(b_chunks) {
        for l in 0..LANES {
            lanes[l] = A::mul_add(x[l], y[l], lanes[l]);
        }
    }
    lane_sum(lanes, tail)
}

/// The largest value of a non-empty row. NaN entries are passed over, as `f32::max` does;
/// written as a comparison so that it compiles to plain vector max instructions.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let larger = |m: f32, x: f32| if x > m { x } else { m };
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| larger(m, x));
    for chunk in chunks {
        for l in 0..LANES {
            lanes[l] = larger(lanes[l], chunk[l]);
        }
    }
    lanes.iter().fold(tail, |m, &x| larger(m, x))
}

/// Σ of a row, in LANES interleaved partial sums.
#[inline(always)]
fn row_sum(row: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder().iter().sum::<f32>();
    for chunk in chunks {
        for l in 0..LANES {
            lanes[l] += chunk[l];
        }
    }
    lane_sum(lanes, tail)
}

/// Overwrites each x of `row` with e^(x·scale − shift) and returns their sum.
#[inline(always)]
fn exp_row<A: Arith>(row: &mut [f32], scale: f32, shift: f32) -> f32 {
    for x in row.iter_mut() {
        *x = exp::<A>(A::mul_add(*x, scale, -shift));
    }
    row_sum(row)
}

/// Packs a matrix M [m × k] into panels of `width` rows, the layout the tile products stream:
/// panel r / width holds, for each p in turn, the `width` values M(r, p) of its rows, at
/// dst[(r / width)·k·width + p·width + r % width]. M is `src` (rows of length d) read as it is,
/// M(r, p) = src[r·d + p], or transposed, M(r, p) = src[p·d + r]; entries past the end of `src`
/// or past column d (the padding of partial tiles and of the head dim) are zeros.
#[inline(always)]
fn pack_panels(src: &[f32], d: usize, transposed: bool, k: usize, width: usize, dst: &mut [f32]) {
    dst.fill(0.0);
    let panel_len = k * width;
    for (i, row) in src.chunks_exact(d).enumerate() {
        if transposed {
            // Row i of src is column p = i of M: runs of `width` adjacent values per panel.
            for (panel, values) in dst.chunks_exact_mut(panel_len).zip(row.chunks(width)) {
                panel[i * width..][..values.len()].copy_from_slice(values);
            }
        } else {
            // Row i of src is row r = i of M: one value per step p of its panel.
            let panel = &mut dst[(i / width) * panel_len..][..panel_len];
            for (p, &x) in row.iter().enumerate() {
                panel[p * width + i % width] = x;
            }
        }
    }
}

/// Copies the first `dst.len() / d` rows of `src` (rows of length dp) into `dst` (rows of
/// length d), times `factor`.
#[inline(always)]
fn copy_rows_unpadded(src: &[f32], dp: usize, d: usize, dst: &mut [f32], factor: f32) {
    for (dst_row, src_row) in dst.chunks_exact_mut(d).zip(src.chunks_exact(dp)) {
        for (o, &x) in dst_row.iter_mut().zip(src_row) {
            *o = x * factor;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tile products

/// Which parts of a tile product the causal mask makes unnecessary, for a tile pair whose query
/// rows start at `first_query` and whose keys start at `first_key`. Entries of a probability
/// tile with key j > query i are exactly zero, so the products can skip the register blocks
/// that would only ever meet such entries.
#[derive(Clone, Copy)]
enum Causal {
    /// Every entry is needed (the tile pair lies wholly below the diagonal).
    Full,
    /// C is a [queries × keys] tile (scores, or ∂L/∂probabilities): blocks whose every entry has
    /// key > query are skipped and hold stale values, which the caller never reads.
    MaskedOutput { first_query: usize, first_key: usize },
    /// A is a [queries × keys] tile that is zero where key > query (P·V, dS·K): each block of
    /// rows stops the shared dimension after its last query's key.
    KeysUpToQuery { first_query: usize, first_key: usize },
    /// A is the transpose of such a tile, [keys × queries] (Pᵀ·dO, dSᵀ·Q): each block of rows
    /// starts the shared dimension at its first key's query.
    QueriesFromKey { first_query: usize, first_key: usize },
}

/// The A operand of a tile product. The register blocks read it where it lies: a copy into
/// panels would cost as much as the few blocks of C (head dim / NR) that reuse it.
#[derive(Clone, Copy)]
enum Operand<'a> {
    /// Already packed into panels of MR rows (`pack_panels` with width MR).
    Packed(&'a [f32]),
    /// A row-major tile with rows `ld` apart: A(r, p) = data[r·ld + p].
    Rows(&'a [f32], usize),
    /// The transpose of such a tile: A(r, p) = data[p·ld + r].
    Transposed(&'a [f32], usize),
}

/// The ROWS rows of A that one register block reads, for `depth` steps of the shared
/// dimension: A(r, p) = data[r·row_stride + p·step_stride].
#[derive(Clone, Copy)]
struct BlockOfA<'a, const ROWS: usize> {
    data: &'a [f32],
    row_stride: usize,
    step_stride: usize,
    depth: usize,
}

impl<'a, const ROWS: usize> BlockOfA<'a, ROWS> {
    /// # Panics
    /// If `data` does not hold every element the block reads.
    #[inline(always)]
    fn new(data: &'a [f32], (row_stride, step_stride): (usize, usize), depth: usize) -> Self {
        let last = (ROWS.saturating_sub(1))
            .checked_mul(row_stride)
            .zip((depth.saturating_sub(1)).checked_mul(step_stride))
            .and_then(|(rows, steps)| rows.checked_add(steps));
        assert!(
            ROWS == 0 || depth == 0 || last.is_some_and(|last| last < data.len()),
            "attention: a block of A reaches past its tile"
        );
        BlockOfA { data, row_stride, step_stride, depth }
    }

    /// A(r, p), without a bounds check in the register block's inner loop.
    ///
    /// # Safety
    /// p is below the `depth` given to `new` (r is below ROWS, checked here).
    #[inline(always)]
    unsafe fn at(&self, r: usize, p: usize) -> f32 {
        assert!(r < ROWS);
        debug_assert!(p < self.depth);
        // SAFETY: `new` checked that A(ROWS − 1, depth − 1), the last element, lies inside
        // `data`; r < ROWS, and the caller keeps p below depth.
        unsafe { *self.data.get_unchecked(r * self.row_stride + p * self.step_stride) }
    }
}

/// C[m × n] = A[m × k]·B[k × n], or C += A·B when `accumulate`; B comes packed into panels of
/// NR columns (`pack_panels` of Bᵀ with width NR), C is row-major with rows `ldc` apart, m is a
/// multiple of MR and n of NR. Packed operands were packed for a depth of `panel_depth` ≥ k
/// (a whole tile), of which the product uses the first k (the part of the tile that is
/// present).
///
/// Each block of NR columns of B is one panel, [k][NR]; `micro_kernel` streams it beside MR
/// rows of A.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn tile_product<A: Arith, const MR: usize>(
    (m, n, k, panel_depth): (usize, usize, usize, usize),
    a: Operand,
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    causal: Causal,
) {
    debug_assert!(m % MR == 0 && n % NR == 0);
    for r0 in (0..m).step_by(MR) {
        let (p_start, p_end) = match causal {
            Causal::KeysUpToQuery { first_query, first_key } => {
                (0, (first_query + r0 + MR).saturating_sub(first_key).min(k))
            }
            Causal::QueriesFromKey { first_query, first_key } => {
                ((first_key + r0).saturating_sub(first_query).min(k), k)
            }
            Causal::Full | Causal::MaskedOutput { .. } => (0, k),
        };
        let depth = p_end - p_start;
        if depth == 0 {
            // Every term of these rows is masked: C += 0 leaves them, C = 0 clears them.
            if !accumulate {
                for row in c[r0 * ldc..].chunks_mut(ldc).take(MR) {
                    row[..n].fill(0.0);
                }
            }
            continue;
        }
        let a_block = match a {
            Operand::Packed(data) => {
                let panel = &data[r0 * panel_depth + p_start * MR..];
                BlockOfA::new(panel, (1, MR), depth)
            }
            Operand::Transposed(data, ld) => {
                BlockOfA::new(&data[p_start * ld + r0..], (1, ld), depth)
            }
            Operand::Rows(data, ld) => BlockOfA::new(&data[r0 * ld + p_start..], (ld, 1), depth),
        };
        for c0 in (0..n).step_by(NR) {
            if let Causal::MaskedOutput { first_query, first_key } = causal {
                if first_key + c0 > first_query + r0 + MR - 1 {
                    continue;
                }
            }
            let panel = c0 * panel_depth;
            let b_panel = &b[panel + p_start * NR..panel + p_end * NR];
            A::micro_kernel::<MR>(a_block, b_panel, &mut c[r0 * ldc + c0..], ldc, accumulate);
        }
    }
}

/// Keys of the tile starting at `first_key` (of `keys`) that query `query` attends to.
#[inline(always)]
fn visible_keys(query: usize, first_key: usize, keys: usize) -> usize {
    (query + 1).saturating_sub(first_key).min(keys)
}

// ---------------------------------------------------------------------------------------------
// Forward

/// Per-job buffers of the forward pass.
struct ForwardScratch {
    /// The query tile as A panels (rows: queries, depth: head dim).
    q: Vec<f32>,
    /// Scores, then probabilities (unnormalised) [QUERY_TILE][KEY_TILE].
    s: Vec<f32>,
    /// Σ_j e^(s_ij − m_i)·v_j so far [QUERY_TILE][dp], the running maximum m_i and the running
    /// sum l_i = Σ_j e^(s_ij − m_i) per row.
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl ForwardScratch {
    fn new(g: &Geometry) -> ForwardScratch {
        ForwardScratch {
            q: vec![0.0; QUERY_TILE * g.dp],
            s: vec![0.0; QUERY_TILE * KEY_TILE],
            o: vec![0.0; QUERY_TILE * g.dp],
            m: vec![0.0; QUERY_TILE],
            l: vec![0.0; QUERY_TILE],
        }
    }
}

/// Every head's key tiles as B panels of kᵀ (depth: head dim, columns: keys) and value tiles as
/// B panels of v (depth: keys, columns: head dim), packed once per call: each key tile serves
/// every query tile at or after it (at T = 256, 6 (query, key) tile pairs per head against 2
/// key tiles), and packing them per pair took a sixth of the forward pass.
struct PackedKeys {
    k_t: Vec<f32>,
    v: Vec<f32>,
}

impl PackedKeys {
    fn new(g: &Geometry, heads: usize, k: &[f32], v: &[f32]) -> PackedKeys {
        let tile_len = g.key_tile_len();
        let len = heads * g.key_tiles() * tile_len;
        let (mut k_t, mut v_packed) = (vec![0.0f32; len], vec![0.0f32; len]);
        let pack = |i: usize, (k_tile, v_tile): (&mut [f32], &mut [f32])| {
            let (h, tile) = (i / g.key_tiles(), i % g.key_tiles());
            let first_row = h * g.t + tile * KEY_TILE;
            let rows = first_row * g.d..(first_row + KEY_TILE.min(g.t - tile * KEY_TILE)) * g.d;
            pack_panels(&k[rows.clone()], g.d, false, g.dp, NR, k_tile);
            pack_panels(&v[rows], g.d, true, KEY_TILE, NR, v_tile);
        };
        if k.len() >= PARALLEL_MIN_ELEMS {
            let tiles = k_t.par_chunks_mut(tile_len).zip(v_packed.par_chunks_mut(tile_len));
            tiles.enumerate().for_each(|(i, pair)| pack(i, pair));
        } else {
            let tiles = k_t.chunks_mut(tile_len).zip(v_packed.chunks_mut(tile_len));
            tiles.enumerate().for_each(|(i, pair)| pack(i, pair));
        }
        PackedKeys { k_t, v: v_packed }
    }

    /// Head h, with its queries `q`.
    fn head<'a>(&'a self, g: &Geometry, h: usize, q: &'a [f32]) -> ForwardHead<'a> {
        let len = g.key_tiles() * g.key_tile_len();
        ForwardHead { q, k_t: &self.k_t[h * len..][..len], v: &self.v[h * len..][..len] }
    }
}

/// One head's queries [T, d_h], and its key and value tiles packed (see [`PackedKeys`]).
#[derive(Clone, Copy)]
struct ForwardHead<'a> {
    q: &'a [f32],
    k_t: &'a [f32],
    v: &'a [f32],
}

/// Rows first_query.. of one head: `out` [rows][d] and `lse` [rows].
#[inline(always)]
fn forward_tile<A: Arith, const MR: usize>(
    g: &Geometry,
    head: ForwardHead,
    first_query: usize,
    out: &mut [f32],
    lse: &mut [f32],
    s: &mut ForwardScratch,
) {
    let (d, dp, scale) = (g.d, g.dp, g.scale);
    let rows = lse.len();
    // Rows of the tile that are computed: those present, rounded up to the register block.
    let rows_p = rows.next_multiple_of(MR);
    let last_query = first_query + rows - 1;
    pack_panels(&head.q[first_query * d..(last_query + 1) * d], d, false, dp, MR, &mut s.q);
    s.o.fill(0.0);
    s.m.fill(f32::NEG_INFINITY);
    s.l.fill(0.0);
    // Key tiles wholly after the last query are masked out entirely: never visited.
    for (tile, first_key) in (0..=last_query).step_by(KEY_TILE).enumerate() {
        let keys = KEY_TILE.min(g.t - first_key);
        let k_t = &head.k_t[tile * g.key_tile_len()..][..g.key_tile_len()];
        let v = &head.v[tile * g.key_tile_len()..][..g.key_tile_len()];
        let on_diagonal = first_key + keys - 1 > first_query;
        let (scores_mask, product_mask) = if on_diagonal {
            (
                Causal::MaskedOutput { first_query, first_key },
                Causal::KeysUpToQuery { first_query, first_key },
            )
        } else {
            (Causal::Full, Causal::Full)
        };
        let (q, shape) = (Operand::Packed(&s.q), (rows_p, keys.next_multiple_of(NR), dp, dp));
        tile_product::<A, MR>(shape, q, k_t, &mut s.s, KEY_TILE, false, scores_mask);
        // Online softmax: fold this tile's scores into each row's running maximum and sum,
        // rescaling what was accumulated under the old maximum.
        for (r, row) in s.s.chunks_exact_mut(KEY_TILE).take(rows_p).enumerate() {
            let visible = if r < rows { visible_keys(first_query + r, first_key, keys) } else { 0 };
            let (kept, masked) = row.split_at_mut(visible);
            masked.fill(0.0);
            if kept.is_empty() {
                continue;
            }
            // scale > 0, so max(x)·scale is max(x·scale) exactly.
            let m_new = s.m[r].max(row_max(kept) * scale);
            let correction = exp::<A>(s.m[r] - m_new);
            s.l[r] = A::mul_add(s.l[r], correction, exp_row::<A>(kept, scale, m_new));
            s.m[r] = m_new;
            if correction != 1.0 {
                s.o[r * dp..][..dp].iter_mut().for_each(|x| *x *= correction);
            }
        }
        let p = Operand::Rows(&s.s, KEY_TILE);
        let shape = (rows_p, dp, keys, KEY_TILE);
        tile_product::<A, MR>(shape, p, v, &mut s.o, dp, true, product_mask);
    }
    for (r, (out_row, lse_r)) in out.chunks_exact_mut(d).zip(lse.iter_mut()).enumerate() {
        copy_rows_unpadded(&s.o[r * dp..][..dp], dp, d, out_row, 1.0 / s.l[r]);
        *lse_r = s.m[r] + s.l[r].ln();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_tile_avx2(
    g: &Geometry,
    head: ForwardHead,
    first_query: usize,
    out: &mut [f32],
    lse: &mut [f32],
    s: &mut ForwardScratch,
) {
    forward_tile::<Fused, MR_AVX2>(g, head, first_query, out, lse, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn forward_tile_avx512(
    g: &Geometry,
    head: ForwardHead,
    first_query: usize,
    out: &mut [f32],
    lse: &mut [f32],
    s: &mut ForwardScratch,
) {
    forward_tile::<FusedAvx512, MR_AVX512>(g, head, first_query, out, lse, s)
}

fn forward_tile_for(
    isa: Isa,
    g: &Geometry,
    head: ForwardHead,
    first_query: usize,
    out: &mut [f32],
    lse: &mut [f32],
    s: &mut ForwardScratch,
) {
    match isa {
        // SAFETY: Isa::detect returned each only after checking the CPU has its instructions.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Fma => unsafe { forward_tile_avx512(g, head, first_query, out, lse, s) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { forward_tile_avx2(g, head, first_query, out, lse, s) },
        #[cfg(target_arch = "aarch64")]
        Isa::Baseline => forward_tile::<Fused, MR_AVX2>(g, head, first_query, out, lse, s),
        #[cfg(not(target_arch = "aarch64"))]
        Isa::Baseline => forward_tile::<Separate, MR_AVX2>(g, head, first_query, out, lse, s),
    }
}

/// (out [B, H, T, d_h], lse [B, H, T]) of the causal attention of q, k, v [B, H, T, d_h].
pub(crate) fn causal_attention_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor)> {
    forward_with(Isa::detect(), q, k, v)
}

/// `causal_attention_fused` on the kernels of `isa`.
fn forward_with(isa: Isa, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "causal_attention_fused";
    let (qs, ks, vs) = (q.cpu_slice(op)?, k.cpu_slice(op)?, v.cpu_slice(op)?);
    let dims = q.dims();
    let (heads, t, d) = (dims[0] * dims[1], dims[2], dims[3]);
    // Each task zeroes its own tile of the output (in parallel, while it is in cache).
    let n = q.numel();
    let mut out = Vec::with_capacity(n);
    let out_parts = &mut out.spare_capacity_mut()[..n];
    let mut lse = vec![0.0f32; heads * t];
    if d == 0 {
        // No features: every score is 0 and each row's softmax is uniform over i + 1 keys.
        for (i, x) in lse.iter_mut().enumerate() {
            *x = ((i % t + 1) as f32).ln();
        }
    }
    if heads == 0 || t == 0 || d == 0 {
        zeroed(out_parts);
    } else {
        let g = Geometry::new(t, d);
        let keys_packed = PackedKeys::new(&g, heads, ks, vs);
        // One task per (head, query tile); it alone writes that tile's rows of out and lse.
        type Task<'a> = (usize, usize, &'a mut [MaybeUninit<f32>], &'a mut [f32]);
        let tasks: Vec<Task> = out_parts
            .chunks_mut(t * d)
            .zip(lse.chunks_mut(t))
            .enumerate()
            .flat_map(|(h, (out_h, lse_h))| {
                out_h
                    .chunks_mut(QUERY_TILE * d)
                    .zip(lse_h.chunks_mut(QUERY_TILE))
                    .enumerate()
                    .map(move |(tile, (out_t, lse_t))| (h, tile * QUERY_TILE, out_t, lse_t))
            })
            .collect();
        let run = |scratch: &mut ForwardScratch, (h, first_query, out_t, lse_t): Task| {
            let out_t = zeroed(out_t);
            let head = keys_packed.head(&g, h, &qs[h * t * d..(h + 1) * t * d]);
            forward_tile_for(isa, &g, head, first_query, out_t, lse_t, scratch);
        };
        if q.numel() >= PARALLEL_MIN_ELEMS {
            tasks.into_par_iter().for_each_init(|| ForwardScratch::new(&g), run);
        } else {
            let mut scratch = ForwardScratch::new(&g);
            tasks.into_iter().for_each(|task| run(&mut scratch, task));
        }
    }
    // SAFETY: every tile of the output was zeroed (then written) by its task, or the whole
    // output above when there is no work.
    unsafe { out.set_len(n) };
    Ok((cpu_tensor(out, dims), cpu_tensor(lse, &dims[..3])))
}

// ---------------------------------------------------------------------------------------------
// Backward

/// Per-job buffers of the backward pass.
struct BackwardScratch {
    /// The query tile and the output-gradient tile, each as A panels (rows: queries, depth:
    /// head dim) and as B panels (depth: queries, columns: head dim).
    q_a: Vec<f32>,
    q_b: Vec<f32>,
    g_out_a: Vec<f32>,
    g_out_b: Vec<f32>,
    /// The key tile as B panels of k (depth: keys) and of kᵀ (columns: keys); the value tile
    /// as B panels of vᵀ.
    k: Vec<f32>,
    k_t: Vec<f32>,
    v_t: Vec<f32>,
    /// Scores, then probabilities; ∂L/∂probabilities, then ∂L/∂scores [QUERY_TILE][KEY_TILE].
    p: Vec<f32>,
    ds: Vec<f32>,
    /// The key tile's gradients [KEY_TILE][dp], summed over query tiles.
    gk: Vec<f32>,
    gv: Vec<f32>,
    /// The head's query gradient [query tiles · QUERY_TILE][dp], summed over key tiles.
    gq: Vec<f32>,
    /// D_i = Σ_c g_out[i][c]·out[i][c] per query of the head.
    delta: Vec<f32>,
}

impl BackwardScratch {
    fn new(g: &Geometry) -> BackwardScratch {
        let tile = |rows: usize, cols: usize| vec![0.0f32; rows * cols];
        BackwardScratch {
            q_a: tile(QUERY_TILE, g.dp),
            q_b: tile(QUERY_TILE, g.dp),
            g_out_a: tile(QUERY_TILE, g.dp),
            g_out_b: tile(QUERY_TILE, g.dp),
            k: tile(KEY_TILE, g.dp),
            k_t: tile(g.dp, KEY_TILE),
            v_t: tile(g.dp, KEY_TILE),
            p: tile(QUERY_TILE, KEY_TILE),
            ds: tile(QUERY_TILE, KEY_TILE),
            gk: tile(KEY_TILE, g.dp),
            gv: tile(KEY_TILE, g.dp),
            gq: tile(g.query_tiles() * QUERY_TILE, g.dp),
            delta: vec![0.0; g.t],
        }
    }
}

/// The forward's output, its log-sum-exp and ∂L/∂out of one head.
#[derive(Clone, Copy)]
struct HeadGrad<'a> {
    out: &'a [f32],
    lse: &'a [f32],
    g_out: &'a [f32],
}

/// gq, gk, gv [T][d] of one head. Key tiles outer, query tiles inner: the key tile's gradients
/// stay in scratch until every query tile at or after it has added to them, and each query
/// tile's gradient gathers the key tiles in increasing order.
#[inline(always)]
fn backward_head<A: Arith, const MR: usize>(
    g: &Geometry,
    head: Head,
    grad: HeadGrad,
    (gq, gk, gv): (&mut [f32], &mut [f32], &mut [f32]),
    s: &mut BackwardScratch,
) {
    let (t, d, dp, scale) = (g.t, g.d, g.dp, g.scale);
    for ((delta, out_row), g_row) in
        s.delta.iter_mut().zip(grad.out.chunks_exact(d)).zip(grad.g_out.chunks_exact(d))
    {
        *delta = dot::<A>(out_row, g_row);
    }
    s.gq.fill(0.0);
    for first_key in (0..t).step_by(KEY_TILE) {
        let keys = KEY_TILE.min(t - first_key);
        let key_rows = first_key * d..(first_key + keys) * d;
        pack_panels(&head.k[key_rows.clone()], d, true, KEY_TILE, NR, &mut s.k);
        pack_panels(&head.k[key_rows.clone()], d, false, dp, NR, &mut s.k_t);
        pack_panels(&head.v[key_rows], d, false, dp, NR, &mut s.v_t);
        s.gk.fill(0.0);
        s.gv.fill(0.0);
        // Query tiles wholly before this key tile see none of it: skipped.
        let first_tile = first_key / QUERY_TILE * QUERY_TILE;
        for first_query in (first_tile..t).step_by(QUERY_TILE) {
            let rows = QUERY_TILE.min(t - first_query);
            let rows_p = rows.next_multiple_of(MR);
            let query_rows = first_query * d..(first_query + rows) * d;
            let (q_rows, g_rows) = (&head.q[query_rows.clone()], &grad.g_out[query_rows]);
            pack_panels(q_rows, d, false, dp, MR, &mut s.q_a);
            pack_panels(q_rows, d, true, QUERY_TILE, NR, &mut s.q_b);
            pack_panels(g_rows, d, false, dp, MR, &mut s.g_out_a);
            pack_panels(g_rows, d, true, QUERY_TILE, NR, &mut s.g_out_b);
            let on_diagonal = first_key + keys - 1 > first_query;
            let mask = |full: Causal| if on_diagonal { full } else { Causal::Full };
            let scores_mask = mask(Causal::MaskedOutput { first_query, first_key });
            let (q, g_out) = (Operand::Packed(&s.q_a), Operand::Packed(&s.g_out_a));
            let shape = (rows_p, keys.next_multiple_of(NR), dp, dp);
            tile_product::<A, MR>(shape, q, &s.k_t, &mut s.p, KEY_TILE, false, scores_mask);
            tile_product::<A, MR>(shape, g_out, &s.v_t, &mut s.ds, KEY_TILE, false, scores_mask);
            // P = e^(s·scale − lse), then ∂L/∂s = scale · P ⊙ (∂L/∂P − D), zero where masked.
            for (r, (p_row, ds_row)) in
                s.p.chunks_exact_mut(KEY_TILE)
                    .zip(s.ds.chunks_exact_mut(KEY_TILE))
                    .take(rows_p)
                    .enumerate()
            {
                let visible =
                    if r < rows { visible_keys(first_query + r, first_key, keys) } else { 0 };
                p_row[visible..].fill(0.0);
                ds_row[visible..].fill(0.0);
                if visible == 0 {
                    continue;
                }
                let (lse, delta) = (grad.lse[first_query + r], s.delta[first_query + r]);
                exp_row::<A>(&mut p_row[..visible], scale, lse);
                for (ds, &p) in ds_row[..visible].iter_mut().zip(&p_row[..visible]) {
                    *ds = p * (*ds - delta) * scale;
                }
            }
            let from_key = mask(Causal::QueriesFromKey { first_query, first_key });
            let shape = (keys.next_multiple_of(MR), dp, rows, QUERY_TILE);
            let p_t = Operand::Transposed(&s.p, KEY_TILE);
            tile_product::<A, MR>(shape, p_t, &s.g_out_b, &mut s.gv, dp, true, from_key);
            let ds_t = Operand::Transposed(&s.ds, KEY_TILE);
            tile_product::<A, MR>(shape, ds_t, &s.q_b, &mut s.gk, dp, true, from_key);
            let up_to_query = mask(Causal::KeysUpToQuery { first_query, first_key });
            let ds = Operand::Rows(&s.ds, KEY_TILE);
            let gq_tile = &mut s.gq[first_query * dp..];
            let shape = (rows_p, dp, keys, KEY_TILE);
            tile_product::<A, MR>(shape, ds, &s.k, gq_tile, dp, true, up_to_query);
        }
        copy_rows_unpadded(&s.gk, dp, d, &mut gk[first_key * d..(first_key + keys) * d], 1.0);
        copy_rows_unpadded(&s.gv, dp, d, &mut gv[first_key * d..(first_key + keys) * d], 1.0);
    }
    copy_rows_unpadded(&s.gq, dp, d, gq, 1.0);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn backward_head_avx2(
    g: &Geometry,
    head: Head,
    grad: HeadGrad,
    grads: (&mut [f32], &mut [f32], &mut [f32]),
    s: &mut BackwardScratch,
) {
    backward_head::<Fused, MR_AVX2>(g, head, grad, grads, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn backward_head_avx512(
    g: &Geometry,
    head: Head,
    grad: HeadGrad,
    grads: (&mut [f32], &mut [f32], &mut [f32]),
    s: &mut BackwardScratch,
) {
    backward_head::<FusedAvx512, MR_AVX512>(g, head, grad, grads, s)
}

fn backward_head_for(
    isa: Isa,
    g: &Geometry,
    head: Head,
    grad: HeadGrad,
    grads: (&mut [f32], &mut [f32], &mut [f32]),
    s: &mut BackwardScratch,
) {
    match isa {
        // SAFETY: Isa::detect returned each only after checking the CPU has its instructions.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Fma => unsafe { backward_head_avx512(g, head, grad, grads, s) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { backward_head_avx2(g, head, grad, grads, s) },
        #[cfg(target_arch = "aarch64")]
        Isa::Baseline => backward_head::<Fused, MR_AVX2>(g, head, grad, grads, s),
        #[cfg(not(target_arch = "aarch64"))]
        Isa::Baseline => backward_head::<Separate, MR_AVX2>(g, head, grad, grads, s),
    }
}

/// (gq, gk, gv) of the fused causal attention, from the forward's out and lse.
pub(crate) fn causal_attention_fused_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    g_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    backward_with(Isa::detect(), [q, k, v, out, lse, g_out])
}

/// `causal_attention_fused_backward` on the kernels of `isa`.
fn backward_with(isa: Isa, tensors: [&Tensor; 6]) -> Result<(Tensor, Tensor, Tensor)> {
    let [q, k, v, out, lse, g_out] = tensors;
    let op = "causal_attention_fused_backward";
    let (qs, ks, vs) = (q.cpu_slice(op)?, k.cpu_slice(op)?, v.cpu_slice(op)?);
    let (out_s, lse_s, g_s) = (out.cpu_slice(op)?, lse.cpu_slice(op)?, g_out.cpu_slice(op)?);
    let dims = q.dims();
    let (heads, t, d) = (dims[0] * dims[1], dims[2], dims[3]);
    // Each head's task zeroes its own parts (in parallel, while they are in cache).
    let n = q.numel();
    let (mut gq, mut gk, mut gv) =
        (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (gq_out, gk_out, gv_out) = (
        &mut gq.spare_capacity_mut()[..n],
        &mut gk.spare_capacity_mut()[..n],
        &mut gv.spare_capacity_mut()[..n],
    );
    if heads == 0 || t == 0 || d == 0 {
        for part in [&mut *gq_out, &mut *gk_out, &mut *gv_out] {
            zeroed(part);
        }
    } else {
        let g = Geometry::new(t, d);
        let head_len = t * d;
        type Out<'a> = &'a mut [MaybeUninit<f32>];
        type Task<'a> = (usize, ((Out<'a>, Out<'a>), Out<'a>));
        let run = |scratch: &mut BackwardScratch, (h, ((gq_h, gk_h), gv_h)): Task| {
            let (gq_h, gk_h, gv_h) = (zeroed(gq_h), zeroed(gk_h), zeroed(gv_h));
            let range = h * head_len..(h + 1) * head_len;
            let head = Head { q: &qs[range.clone()], k: &ks[range.clone()], v: &vs[range.clone()] };
            let grad = HeadGrad {
                out: &out_s[range.clone()],
                lse: &lse_s[h * t..(h + 1) * t],
                g_out: &g_s[range],
            };
            backward_head_for(isa, &g, head, grad, (gq_h, gk_h, gv_h), scratch);
        };
        if q.numel() >= PARALLEL_MIN_ELEMS {
            gq_out
                .par_chunks_mut(head_len)
                .zip(gk_out.par_chunks_mut(head_len))
                .zip(gv_out.par_chunks_mut(head_len))
                .enumerate()
                .for_each_init(|| BackwardScratch::new(&g), run);
        } else {
            let mut scratch = BackwardScratch::new(&g);
            gq_out
                .chunks_mut(head_len)
                .zip(gk_out.chunks_mut(head_len))
                .zip(gv_out.chunks_mut(head_len))
                .enumerate()
                .for_each(|task| run(&mut scratch, task));
        }
    }
    // SAFETY: every head's parts of the three buffers were zeroed (then written) by its task,
    // or all of them at once above when there is no work.
    unsafe {
        gq.set_len(n);
        gk.set_len(n);
        gv.set_len(n);
    }
    Ok((cpu_tensor(gq, dims), cpu_tensor(gk, dims), cpu_tensor(gv, dims)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{randn, values};

    #[test]
    fn a_block_of_a_is_checked_against_its_tile() {
        let data = [0.0f32; 40];
        // 4 rows 8 apart, 9 steps: the last element read is 3·8 + 8 = 32.
        let block = BlockOfA::<4>::new(&data, (8, 1), 9);
        // SAFETY: inside the rows and depth given to `new`.
        assert_eq!(unsafe { block.at(3, 8) }, 0.0);
        BlockOfA::<4>::new(&data, (1, 4), 10); // the last read is 3 + 36 = 39
        let past_end = std::panic::catch_unwind(|| BlockOfA::<4>::new(&data, (1, 4), 11));
        assert!(past_end.is_err(), "a block reaching element 43 of 40 was accepted");
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_and_avx2_kernels_give_the_same_bits_for_finite_inputs() {
        let fma = std::arch::is_x86_feature_detected!("fma");
        if !(fma && std::arch::is_x86_feature_detected!("avx512f")) {
            return;
        }
        let bits = |t: &Tensor| values(t).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // Sequence lengths across several query and key tiles and not multiples of them or of
        // either register block; head dims below, at and between multiples of NR.
        for (case, dims) in
            [[2, 3, 77, 16], [1, 2, 300, 40], [3, 1, 129, 7], [1, 1, 8, 64]].into_iter().enumerate()
        {
            let seed = 10 * case as u64;
            let (q, k, v) = (randn(&dims, seed), randn(&dims, seed + 1), randn(&dims, seed + 2));
            let g = randn(&dims, seed + 3);
            let wide = forward_with(Isa::Avx512Fma, &q, &k, &v).unwrap();
            let narrow = forward_with(Isa::Avx2Fma, &q, &k, &v).unwrap();
            assert_eq!(bits(&wide.0), bits(&narrow.0), "{dims:?} out");
            assert_eq!(bits(&wide.1), bits(&narrow.1), "{dims:?} lse");
            let (out, lse) = (&narrow.0, &narrow.1);
            let wide = backward_with(Isa::Avx512Fma, [&q, &k, &v, out, lse, &g]).unwrap();
            let narrow = backward_with(Isa::Avx2Fma, [&q, &k, &v, out, lse, &g]).unwrap();
            assert_eq!(bits(&wide.0), bits(&narrow.0), "{dims:?} gq");
            assert_eq!(bits(&wide.1), bits(&narrow.1), "{dims:?} gk");
            assert_eq!(bits(&wide.2), bits(&narrow.2), "{dims:?} gv");
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_library() {
        let mut worst = 0.0f64;
        let mut x = -88.0f32;
        while x <= 0.0 {
            let (got, want) = (exp::<Separate>(x), (x as f64).exp());
            if want >= f32::MIN_POSITIVE as f64 {
                worst = worst.max((got as f64 - want).abs() / want);
            }
            x += 0.000_37;
        }
        assert!(worst < 2.5 * f32::EPSILON as f64, "relative error {worst:e}");
        assert_eq!(exp::<Separate>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp::<Separate>(-100.0), 0.0);
        assert_eq!(exp::<Separate>(0.0), 1.0);
        assert!(exp::<Separate>(f32::NAN).is_nan());
        assert_eq!(exp::<Fused>(f32::NEG_INFINITY), 0.0);
    }
}
