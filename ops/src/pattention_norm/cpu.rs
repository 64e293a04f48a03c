//! CPU kernels for Θ: one fused pass per row forward, one per row backward.
//!
//! Θ runs on every Pattention score, several times a step (forward, and again in the backward
//! pass, which recomputes S), and before these kernels vectorised it took 40% of a `tiny`
//! training step. Two things make the row loops fast while keeping exact growth:
//!
//! - Row reductions (the norm, the dot products) run over 16 interleaved lanes: element i is
//!   added into lane i mod 16, in order, and the lanes are combined in one fixed pairwise order.
//!   The grouping of the old terms does not depend on the row length, so appending exact zeros
//!   (growth) changes no bit, and the lanes map onto vector registers.
//! - The row loops are compiled a second time for AVX-512 and for AVX2 (each with FMA) and
//!   picked at run time. Rust never contracts a·b + c into a fused multiply-add by itself, and
//!   the fused ones GELU's polynomials ask for (`mul_add`) are one rounding in every variant,
//!   so every variant computes the same bits; only the width of the registers differs. The
//!   GELU loops go through `crate::vector::Real`: the plain path runs them on `f32`, the wide
//!   ones on groups of four registers advanced together, one intrinsic per operation.
//!
//! The row functions are shared with the fused Pattention op, which is how it gets the very
//! bits of this op.

use super::Theta;
use crate::lanes::{combine, LANES};
use crate::softmax::cpu::softmax_in_place;
use crate::unary::cpu::{gelu, gelu_and_grad, gelu_grad};
use crate::vector::{lanewise, LaneMap, Real};
use crate::wide_loops::{width, Width};
use crate::{cpu_tensor, PARALLEL_MIN_ELEMS};
use rayon::prelude::*;
use tokenformer_core::{Result, Tensor};

/// Σ f(x)² in f64 over 16 lanes, so that rows of very large or very small values neither
/// overflow nor underflow to a zero norm.
#[inline(always)]
fn sum_squares(v: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            let y = f(x) as f64;
            *lane += y * y;
        }
    }
    for (lane, &x) in lanes.iter_mut().zip(tail) {
        let y = f(x) as f64;
        *lane += y * y;
    }
    combine(lanes)
}

/// ‖v‖₂ as the kernels compute it: Σ v² over the f64 lanes, rounded to f32 at the end.
#[inline(always)]
pub(super) fn l2_norm(v: &[f32]) -> f32 {
    sum_squares(v, |x| x).sqrt() as f32
}

/// Σ f(x)·y over 16 lanes, in f32.
#[inline(always)]
fn dot(x: &[f32], y: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    crate::lanes::sum2(x, y, |a, b| f(a) * b)
}

// The row loops' work on one group of lanes (see `LaneMap` for why these are not closures).

/// GELU(x·scale).
struct GeluOfScaled<R>(R);

impl<R: Real> LaneMap<R, 1, 1> for GeluOfScaled<R> {
    #[inline(always)]
    fn apply(&self, [x]: [R; 1], _: [R; 1]) -> [R; 1] {
        [gelu(x * self.0)]
    }
}

/// GELU(x).
struct GeluOf;

impl<R: Real> LaneMap<R, 1, 1> for GeluOf {
    #[inline(always)]
    fn apply(&self, [x]: [R; 1], _: [R; 1]) -> [R; 1] {
        [gelu(x)]
    }
}

/// d·GELU′(x·scale), with d the value held in the output.
struct TimesGeluGradOfScaled<R>(R);

impl<R: Real> LaneMap<R, 1, 1> for TimesGeluGradOfScaled<R> {
    #[inline(always)]
    fn apply(&self, [x]: [R; 1], [d]: [R; 1]) -> [R; 1] {
        [d * gelu_grad(x * self.0)]
    }
}

/// GELU(x·scale) and d·GELU′(x·scale), with d the value held in the second output.
struct GeluAndTimesGradOfScaled<R>(R);

