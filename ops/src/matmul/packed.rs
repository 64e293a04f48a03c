//! The fast CPU GEMM: a packed register-tile kernel (AVX2 + FMA, or AVX-512) chosen at run
//! time, with the ndarray/matrixmultiply product in `cpu.rs` as the reference it is tested
//! against and the fallback on processors without those instructions.
//!
//! Why our own: the model's products are thin (T·B rows by a few hundred columns, reduced over
//! a few hundred terms), where a general GEMM spends much of its time packing both operands
//! again in every thread and every call. Here A is read in place through its strides (whole
//! blocks are copied only where its strides would crowd one cache set, or a transposed A would
//! crowd B out of L1: see `pack_a_blocks`), B is packed once per product and shared by the
//! threads (or read in place, for a row-major B under a product with few rows: see
//! `b_operand`), and the caller can keep a packed B (a Pattention's key or value tokens)
//! across many row blocks.
//!
//! The block sizes and the register tile's height come from the processor's caches and
//! registers at run time (`blocking.rs`); the output is cut into tasks, over rows and, for a
//! product with few rows, over columns too, from the shape alone (`split`).
//!
//! The arithmetic, which is the contract the tests check bit for bit: every element of C is one
//! chain of fused multiply-adds over the reduction index in order,
//!
//! ```text
//! c[i,j] = fma(a[i,k−1], b[k−1,j], … fma(a[i,1], b[1,j], fma(a[i,0], b[0,j], c₀)))
//! ```
//!
//! with c₀ = 0, or the previous value of c[i,j] when accumulating. Blocking over k reloads the
//! accumulators from C and continues the same chain, a tile short of rows runs the kernel for
//! the rows it has, and one short of columns runs the same chain in a scratch tile, so an
//! element's bits depend on neither the blocking, nor the thread count, nor where the element
//! falls in a tile; and appending terms whose a (or b) is an exact zero, as exact growth of a
//! Pattention does, leaves every bit of C unchanged.

use super::blocking::{blocking, Blocking};
use crate::processor::VectorIsa;
use rayon::prelude::*;
use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::sync::OnceLock;
use tokenformer_core::Result;

/// A logical matrix read through strides: element (i, j) is `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major (rows × cols) matrix, or its transpose when `transposed` (then `data` holds
    /// the cols × rows matrix row-major).
    pub fn new(data: &'a [f32], cols: usize, rows: usize, transposed: bool) -> View<'a> {
        if transposed {
            View { data, row_stride: 1, col_stride: rows }
        } else {
            View { data, row_stride: cols, col_stride: 1 }
        }
    }

    /// Rows `first..` of the matrix.
    pub fn rows_from(&self, first: usize) -> View<'a> {
        View { data: &self.data[first * self.row_stride..], ..*self }
    }

    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }

    /// Whether (rows × cols) elements can be read through the strides.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// The kernel family of a product: which instructions its register tiles use. The tile's
/// size and the block sizes come from [`Isa::blocking`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// 512-bit tiles in zmm registers (NR = 32).
    Avx512,
    /// 256-bit tiles in ymm registers with FMA (NR = 16).
    Avx2Fma,
}

/// The largest register tile any kernel has, in floats (the scratch tile at the edges).
const MAX_TILE: usize = 8 * 32;

impl Isa {
    fn vector(self) -> VectorIsa {
        match self {
            Isa::Avx512 => VectorIsa::Avx512,
            Isa::Avx2Fma => VectorIsa::Avx2,
        }
    }

    /// This process's blocking for the kernel family: derived once from the caches.
    pub(crate) fn blocking(self) -> Blocking {
        static BLOCKINGS: OnceLock<[Blocking; 2]> = OnceLock::new();
        let all = BLOCKINGS.get_or_init(|| {
            let cache = crate::processor::cache_info();
            [Isa::Avx512, Isa::Avx2Fma].map(|isa| blocking(&cache, isa.vector()))
        });
        all[self as usize]
    }

    pub(crate) fn nr(self) -> usize {
        self.blocking().nr
    }
}

/// The kernel this process runs: `None` where the processor has neither AVX-512 nor AVX2 and
/// FMA, where `TOKENFORMER_CPU_ISA` holds the kernels to their plain copies, or where
/// `TOKENFORMER_FUSED` turns `matmul` off (then the reference path runs).
pub(crate) fn isa() -> Result<Option<Isa>> {
    if !crate::fused::enabled("matmul")? {
        return Ok(None);
    }
    Ok(match crate::processor::checked_isa()? {
        VectorIsa::Avx512 => Some(Isa::Avx512),
        VectorIsa::Avx2 => Some(Isa::Avx2Fma),
        VectorIsa::Plain => None,
    })
}

