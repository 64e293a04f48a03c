//! The fast CPU GEMM: a packed register-tile kernel (AVX2 + FMA, or AVX-512) chosen at run
//! time, with the ndarray/matrixmultiply product in `cpu.rs` as the reference it is tested
//! against and the fallback on processors without those instructions.
//!
//! Why our own: the model's products are thin (T·B rows by a few hundred columns, reduced over
//! a few hundred terms), where a general GEMM spends much of its time packing both operands
//! again in every thread and every call. Here A is read in place through its strides (only a
//! partial last tile of rows is copied), B is packed once per product and shared by the threads
//! (or read in place, for a row-major B under a product with few rows: see `b_operand`), and the
//! caller can keep a packed B (a Pattention's key or value tokens) across many row blocks.
//!
//! The arithmetic, which is the contract the tests check bit for bit: every element of C is one
//! chain of fused multiply-adds over the reduction index in order,
//!
//! ```text
//! c[i,j] = fma(a[i,k−1], b[k−1,j], … fma(a[i,1], b[1,j], fma(a[i,0], b[0,j], c₀)))
//! ```
//!
//! with c₀ = 0, or the previous value of c[i,j] when accumulating. Blocking over k reloads the
//! accumulators from C and continues the same chain, and a tile at the edge of C runs the same
//! chain in a scratch tile, so an element's bits depend on neither the blocking, nor the thread
//! count, nor where the element falls in a tile; and appending terms whose a (or b) is an exact
//! zero, as exact growth of a Pattention does, leaves every bit of C unchanged.

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

const AVX512_MR: usize = 8;

/// The register tile of a kernel: MR rows of C by NR columns, and the depth of one k-block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// 8 × 32 tile in zmm registers.
    Avx512,
    /// 6 × 16 tile in ymm registers.
    Avx2Fma,
}

impl Isa {
    const fn mr(self) -> usize {
        match self {
            Isa::Avx512 => AVX512_MR,
            Isa::Avx2Fma => 6,
        }
    }
    const fn nr(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2Fma => 16,
        }
    }
    /// k-block depth: a packed B panel (KC × NR) stays in the L1 cache.
    const fn kc(self) -> usize {
        match self {
            Isa::Avx512 => 192,
            Isa::Avx2Fma => 256,
        }
    }
}

/// The kernel this process runs: `None` where the processor has neither AVX-512 nor AVX2 and
/// FMA, or where `TOKENFORMER_FUSED` turns `matmul` off (then the reference path runs).
pub(crate) fn isa() -> Result<Option<Isa>> {
    if !crate::fused::enabled("matmul")? {
        return Ok(None);
    }
    Ok(detected_isa())
}

/// The best kernel this processor can run.
fn detected_isa() -> Option<Isa> {
    static ISA: OnceLock<Option<Isa>> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Some(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Some(Isa::Avx2Fma);
            }
        }
        None
    })
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
    PackedB { isa, data: Cow::Owned(data), ldb: nr, panel_stride: k * nr, k, n }
}

/// Products whose A has at most this many rows read a row-major B in place (see
/// [`b_operand`]).
const IN_PLACE_MAX_ROWS: usize = 512;