impl<R: Real> LaneMap<R, 1, 2> for GeluAndTimesGradOfScaled<R> {
    #[inline(always)]
    fn apply(&self, [x]: [R; 1], [_, d]: [R; 2]) -> [R; 2] {
        let (gelu, grad) = gelu_and_grad(x * self.0);
        [gelu, d * grad]
    }
}

/// GELU(x) and GELU′(x).
struct GeluAndGradOf;

impl<R: Real> LaneMap<R, 1, 2> for GeluAndGradOf {
    #[inline(always)]
    fn apply(&self, [x]: [R; 1], _: [R; 2]) -> [R; 2] {
        let (gelu, grad) = gelu_and_grad(x);
        [gelu, grad]
    }
}

/// s = Θ(a) for one row, its GELUs evaluated `R::LANES` at a time.
#[inline(always)]
fn forward_row<R: Real>(theta: Theta, tau: f32, a: &[f32], s: &mut [f32]) {
    match theta {
        Theta::L2NormGelu => {
            let r = l2_norm(a);
            if r == 0.0 {
                return s.fill(0.0);
            }
            lanewise([a], [s], GeluOfScaled(R::splat(tau / r)));
        }
        Theta::GeluL2Norm => {
            lanewise::<R, 1, 1>([a], [&mut *s], GeluOf);
            let rho = l2_norm(s);
            if rho == 0.0 {
                return s.fill(0.0);
            }
            let scale = tau / rho;
            s.iter_mut().for_each(|v| *v *= scale);
        }
        Theta::Softmax => {
            s.copy_from_slice(a);
            softmax_in_place(s);
            s.iter_mut().for_each(|v| *v *= tau * tau);
        }
    }
}

/// For one row: on entry `g` holds ∂L/∂S, on exit ∂L/∂a. `p` is scratch of the row's length.
#[inline(always)]
fn backward_row<R: Real>(theta: Theta, tau: f32, a: &[f32], g: &mut [f32], p: &mut [f32]) {
    let inv_tau2 = 1.0 / (tau * tau);
    match theta {
        Theta::L2NormGelu => {
            let radius = l2_norm(a);
            if radius == 0.0 {
                return g.fill(0.0);
            }
            let scale = tau / radius;
            // g becomes g_z = g ⊙ GELU′(z), z = a·τ/r; then g_a = (τ/r)(g_z − z (z·g_z)/τ²).
            lanewise([a], [&mut *g], TimesGeluGradOfScaled(R::splat(scale)));
            let projection = dot(a, g, |x| x) * scale * inv_tau2;
            for (d, &x) in g.iter_mut().zip(a) {
                *d = scale * (*d - x * scale * projection);
            }
        }
        Theta::GeluL2Norm => {
            let rho = sum_squares(a, gelu).sqrt() as f32;
            if rho == 0.0 {
                return g.fill(0.0);
            }
            let scale = tau / rho;
            let projection = dot(a, g, |x| gelu(x) * scale) * inv_tau2;
            for (d, &x) in g.iter_mut().zip(a) {
                let s = gelu(x) * scale;
                *d = scale * (*d - s * projection) * gelu_grad(x);
            }
        }
        Theta::Softmax => {
            p.copy_from_slice(a);
            softmax_in_place(p);
            let p_dot_g = dot(p, g, |x| x);
            for (d, &pv) in g.iter_mut().zip(p.iter()) {
                *d = tau * tau * pv * (*d - p_dot_g);
            }
        }
    }
}