/// What the CPU GEMM runs on this processor: the kernel's instruction set and its blocking,
/// or `None` where the reference GEMM runs.
pub fn cpu_gemm_choice() -> Result<Option<(VectorIsa, Blocking)>> {
    Ok(isa()?.map(|isa| (isa.vector(), isa.blocking())))
}

/// B (k × n) as the kernels read it: in panels of NR columns, where the NR values
/// b[p, q·NR ..] of row p of panel q start at `q·panel_stride + p·ldb` in `data`.
///
/// Packed (a copy, zero past column n): ldb = NR and panel_stride = k·NR, so each panel is one
/// contiguous block. In place, for a row-major B whose width is a multiple of NR: B's own data,
/// ldb its row stride and panel_stride NR, which saves the copy (in a Pattention's backward
/// pass, a pass over g_O and X for every chunk of rows).
pub(crate) struct PackedB<'a> {
    isa: Isa,
    /// The blocks the products with this B run in (NR is the panels' width).
    blocking: Blocking,
    /// Whether blocks of A are copied (`None`: as [`pack_a_blocks`] decides; tests set it).
    copy_a: Option<bool>,
    data: Cow<'a, [f32]>,
    ldb: usize,
    panel_stride: usize,
    k: usize,
    n: usize,
}

/// Below this many values a pack runs on the calling thread.
const PARALLEL_PACK_MIN: usize = 1 << 16;