/// B for a product with `rows` rows of A: read in place where that is faster than a packed copy,
/// packed otherwise. In place needs a row-major B whose width is a multiple of NR, and pays
/// when A has few rows: then few row tiles share each panel, and the copy, which brings B in
/// from memory once more, is a large share of the product (the sums over rows of a Pattention's
/// backward pass, with as many rows as parameter tokens, ran 4% faster at `tiny` shapes). With
/// many rows a packed panel, contiguous in the L1 cache, wins; and a row stride that is a
/// multiple of 4 KiB puts every row of a panel in the same cache set, so those are packed too.
pub(crate) fn b_operand(isa: Isa, b: View<'_>, k: usize, n: usize, rows: usize) -> PackedB<'_> {
    let in_place = b.col_stride == 1
        && n.is_multiple_of(isa.nr())
        && k > 0
        && rows <= IN_PLACE_MAX_ROWS
        && !b.row_stride.is_multiple_of(1024);
    if !in_place {
        return pack_b(isa, b, k, n);
    }
    assert!(b.covers(k, n), "b_operand: operand too short for {k}x{n}");
    PackedB { isa, data: Cow::Borrowed(b.data), ldb: b.row_stride, panel_stride: isa.nr(), k, n }
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
///
/// A is read in place through its strides (a packed copy would cost as much as the product
/// when n is small); only a last, partial panel of rows is copied into a zero-padded tile.
pub(crate) fn gemm_rows<T: OutputElem>(
    a: View<'_>,
    rows: usize,
    b: &PackedB<'_>,
    c: &mut [T],
    ldc: usize,
    accumulate: bool,
) {
    let (k, n, isa) = (b.k, b.n, b.isa);
    assert!(T::INITIALISED || !accumulate, "gemm_rows: accumulating into an uninitialised output");
    if rows == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && c.len() >= (rows - 1) * ldc + n, "gemm_rows: output too short");
    // f32 and MaybeUninit<f32> share a layout; from here on C is written (and, once written,
    // read) only through this pointer, inside the bounds just checked.
    let c = c.as_mut_ptr() as *mut f32;
    if k == 0 {
        if !accumulate {
            for i in 0..rows {
                // SAFETY: row i's first n values lie inside `c` (checked above).
                unsafe { std::ptr::write_bytes(c.add(i * ldc), 0, n) };
            }
        }
        return;
    }
    assert!(a.covers(rows, k), "gemm_rows: operand too short for {rows}x{k}");
    let (mr, nr, kc_max) = (isa.mr(), isa.nr(), isa.kc());
    let full_panels = rows / mr;
    let edge_rows = rows - full_panels * mr;
    // Only a product whose row count is not a multiple of MR needs the edge tile.
    let mut edge = if edge_rows > 0 { vec![0.0f32; mr * kc_max.min(k)] } else { Vec::new() };
    let mut p0 = 0;
    while p0 < k {
        let kc = kc_max.min(k - p0);
        if edge_rows > 0 {
            // The last rows, zero-padded to MR, laid out as the kernel reads a transposed A.
            let first = full_panels * mr;
            for p in 0..kc {
                for i in 0..mr {
                    edge[p * mr + i] = if i < edge_rows { a.at(first + i, p0 + p) } else { 0.0 };
                }
            }
        }
        // The first k-block starts each chain from 0 (or from C when accumulating), and the
        // later ones continue it from the values the earlier ones wrote.
        let load_c = accumulate || p0 > 0;
        for q in 0..n.div_ceil(nr) {
            let b_panel = &b.data[q * b.panel_stride + p0 * b.ldb..][..(kc - 1) * b.ldb + nr];
            let cols = nr.min(n - q * nr);
            for r in 0..full_panels + (edge_rows > 0) as usize {
                let (a_ptr, a_rs, a_cs, tile_rows) = if r < full_panels {
                    let offset = r * mr * a.row_stride + p0 * a.col_stride;
                    (a.data[offset..].as_ptr(), a.row_stride, a.col_stride, mr)
                } else {
                    (edge.as_ptr(), 1, mr, edge_rows)
                };
                // SAFETY: `a.covers(rows, k)` bounds every (i, p) the kernel reads of a full
                // panel, the edge tile holds kc·MR values, the B panel kc rows of NR values at
                // stride ldb, and the tile reads (when load_c, values an earlier k-block or the
                // caller wrote) and writes tile_rows rows of `cols` values at stride ldc from
                // this corner, inside C.
                unsafe {
                    run_tile(
                        isa,
                        kc,
                        (a_ptr, a_rs, a_cs),
                        (b_panel, b.ldb),
                        c.add(r * mr * ldc + q * nr),
                        ldc,
                        tile_rows,
                        cols,
                        load_c,
                    )
                };
            }
        }
        p0 += kc;
    }
}

/// One MR × NR tile (a partial one through a scratch tile, with the same arithmetic).
///
/// # Safety
/// `c` must be writable for `tile_rows` rows of `cols` values at stride `ldc`, and readable
/// there when `load_c`; A must be readable at (i, p) for i < MR, p < kc through its strides,
/// and the B panel must hold kc rows of NR values at stride ldb.
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
    let (mr, nr) = (isa.mr(), isa.nr());
    if tile_rows == mr && cols == nr {
        return kernel(isa, kc, a, b, c, ldc, load_c);
    }
    let mut tile = [0.0f32; AVX512_MR * 32];
    if load_c {
        for i in 0..tile_rows {
            std::ptr::copy_nonoverlapping(c.add(i * ldc), tile[i * nr..].as_mut_ptr(), cols);
        }
    }
    kernel(isa, kc, a, b, tile.as_mut_ptr(), nr, load_c);
    for i in 0..tile_rows {
        std::ptr::copy_nonoverlapping(tile[i * nr..].as_ptr(), c.add(i * ldc), cols);
    }
}

/// The full-tile kernel of `isa` (see `run_tile` for the safety contract).
#[inline(always)]
unsafe fn kernel(
    isa: Isa,
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
    match isa {
        Isa::Avx512 => x86::kernel_avx512::<AVX512_MR>(kc, a, a_rs, a_cs, b, ldb, c, ldc, load_c),
        Isa::Avx2Fma => x86::kernel_6x16(kc, a, a_rs, a_cs, b, ldb, c, ldc, load_c),
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no packed GEMM kernel here: {isa:?} {kc} {a:?} {a_rs} {a_cs} {b:?} {ldb} {c:?}");
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// C[0..6, 0..16] (stride ldc) = (load_c ? C : 0) + A·B over kc, one FMA per term; row p of
    /// the B panel starts at b + p·ldb.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn kernel_6x16(
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
        let mut acc = [[_mm256_setzero_ps(); 2]; 6];
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

/// How the rows of an m-row product are cut into tasks: depends only on the shape.
pub(crate) fn row_block(isa: Isa, m: usize, k: usize, n: usize) -> usize {
    if m * k * n < PARALLEL_MIN_MACS {
        return m.max(1);
    }
    // About 16 blocks, so that work stealing evens out the threads' shares.
    m.div_ceil(16).next_multiple_of(isa.mr()).max(2 * isa.mr())
}

/// c (m × n, row-major) = a·b (or += when `accumulate`), B prepared once (`b_operand`) and the rows of C cut
/// into blocks computed in parallel. An uninitialised `c` comes back fully written.
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

/// As [`gemm`], with B already packed.
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
    let block = row_block(b.isa, m, b.k, n);
    if block >= m {
        return gemm_rows(a, m, b, c, n, accumulate);
    }
    c[..m * n].par_chunks_mut(block * n).enumerate().for_each(|(i, c_block)| {
        let rows = c_block.len() / n;
        gemm_rows(a.rows_from(i * block), rows, b, c_block, n, accumulate)
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