/// Both at once, for the backward pass of a fused Pattention, which needs S (for g_V) and g_a:
/// s = Θ(a), and `g` from ∂L/∂S to ∂L/∂a, with one Φ per element shared by GELU and GELU′.
/// The same bits as `forward_row` followed by `backward_row`. `p` is scratch of the row's length.
#[inline(always)]
fn forward_backward_row<R: Real>(
    theta: Theta,
    tau: f32,
    a: &[f32],
    s: &mut [f32],
    g: &mut [f32],
    p: &mut [f32],
) {
    let inv_tau2 = 1.0 / (tau * tau);
    match theta {
        Theta::L2NormGelu => {
            let radius = sum_squares(a, |x| x).sqrt() as f32;
            if radius == 0.0 {
                s.fill(0.0);
                return g.fill(0.0);
            }
            let scale = tau / radius;
            lanewise([a], [&mut *s, &mut *g], GeluAndTimesGradOfScaled(R::splat(scale)));
            let projection = dot(a, g, |x| x) * scale * inv_tau2;
            for (d, &x) in g.iter_mut().zip(a) {
                *d = scale * (*d - x * scale * projection);
            }
        }
        Theta::GeluL2Norm => {
            lanewise::<R, 1, 2>([a], [&mut *s, &mut *p], GeluAndGradOf);
            let rho = sum_squares(s, |x| x).sqrt() as f32;
            if rho == 0.0 {
                s.fill(0.0);
                return g.fill(0.0);
            }
            let scale = tau / rho;
            s.iter_mut().for_each(|v| *v *= scale);
            let projection = dot(s, g, |x| x) * inv_tau2;
            for ((d, &sv), &grad) in g.iter_mut().zip(s.iter()).zip(p.iter()) {
                *d = scale * (*d - sv * projection) * grad;
            }
        }
        Theta::Softmax => {
            forward_row::<R>(theta, tau, a, s);
            backward_row::<R>(theta, tau, a, g, p);
        }
    }
}

#[inline(always)]
fn forward_rows_generic<R: Real>(theta: Theta, tau: f32, n: usize, a: &[f32], s: &mut [f32]) {
    for (a_row, s_row) in a.chunks_exact(n).zip(s.chunks_exact_mut(n)) {
        forward_row::<R>(theta, tau, a_row, s_row);
    }
}

#[inline(always)]
fn backward_rows_generic<R: Real>(theta: Theta, tau: f32, n: usize, a: &[f32], g: &mut [f32]) {
    let mut p = if theta == Theta::Softmax { vec![0.0; n] } else { Vec::new() };
    let p_row = if theta == Theta::Softmax { &mut p[..] } else { &mut [][..] };
    for (a_row, g_row) in a.chunks_exact(n).zip(g.chunks_exact_mut(n)) {
        backward_row::<R>(theta, tau, a_row, g_row, p_row);
    }
}