/// Packs the (k × n) matrix `b` for `isa`. Panics if `b` does not cover k × n (callers check
/// shapes first).
///
/// Every value of the packed buffer is written once (the padding past column n with zeros),
/// never zero-filled first: packing runs for every product, and a step packs several MB.
pub(crate) fn pack_b(isa: Isa, b: View<'_>, k: usize, n: usize) -> PackedB<'_> {
    assert!(b.covers(k, n), "pack_b: operand too short for {k}x{n}");
    let nr = isa.nr();
    let panels = n.div_ceil(nr);
    let len = panels * k * nr;
    let mut data: Vec<f32> = Vec::with_capacity(len);
    let fill = |q: usize, panel: &mut [MaybeUninit<f32>]| {
        let first = q * nr;
        let width = nr.min(n - first);
        if b.col_stride == 1 {
            for (p, dst) in panel.chunks_exact_mut(nr).enumerate() {
                let row = &b.data[p * b.row_stride + first..][..width];
                for (d, &v) in dst.iter_mut().zip(row) {
                    d.write(v);
                }
                dst[width..].fill(MaybeUninit::new(0.0));
            }
        } else {
            // A transposed B: walk each of its columns, which are contiguous runs in memory
            // (when row_stride is 1), and scatter them into the panel's rows, which are short.
            for j in 0..width {
                let column = first + j;
                for (p, dst) in panel.chunks_exact_mut(nr).enumerate() {
                    dst[j].write(b.at(p, column));
                }
            }
            if width < nr {
                for dst in panel.chunks_exact_mut(nr) {
                    dst[width..].fill(MaybeUninit::new(0.0));
                }
            }
        }
    };
    let spare = &mut data.spare_capacity_mut()[..len];
    if k * n >= PARALLEL_PACK_MIN && panels > 1 {
        spare.par_chunks_mut(k * nr).enumerate().for_each(|(q, panel)| fill(q, panel));
    } else if k > 0 {
        spare.chunks_mut(k * nr).enumerate().for_each(|(q, panel)| fill(q, panel));
    }
    // SAFETY: `fill` wrote every value of each of the `panels` panels of k·NR values.
    unsafe { data.set_len(len) };
    let blocking = isa.blocking();
    PackedB {
        isa,
        blocking,
        copy_a: None,
        data: Cow::Owned(data),
        ldb: nr,
        panel_stride: k * nr,
        k,
        n,
    }
}

/// Products whose A has at most this many rows read a row-major B in place (see
/// [`b_operand`]).
const IN_PLACE_MAX_ROWS: usize = 512;

/// B for a product with `rows` rows of A: read in place where that is faster than a packed copy,
/// packed otherwise. In place needs a row-major B whose width is a multiple of NR, and pays
/// when A has few rows: then few row tiles share each panel, and the copy, which brings B in
/// from memory once more, is a large share of the product (the sums over rows of a Pattention's
/// backward pass, with as many rows as parameter tokens, ran 4% faster at `tiny` shapes). With
/// many rows a packed panel, contiguous in the L1 cache, wins; and where B's rows fall in fewer
/// than 4 of L1's sets (a row stride of 4 KiB, or of 6 KiB as with 1,536 columns, puts them in
/// one or two), a panel cannot stay in L1, so those are packed too.
pub(crate) fn b_operand(isa: Isa, b: View<'_>, k: usize, n: usize, rows: usize) -> PackedB<'_> {
    let in_place = b.col_stride == 1
        && n.is_multiple_of(isa.nr())
        && k > 0
        && rows <= IN_PLACE_MAX_ROWS
        && l1_sets_reached(b.row_stride) >= 4;
    if !in_place {
        return pack_b(isa, b, k, n);
    }
    assert!(b.covers(k, n), "b_operand: operand too short for {k}x{n}");
    PackedB {
        isa,
        blocking: isa.blocking(),
        copy_a: None,
        data: Cow::Borrowed(b.data),
        ldb: b.row_stride,
        panel_stride: isa.nr(),
        k,
        n,
    }
}

/// Into how many of the L1 data cache's sets a run of values `stride` floats apart falls (by
/// the sets their lines start in): all of them for a stride that is not a whole number of
/// lines, one for a multiple of (sets × line), 4 KiB on every current x86 core.
fn l1_sets_reached(stride: usize) -> usize {
    let l1 = crate::processor::cache_info().l1d;
    let sets = l1.sets();
    let bytes = stride * std::mem::size_of::<f32>();
    if !bytes.is_multiple_of(l1.line) {
        return sets;
    }
    let lines = (bytes / l1.line) % sets;
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    sets / gcd(lines, sets)
}

/// An element type a product can write into: `f32`, or a not yet initialised
/// `MaybeUninit<f32>`, which a product only overwrites (never with `accumulate`), so that an
/// output need not be zero-filled before the kernels write every value of it.
pub(crate) trait OutputElem: Send + Sized {
    /// Whether the elements hold values a product may read (to accumulate into them).
    const INITIALISED: bool;
}

impl OutputElem for f32 {
    const INITIALISED: bool = true;
}

impl OutputElem for MaybeUninit<f32> {
    const INITIALISED: bool = false;
}

/// c (rows × n, row-major, row stride `ldc`) = a·b, or c += a·b (continuing each element's
/// chain) when `accumulate`; on the calling thread. Into an uninitialised `c` (only without
/// `accumulate`), every element (i, j) with j < n is written; a gap between n and ldc is not.
pub(crate) fn gemm_rows<T: OutputElem>(
    a: View<'_>,
    rows: usize,
    b: &PackedB<'_>,
    c: &mut [T],
    ldc: usize,
    accumulate: bool,
) {
    let n = b.n;
    assert!(T::INITIALISED || !accumulate, "gemm_rows: accumulating into an uninitialised output");
    if rows == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && c.len() >= (rows - 1) * ldc + n, "gemm_rows: output too short");
    assert!(a.covers(rows, b.k), "gemm_rows: operand too short for {rows}x{}", b.k);
    // SAFETY: f32 and MaybeUninit<f32> share a layout; the block is rows × n of C at stride
    // ldc, inside `c` (checked above), and A covers rows × k.
    unsafe {
        gemm_block(
            a,
            rows,
            b,
            0..n.div_ceil(b.blocking.nr),
            c.as_mut_ptr() as *mut f32,
            ldc,
            accumulate,
        )
    }
}

thread_local! {
    /// Per-thread buffer for packed blocks of A, kept between products.
    static A_BLOCKS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether blocks of A are copied into contiguous micro-panels (as BLIS always does) rather
/// than read in place through their strides, for a product over `k` with `n` columns of B.
///
/// In place saves the copy, which costs a good share of the product when few panels of B reuse
/// it (a Pattention's blocks of rows against a few hundred columns: copying made the model's
/// steps 2% slower). A copy pays in two cases:
///
/// - the MR rows a micro-panel reads at one step fall in so few L1 sets that they cannot all
///   stay there: with 14-row tiles and a stride of 4 KiB (1,024 columns), which puts all 14 in
///   one 8-way set, a product ran at 0.8× of its speed without the copy. With 8 rows in 8
///   ways, in place was still 2% faster;
/// - a transposed A (the Aᵀ·G of a backward pass) whose steps lie a cache line or more apart:
///   read in place, its micro-panel takes one line per step, KC lines, which beside the KC × NR
///   micro-panel of B that the loop keeps in L1 no longer fit in the ways that C leaves (with
///   a single way, or none reported, there is no such budget and the rule stays out). Aᵀ·G at
///   384 × 2048 × 1536 on Zen 4 ran at 123–126 GFLOP/s in place against 155–170 copied with
///   AVX2 (KC 320: 20 KiB of lines beside 20 KiB of B in a 32 KiB L1), and at 151–161
///   against 176–184 with AVX-512 (KC 160: 10 KiB beside 20 KiB).
fn pack_a_blocks(a: &View<'_>, k: usize, n: usize, blocking: &Blocking) -> bool {
    if n < 4 * blocking.nr {
        return false;
    }
    let l1 = crate::processor::cache_info().l1d;
    let step = if a.col_stride == 1 { a.row_stride } else { a.col_stride };
    let crowded_sets = blocking.mr.div_ceil(l1_sets_reached(step)) > l1.ways;
    let f32_size = std::mem::size_of::<f32>();
    let line_per_step = a.col_stride != 1 && a.col_stride * f32_size >= l1.line && l1.ways > 1;
    let kc = blocking.kc.min(k);
    let beside_b = kc * l1.line + kc * blocking.nr * f32_size > l1.size / l1.ways * (l1.ways - 1);
    crowded_sets || (line_per_step && beside_b)
}

/// C[0..rows, panels·NR] (row stride ldc) = a·b (or += when `accumulate`), blocked as
/// `b.blocking` says: B's columns in slabs of NC, k in blocks of KC, A's rows in blocks of MC
/// (copied into micro-panels, see [`pack_a_blocks`]), then each NR-column micro-panel of B
/// against every MR-row micro-panel of A. Every k-block continues the chains of the ones
/// before it, so the bits are those of one chain per element whatever the blocks.
///
/// # Safety
/// `c` must be writable for `rows` rows at stride `ldc` over the columns of `panels` (the last
/// panel up to b.n), and readable there when `accumulate`; A must cover rows × b.k.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block(
    a: View<'_>,
    rows: usize,
    b: &PackedB<'_>,
    panels: std::ops::Range<usize>,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let (k, n, isa) = (b.k, b.n, b.isa);
    let Blocking { mr, nr, kc: kc_max, mc: mc_max, nc } = b.blocking;
    if k == 0 {
        if !accumulate {
            let (first, last) = (panels.start * nr, (panels.end * nr).min(n));
            for i in 0..rows {
                // SAFETY: row i's columns first..last lie inside C (the caller's contract).
                unsafe { std::ptr::write_bytes(c.add(i * ldc + first), 0, last - first) };
            }
        }
        return;
    }
    let pack_all = b
        .copy_a
        .unwrap_or_else(|| pack_a_blocks(&a, k, (panels.end - panels.start) * nr, &b.blocking));
    let mc_max = mc_max.min(rows.next_multiple_of(mr));
    let panels_per_slab = (nc / nr).max(1);
    let mut packed_a = A_BLOCKS.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
    let need = if pack_all { mc_max * kc_max.min(k) } else { 0 };
    if packed_a.len() < need {
        packed_a.resize(need, 0.0);
    }
    let mut slab = panels.start;
    while slab < panels.end {
        let slab_end = (slab + panels_per_slab).min(panels.end);
        let mut p0 = 0;
        while p0 < k {
            let kc = kc_max.min(k - p0);
            // The first k-block starts each chain from 0 (or from C when accumulating), and
            // the later ones continue it from the values the earlier ones wrote.
            let load_c = accumulate || p0 > 0;
            let mut i0 = 0;
            while i0 < rows {
                let block_rows = mc_max.min(rows - i0);
                let tiles = block_rows.div_ceil(mr);
                if pack_all {
                    for (r, panel) in packed_a.chunks_exact_mut(mr * kc).take(tiles).enumerate() {
                        let tile_rows = (block_rows - r * mr).min(mr);
                        pack_a_panel(&a, i0 + r * mr, tile_rows, p0, kc, mr, panel);
                    }
                }
                for q in slab..slab_end {
                    let b_panel =
                        &b.data[q * b.panel_stride + p0 * b.ldb..][..(kc - 1) * b.ldb + nr];
                    let cols = nr.min(n - q * nr);
                    for r in 0..tiles {
                        let tile_rows = (block_rows - r * mr).min(mr);
                        let a_tile = if pack_all {
                            (packed_a[r * mr * kc..].as_ptr(), 1, mr)
                        } else {
                            let offset = (i0 + r * mr) * a.row_stride + p0 * a.col_stride;
                            (a.data[offset..].as_ptr(), a.row_stride, a.col_stride)
                        };
                        // SAFETY: A covers rows × k (so every (i, p), i < tile_rows, of an
                        // in-place panel is inside it), a copied panel holds kc·MR values, the
                        // B panel kc rows of NR values at stride ldb, and the tile reads (when
                        // load_c, values an earlier k-block or the caller wrote) and writes
                        // tile_rows rows of `cols` values at stride ldc from this corner,
                        // inside C.
                        unsafe {
                            run_tile(
                                isa,
                                kc,
                                a_tile,
                                (b_panel, b.ldb),
                                c.add((i0 + r * mr) * ldc + q * nr),
                                ldc,
                                tile_rows,
                                cols,
                                load_c,
                            )
                        };
                    }
                }
                i0 += block_rows;
            }
            p0 += kc;
        }
        slab = slab_end;
    }
    A_BLOCKS.with(|cell| {
        let mut kept = cell.borrow_mut();
        if kept.len() < packed_a.len() {
            *kept = packed_a;
        }
    });
}

/// Rows first..first+rows (at most MR) of A over k in p0..p0+kc, laid out as the kernels read
/// a transposed A: value (i, p) at p·MR + i. A panel of fewer than MR rows keeps its stride and
/// leaves the values past its rows as they were: the kernel for a short tile reads only its
/// rows.
fn pack_a_panel(
    a: &View<'_>,
    first: usize,
    rows: usize,
    p0: usize,
    kc: usize,
    mr: usize,
    out: &mut [f32],
) {
    if a.row_stride == 1 {
        // A transposed: the values of one step are contiguous. A copy of a length known at
        // compile time is a few register moves; one of `rows` values is a call to memcpy per
        // step, which cost 5% of a `tiny` training step at 16 × 256 held to AVX2.
        let steps = out.chunks_exact_mut(mr).take(kc).enumerate();
        let src = |p: usize| &a.data[first + (p0 + p) * a.col_stride..];
        match (rows, mr) {
            (6, 6) => steps.for_each(|(p, dst)| copy_step::<6>(src(p), dst)),
            (8, 8) => steps.for_each(|(p, dst)| copy_step::<8>(src(p), dst)),
            _ => steps.for_each(|(p, dst)| dst[..rows].copy_from_slice(&src(p)[..rows])),
        }
    } else {
        for i in 0..rows {
            let start = (first + i) * a.row_stride + p0 * a.col_stride;
            for p in 0..kc {
                out[p * mr + i] = a.data[start + p * a.col_stride];
            }
        }
    }
}

/// The first `N` values of `src` into `dst`, which holds `N`.
#[inline(always)]
fn copy_step<const N: usize>(src: &[f32], dst: &mut [f32]) {
    let src: &[f32; N] = src[..N].try_into().expect("N values");
    dst.copy_from_slice(src);
}

/// One tile of `tile_rows` ≤ MR rows and `cols` ≤ NR columns: the kernel for that many rows,
/// through a scratch tile when it is short of columns (with the same arithmetic).
///
/// # Safety
/// `c` must be writable for `tile_rows` rows of `cols` values at stride `ldc`, and readable
/// there when `load_c`; A must be readable at (i, p) for i < tile_rows, p < kc through its
/// strides, and the B panel must hold kc rows of NR values at stride ldb.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn run_tile(
    isa: Isa,
    kc: usize,
    a: (*const f32, usize, usize),
    b: (&[f32], usize),
    c: *mut f32,
    ldc: usize,
    tile_rows: usize,
    cols: usize,
    load_c: bool,
) {
    let nr = b_width(isa);
    // A tile short of rows runs the kernel for the rows it has: the same chains, without the
    // arithmetic on padding (at 128 rows, AVX2's last tile has 2 of its 6).
    if cols == nr {
        return kernel(isa, tile_rows, kc, a, b, c, ldc, load_c);
    }
    let mut tile = [0.0f32; MAX_TILE];
    if load_c {
        for i in 0..tile_rows {
            std::ptr::copy_nonoverlapping(c.add(i * ldc), tile[i * nr..].as_mut_ptr(), cols);
        }
    }
    kernel(isa, tile_rows, kc, a, b, tile.as_mut_ptr(), nr, load_c);
    for i in 0..tile_rows {
        std::ptr::copy_nonoverlapping(tile[i * nr..].as_ptr(), c.add(i * ldc), cols);
    }
}

/// NR of a kernel family: two vectors.
const fn b_width(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 32,
        Isa::Avx2Fma => 16,
    }
}

/// The kernel of `isa` for `mr` rows, at most the tile's (see `run_tile` for the safety
/// contract).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn kernel(
    isa: Isa,
    mr: usize,
    kc: usize,
    a: (*const f32, usize, usize),
    b: (&[f32], usize),
    c: *mut f32,
    ldc: usize,
    load_c: bool,
) {
    let (a, a_rs, a_cs) = a;
    let (b, ldb) = (b.0.as_ptr(), b.1);
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! rows {
            ($kernel:ident: $($rows:literal)*) => {
                match mr {
                    $($rows => x86::$kernel::<$rows>(kc, a, a_rs, a_cs, b, ldb, c, ldc, load_c),)*
                    _ => unreachable!("no {isa:?} kernel with {mr} rows"),
                }
            };
        }
        match isa {
            Isa::Avx512 => rows!(kernel_avx512: 1 2 3 4 5 6 7 8),
            Isa::Avx2Fma => rows!(kernel_avx2: 1 2 3 4 5 6),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!(
        "no packed GEMM kernel here: {isa:?} {mr} {kc} {a:?} {a_rs} {a_cs} {b:?} {ldb} {c:?}"
    );
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// C[0..MR, 0..16] (stride ldc) = (load_c ? C : 0) + A·B over kc, one FMA per term; row p
    /// of the B panel starts at b + p·ldb.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel_avx2<const MR: usize>(
        kc: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        if load_c {
            for (i, row) in acc.iter_mut().enumerate() {
                row[0] = _mm256_loadu_ps(c.add(i * ldc));
                row[1] = _mm256_loadu_ps(c.add(i * ldc + 8));
            }
        }
        for p in 0..kc {
            let b0 = _mm256_loadu_ps(b.add(p * ldb));
            let b1 = _mm256_loadu_ps(b.add(p * ldb + 8));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_broadcast_ss(&*a.add(i * a_rs + p * a_cs));
                row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(i * ldc), row[0]);
            _mm256_storeu_ps(c.add(i * ldc + 8), row[1]);
        }
    }

    /// C[0..MR, 0..32] (stride ldc) = (load_c ? C : 0) + A·B over kc, one FMA per term; row p of
    /// the B panel starts at b + p·ldb.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel_avx512<const MR: usize>(
        kc: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if load_c {
            for (i, row) in acc.iter_mut().enumerate() {
                row[0] = _mm512_loadu_ps(c.add(i * ldc));
                row[1] = _mm512_loadu_ps(c.add(i * ldc + 16));
            }
        }
        for p in 0..kc {
            let b0 = _mm512_loadu_ps(b.add(p * ldb));
            let b1 = _mm512_loadu_ps(b.add(p * ldb + 16));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*a.add(i * a_rs + p * a_cs));
                row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(i * ldc), row[0]);
            _mm512_storeu_ps(c.add(i * ldc + 16), row[1]);
        }
    }
}