#[inline(always)]
fn forward_backward_rows_generic<R: Real>(
    theta: Theta,
    tau: f32,
    n: usize,
    a: &[f32],
    s: &mut [f32],
    g: &mut [f32],
) {
    let mut p = if theta == Theta::L2NormGelu { Vec::new() } else { vec![0.0; n] };
    let p_row = if theta == Theta::L2NormGelu { &mut [][..] } else { &mut p[..] };
    for ((a_row, s_row), g_row) in
        a.chunks_exact(n).zip(s.chunks_exact_mut(n)).zip(g.chunks_exact_mut(n))
    {
        forward_backward_row::<R>(theta, tau, a_row, s_row, g_row, p_row);
    }
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use super::*;
    use crate::vector::x86::{Avx2, Avx512};

    /// Registers advanced together by the row loops: four independent GELU chains, to hide
    /// their latency (a GELU is some 40 dependent steps, with a division and two exponentials).
    /// Per score of 24 rows of 512 in cache, on one Zen 4 core, forward / forward and backward
    /// together: with AVX2, 1.10 / 1.94 ns against 1.37 / 2.14 with two registers; with
    /// AVX-512, 0.87 / 1.44 against 0.99 / 1.56. Some of the four groups' values spill to the
    /// stack; the loads and stores that costs are cheaper than the waits they replace.
    type Avx2Group = Avx2<4>;
    type Avx512Group = Avx512<4>;

    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn forward_backward_rows_avx512(
        t: Theta,
        tau: f32,
        n: usize,
        a: &[f32],
        s: &mut [f32],
        g: &mut [f32],
    ) {
        forward_backward_rows_generic::<Avx512Group>(t, tau, n, a, s, g)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward_backward_rows_avx2(
        t: Theta,
        tau: f32,
        n: usize,
        a: &[f32],
        s: &mut [f32],
        g: &mut [f32],
    ) {
        forward_backward_rows_generic::<Avx2Group>(t, tau, n, a, s, g)
    }

    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn forward_rows_avx512(
        t: Theta,
        tau: f32,
        n: usize,
        a: &[f32],
        s: &mut [f32],
    ) {
        forward_rows_generic::<Avx512Group>(t, tau, n, a, s)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward_rows_avx2(t: Theta, tau: f32, n: usize, a: &[f32], s: &mut [f32]) {
        forward_rows_generic::<Avx2Group>(t, tau, n, a, s)
    }
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn backward_rows_avx512(
        t: Theta,
        tau: f32,
        n: usize,
        a: &[f32],
        g: &mut [f32],
    ) {
        backward_rows_generic::<Avx512Group>(t, tau, n, a, g)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn backward_rows_avx2(
        t: Theta,
        tau: f32,
        n: usize,
        a: &[f32],
        g: &mut [f32],
    ) {
        backward_rows_generic::<Avx2Group>(t, tau, n, a, g)
    }
}

/// S = Θ(a) for every row of length `n` of `a`, into `s`, on the calling thread.
pub(crate) fn forward_rows(theta: Theta, tau: f32, n: usize, a: &[f32], s: &mut [f32]) {
    match width() {
        // SAFETY: `width()` picks each variant only where the processor has its instructions.
        #[cfg(target_arch = "x86_64")]
        Width::Avx512 => unsafe { wide::forward_rows_avx512(theta, tau, n, a, s) },
        #[cfg(target_arch = "x86_64")]
        Width::Avx2 => unsafe { wide::forward_rows_avx2(theta, tau, n, a, s) },
        Width::Plain => forward_rows_generic::<f32>(theta, tau, n, a, s),
    }
}

/// ∂L/∂a for every row of length `n`, on the calling thread: `g` holds ∂L/∂S on entry.
pub(crate) fn backward_rows(theta: Theta, tau: f32, n: usize, a: &[f32], g: &mut [f32]) {
    match width() {
        // SAFETY: `width()` picks each variant only where the processor has its instructions.
        #[cfg(target_arch = "x86_64")]
        Width::Avx512 => unsafe { wide::backward_rows_avx512(theta, tau, n, a, g) },
        #[cfg(target_arch = "x86_64")]
        Width::Avx2 => unsafe { wide::backward_rows_avx2(theta, tau, n, a, g) },
        Width::Plain => backward_rows_generic::<f32>(theta, tau, n, a, g),
    }
}

/// `forward_rows` and `backward_rows` in one pass (see `forward_backward_row`), on the
/// calling thread: S into `s`, and `g` from ∂L/∂S to ∂L/∂a.
pub(crate) fn forward_backward_rows(
    theta: Theta,
    tau: f32,
    n: usize,
    a: &[f32],
    s: &mut [f32],
    g: &mut [f32],
) {
    match width() {
        // SAFETY: `width()` picks each variant only where the processor has its instructions.
        #[cfg(target_arch = "x86_64")]
        Width::Avx512 => unsafe { wide::forward_backward_rows_avx512(theta, tau, n, a, s, g) },
        #[cfg(target_arch = "x86_64")]
        Width::Avx2 => unsafe { wide::forward_backward_rows_avx2(theta, tau, n, a, s, g) },
        Width::Plain => forward_backward_rows_generic::<f32>(theta, tau, n, a, s, g),
    }
}

/// `f(first_row, rows)` over blocks of whole rows of `out`, in parallel when the work is large.
/// Block sizes depend only on the shape.
fn for_each_row_block(out: &mut [f32], n: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if n == 0 || out.is_empty() {
        return;
    }
    let rows_per_block = (8192 / n).max(1);
    if out.len() >= PARALLEL_MIN_ELEMS {
        out.par_chunks_mut(rows_per_block * n)
            .enumerate()
            .for_each(|(i, b)| f(i * rows_per_block, b));
    } else {
        f(0, out);
    }
}

pub(crate) fn pattention_norm(a: &Tensor, theta: Theta, tau: f32) -> Result<Tensor> {
    let scores = a.cpu_slice("pattention_norm")?;
    let n = a.dims()[a.rank() - 1];
    let mut out = vec![0.0f32; scores.len()];
    for_each_row_block(&mut out, n, |first, block| {
        forward_rows(theta, tau, n, &scores[first * n..][..block.len()], block)
    });
    Ok(cpu_tensor(out, a.dims()))
}

pub(crate) fn pattention_norm_backward(
    a: &Tensor,
    theta: Theta,
    tau: f32,
    g: &Tensor,
) -> Result<Tensor> {
    let scores = a.cpu_slice("pattention_norm_backward")?;
    let mut out = g.cpu_slice("pattention_norm_backward")?.to_vec();
    let n = a.dims()[a.rank() - 1];
    for_each_row_block(&mut out, n, |first, block| {
        backward_rows(theta, tau, n, &scores[first * n..][..block.len()], block)
    });
    Ok(cpu_tensor(out, a.dims()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{randn, values};

    #[test]
    fn every_compiled_variant_gives_the_same_bits() {
        // Rows longer and shorter than the 16 lanes, one of them all zeros.
        for n in [5, 16, 37, 300] {
            let mut a = values(&randn(&[6 * n], n as u64));
            a[..n].fill(0.0);
            let g = values(&randn(&[6 * n], 1 + n as u64));
            for theta in [Theta::L2NormGelu, Theta::GeluL2Norm, Theta::Softmax] {
                let mut s = vec![0.0; a.len()];
                forward_rows_generic::<f32>(theta, 1.5, n, &a, &mut s);
                let mut ga = g.clone();
                backward_rows_generic::<f32>(theta, 1.5, n, &a, &mut ga);
                let (mut s2, mut ga2) = (vec![0.0; a.len()], g.clone());
                forward_backward_rows_generic::<f32>(theta, 1.5, n, &a, &mut s2, &mut ga2);
                assert_eq!(s, s2, "{theta:?} n {n}: forward_backward S");
                assert_eq!(ga, ga2, "{theta:?} n {n}: forward_backward g_a");
                #[cfg(target_arch = "x86_64")]
                let fma = std::arch::is_x86_feature_detected!("fma");
                #[cfg(target_arch = "x86_64")]
                for (name, wide_ok) in [
                    ("avx2", std::arch::is_x86_feature_detected!("avx2") && fma),
                    ("avx512", std::arch::is_x86_feature_detected!("avx512f") && fma),
                ] {
                    if !wide_ok {
                        continue;
                    }
                    let (mut sw, mut gw, mut sf, mut gf) =
                        (vec![0.0; a.len()], g.clone(), vec![0.0; a.len()], g.clone());
                    // SAFETY: run only where the processor has the instructions.
                    unsafe {
                        if name == "avx2" {
                            wide::forward_rows_avx2(theta, 1.5, n, &a, &mut sw);
                            wide::backward_rows_avx2(theta, 1.5, n, &a, &mut gw);
                            wide::forward_backward_rows_avx2(theta, 1.5, n, &a, &mut sf, &mut gf);
                        } else {
                            wide::forward_rows_avx512(theta, 1.5, n, &a, &mut sw);
                            wide::backward_rows_avx512(theta, 1.5, n, &a, &mut gw);
                            wide::forward_backward_rows_avx512(theta, 1.5, n, &a, &mut sf, &mut gf);
                        }
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&sw), bits(&s), "{theta:?} n {n} {name} forward");
                    assert_eq!(bits(&gw), bits(&ga), "{theta:?} n {n} {name} backward");
                    assert_eq!(bits(&sf), bits(&s), "{theta:?} n {n} {name} fused S");
                    assert_eq!(bits(&gf), bits(&ga), "{theta:?} n {n} {name} fused g_a");
                }
            }
        }
    }
}