/// Below this many multiply-adds a product runs on the calling thread.
pub(crate) const PARALLEL_MIN_MACS: usize = 1 << 18;

/// Tasks a parallel product is cut into: enough that work stealing evens out the threads'
/// shares on any small thread count (24 tasks of equal size share out evenly between 1, 2, 3,
/// 4, 6, 8 or 12 threads), few enough that each still reuses its blocks.
const TASKS: usize = 24;

/// How the output of an (m × k)·(k × n) product is cut into tasks: a grid of row ranges by
/// column ranges. It depends on the shape and the tile only, never on the thread count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Split {
    /// Row tiles (MR rows each, the last maybe partial) and NR-wide panels of B.
    tiles: usize,
    panels: usize,
    row_tasks: usize,
    column_tasks: usize,
}

impl Split {
    /// Rows come in runs of whole tiles (at least two), as even as whole tiles allow; where
    /// that gives fewer than half the tasks (a product with few rows, as the backward pass's
    /// sums over a few hundred parameter tokens can be), the columns are split as well, so
    /// every thread has work.
    pub(crate) fn new(blocking: &Blocking, m: usize, k: usize, n: usize) -> Split {
        let tiles = m.div_ceil(blocking.mr).max(1);
        let panels = n.div_ceil(blocking.nr).max(1);
        if m * k * n < PARALLEL_MIN_MACS {
            return Split { tiles, panels, row_tasks: 1, column_tasks: 1 };
        }
        let row_tasks = (tiles / 2).clamp(1, TASKS);
        let column_tasks = if row_tasks < TASKS / 2 { (TASKS / row_tasks).min(panels) } else { 1 };
        Split { tiles, panels, row_tasks, column_tasks }
    }

    pub(crate) fn tasks(&self) -> usize {
        self.row_tasks * self.column_tasks
    }

    /// Task `task`'s tiles and panels: the `i`-th of `parts` near-equal runs of `count`.
    fn ranges(&self, task: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let run = |i: usize, parts: usize, count: usize| i * count / parts..(i + 1) * count / parts;
        let (row, column) = (task / self.column_tasks, task % self.column_tasks);
        (run(row, self.row_tasks, self.tiles), run(column, self.column_tasks, self.panels))
    }
}

/// c (m × n, row-major) = a·b (or += when `accumulate`), B prepared once (`b_operand`) and the
/// rows of C cut into blocks computed in parallel. An uninitialised `c` comes back fully
/// written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: OutputElem>(
    isa: Isa,
    a: View<'_>,
    b: View<'_>,
    m: usize,
    k: usize,
    n: usize,
    c: &mut [T],
    accumulate: bool,
) {
    let packed = b_operand(isa, b, k, n, m);
    gemm_packed(a, m, &packed, c, accumulate);
}

/// C's data shared by the tasks of one product, each of which writes its own rectangle.
struct SharedOutput(*mut f32);
// SAFETY: the tasks write disjoint rectangles of C, and `gemm_packed` outlives them all.
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY (for the callers): offsets stay inside the m × n output.
        self.0.wrapping_add(offset)
    }
}

/// As [`gemm`], with B already packed: the tasks of [`split`] in parallel.
pub(crate) fn gemm_packed<T: OutputElem>(
    a: View<'_>,
    m: usize,
    b: &PackedB<'_>,
    c: &mut [T],
    accumulate: bool,
) {
    let n = b.n;
    if m == 0 || n == 0 {
        return;
    }
    let split = Split::new(&b.blocking, m, b.k, n);
    if split.tasks() == 1 {
        return gemm_rows(a, m, b, c, n, accumulate);
    }
    assert!(
        T::INITIALISED || !accumulate,
        "gemm_packed: accumulating into an uninitialised output"
    );
    assert!(c.len() >= m * n, "gemm_packed: output too short");
    assert!(a.covers(m, b.k), "gemm_packed: operand too short for {m}x{}", b.k);
    let mr = b.blocking.mr;
    let output = SharedOutput(c.as_mut_ptr() as *mut f32);
    (0..split.tasks()).into_par_iter().for_each(|task| {
        let (tiles, panels) = split.ranges(task);
        let first_row = tiles.start * mr;
        let rows = (tiles.end * mr).min(m) - first_row;
        // SAFETY: each task writes its own rows × panels rectangle of the m × n output (checked
        // above), and A covers m × k.
        unsafe {
            gemm_block(
                a.rows_from(first_row),
                rows,
                b,
                panels,
                output.at(first_row * n),
                n,
                accumulate,
            )
        };
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::randn;

    /// The contract: one `mul_add` chain per element, in order.
    fn chain(a: View<'_>, b: View<'_>, m: usize, k: usize, n: usize, c0: &[f32]) -> Vec<f32> {
        let mut out = c0.to_vec();
        for i in 0..m {
            for j in 0..n {
                let mut acc = out[i * n + j];
                for p in 0..k {
                    acc = a.at(i, p).mul_add(b.at(p, j), acc);
                }
                out[i * n + j] = acc;
            }
        }
        out
    }

    fn kernels() -> Vec<Isa> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                out.push(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                out.push(Isa::Avx2Fma);
            }
        }
        out
    }

    #[test]
    fn every_kernel_gives_the_bits_of_one_fma_chain_per_element() {
        if kernels().is_empty() {
            eprintln!("packed GEMM: no AVX2/AVX-512 on this processor; reference path only");
        }
        // Shapes with edges in every direction, k across several k-blocks, both layouts, and
        // widths that are whole panels (a row-major B then read in place).
        let shapes = [
            (1, 1, 1),
            (4, 0, 5),
            (7, 5, 3),
            (13, 300, 37),
            (50, 513, 70),
            (200, 64, 129),
            (9, 200, 96),
            (21, 450, 64),
        ];
        for isa in kernels() {
            for &(m, k, n) in &shapes {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let a_data = crate::testing::values(&randn(&[m * k], (m + k) as u64));
                    let b_data = crate::testing::values(&randn(&[k * n], (k + n) as u64));
                    let c0 = crate::testing::values(&randn(&[m * n], 3));
                    let a = View::new(&a_data, k, m, ta);
                    let b = View::new(&b_data, n, k, tb);
                    for accumulate in [false, true] {
                        let start = if accumulate { c0.clone() } else { vec![0.0; m * n] };
                        let mut c = start.clone();
                        gemm(isa, a, b, m, k, n, &mut c, accumulate);
                        let want = chain(a, b, m, k, n, &start);
                        let what = format!("{isa:?} {m}x{k}x{n} trans {ta} {tb} acc {accumulate}");
                        assert!(
                            c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "{what}"
                        );
                        if !accumulate {
                            // Into an output that was never written: NaN stands in for whatever
                            // memory held, and must not survive anywhere.
                            let mut fresh = vec![MaybeUninit::new(f32::NAN); m * n];
                            gemm(isa, a, b, m, k, n, &mut fresh, false);
                            // SAFETY: every element was initialised (to NaN, then the product).
                            let fresh: Vec<f32> =
                                fresh.iter().map(|v| unsafe { v.assume_init() }).collect();
                            assert!(
                                fresh.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                                "{what}, into an unwritten output"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_tile_blocking_copy_and_split_gives_the_same_bits() {
        // The blocking a processor's caches pick, and others as another processor could: the
        // tile height of each kernel family, blocks smaller than the product in each direction,
        // A copied or read in place; products that split over rows or over columns; and a last
        // tile short of each number of rows (each of the short kernels).
        for isa in kernels() {
            let base = isa.blocking();
            let (nr, heights) = match isa {
                Isa::Avx512 => (32, vec![8]),
                Isa::Avx2Fma => (16, vec![6]),
            };
            assert_eq!(base.nr, nr);
            assert!(heights.contains(&base.mr), "{isa:?} has no kernel for {base:?}");
            let mut shapes = vec![(50, 513, 70), (37, 300, 200), (9, 700, 96), (200, 64, 129)];
            shapes.extend((1..base.mr).map(|short| (2 * base.mr + short, 70, 40)));
            for &(m, k, n) in &shapes {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let a_data = crate::testing::values(&randn(&[m * k], (m + k) as u64));
                    let b_data = crate::testing::values(&randn(&[k * n], (k + n) as u64));
                    let a = View::new(&a_data, k, m, ta);
                    let b = View::new(&b_data, n, k, tb);
                    let want = chain(a, b, m, k, n, &vec![0.0; m * n]);
                    for &mr in &heights {
                        for (kc, mc, nc) in
                            [(16, mr, nr), (100, 3 * mr, 2 * nr), (base.kc, base.mc, base.nc)]
                        {
                            for copy_a in [Some(true), Some(false), None] {
                                let mut packed = b_operand(isa, b, k, n, m);
                                packed.blocking = Blocking { mr, nr, kc, mc, nc };
                                packed.copy_a = copy_a;
                                let mut c = vec![f32::NAN; m * n];
                                gemm_packed(a, m, &packed, &mut c, false);
                                let what = format!(
                                    "{isa:?} {m}x{k}x{n} trans {ta} {tb} {:?} copy {copy_a:?}",
                                    packed.blocking
                                );
                                assert!(
                                    c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                                    "{what}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_model_s_products_give_every_thread_work() {
        // Rows of a step (batch × seq, 512 to 2048) and the backward pass's sums over rows
        // (as many rows as parameter tokens, 128 to 1536), against 128 to 1536 columns: at
        // least eight tasks each, whatever the tile; a handful of rows splits over columns.
        for isa in [VectorIsa::Avx512, VectorIsa::Avx2] {
            let blocking = blocking(&crate::processor::CacheInfo::DEFAULT, isa);
            for m in [8, 128, 384, 512, 1536, 2048] {
                for k in [128, 384, 1536, 2048] {
                    for n in [128, 384, 1536] {
                        if m * k * n < PARALLEL_MIN_MACS {
                            continue;
                        }
                        let split = Split::new(&blocking, m, k, n);
                        let least = if m >= 128 { 8 } else { 4 };
                        assert!(split.tasks() >= least, "{isa:?} {m}x{k}x{n}: {split:?}");
                        // Every task has rows and columns, and together they cover C once.
                        let mut covered = 0;
                        for task in 0..split.tasks() {
                            let (tiles, panels) = split.ranges(task);
                            assert!(!tiles.is_empty() && !panels.is_empty(), "{split:?}");
                            covered += tiles.len() * panels.len();
                        }
                        assert_eq!(covered, split.tiles * split.panels, "{split:?}");
                    }
                }
            }
            // Below the parallel threshold, one task.
            assert_eq!(Split::new(&blocking, 10, 10, 10).tasks(), 1);
        }
    }

    #[test]
    fn a_product_in_row_blocks_or_in_k_blocks_has_the_same_bits() {
        for isa in kernels() {
            let (m, k, n) = (97, 700, 45);
            let a_data = crate::testing::values(&randn(&[m * k], 1));
            let b_data = crate::testing::values(&randn(&[k * n], 2));
            let (a, b) = (View::new(&a_data, k, m, false), View::new(&b_data, n, k, false));
            let mut whole = vec![0.0; m * n];
            gemm(isa, a, b, m, k, n, &mut whole, false);
            // Rows one block at a time on this thread.
            let packed = pack_b(isa, b, k, n);
            let mut blocks = vec![0.0; m * n];
            for first in (0..m).step_by(10) {
                let rows = 10.min(m - first);
                gemm_rows(a.rows_from(first), rows, &packed, &mut blocks[first * n..], n, false);
            }
            assert_eq!(whole, blocks, "{isa:?} row blocks");
            // The reduction in two halves, the second continuing the first's chains.
            let half = 333;
            let a_left = View { data: &a_data, row_stride: k, col_stride: 1 };
            let a_right = View { data: &a_data[half..], row_stride: k, col_stride: 1 };
            let mut split = vec![0.0; m * n];
            gemm(isa, a_left, b, m, half, n, &mut split, false);
            gemm(
                isa,
                a_right,
                View { data: &b_data[half * n..], ..b },
                m,
                k - half,
                n,
                &mut split,
                true,
            );
            assert_eq!(whole, split, "{isa:?} k halves");
        }
    }
}
