//! Every public op on CUDA against the CPU reference, forward and backward, on random inputs
//! at sizes that are not multiples of the kernels' block size (256 threads).
//!
//! A value passes when |cuda − cpu| ≤ atol + rtol·|cpu|. The tolerances, per kind of op:
//!
//! | ops                                              | atol  | rtol  | why they differ at all  |
//! |--------------------------------------------------|-------|-------|-------------------------|
//! | copies: layout, broadcast, embedding, max, relu  | 0     | 0     | they move values only   |
//! | elementwise arithmetic (binary, neg, affine, …)  | 1e-6  | 1e-5  | FMA contraction         |
//! | elementwise transcendental (exp, log, tanh, …)   | 1e-6  | 1e-5  | expf/logf ulps          |
//! | gelu and its gradient                            | 5e-6  | 1e-5  | CPU erf is a fit ±6e-7  |
//! | rope (x₁·cos − x₂·sin cancels near 0)            | 1e-5  | 1e-5  | FMA contraction         |
//! | reductions, norms, softmax, Θ, cross-entropy     | 1e-5  | 1e-4  | summation order         |
//! | sum_all, sum_squares (thousands of terms)        | 1e-3  | 1e-4  | f32 tree vs f64 CPU sum |
//! | matmul and attention (cuBLAS, TF32 off; fused)   | 1e-4  | 1e-3  | GEMM blocking order     |
//!
//! Where no CUDA driver is installed, the tests run on the CUDA emulator (cudaemu/, built by the
//! core crate with the system C++ compiler); only where there is neither a driver nor a
//! compiler does each test print "skipped: <test>: no CUDA device (<reason>)" to stderr and return.
//! With `TOKENFORMER_REQUIRE_CUDA=1` (set by scripts/gpu-check.sh) a skip is a failure.

use tokenformer_core::testing::cuda_device_or_skip;
use tokenformer_core::{Device, Rng, Tensor};
use tokenformer_ops::adamw::{
    adamw_step, adamw_step_many, clip_factor, sum_squares, sum_squares_many, AdamW,
};
use tokenformer_ops::attention::{
    causal_attention, causal_attention_backward, causal_attention_fused,
    causal_attention_fused_backward,
};
use tokenformer_ops::binary::{self, add_backward, div_backward, mul_backward, sub_backward};
use tokenformer_ops::cross_entropy::{cross_entropy, cross_entropy_backward};
use tokenformer_ops::embedding::{embedding, embedding_backward};
use tokenformer_ops::layer_norm::{layer_norm, layer_norm_backward, LayerNormStats};
use tokenformer_ops::layout::{
    concat, concat_backward, narrow, narrow_backward, permute, permute_backward, transpose,
};
use tokenformer_ops::matmul::{matmul, matmul_backward};
use tokenformer_ops::pattention_norm::{pattention_norm, pattention_norm_backward, Theta};
use tokenformer_ops::reduce::{
    broadcast_to, max, max_backward, mean, mean_backward, sum, sum_all, sum_backward, sum_to_shape,
};
use tokenformer_ops::rope::{rope, rope_backward, rope_tables};
use tokenformer_ops::softmax::{
    causal_softmax, causal_softmax_backward, log_softmax, log_softmax_backward, softmax,
    softmax_backward,
};
use tokenformer_ops::testing::randn;
use tokenformer_ops::unary;

#[derive(Clone, Copy)]
struct Tol {
    atol: f64,
    rtol: f64,
}

const EXACT: Tol = Tol { atol: 0.0, rtol: 0.0 };
const ELEMENTWISE: Tol = Tol { atol: 1e-6, rtol: 1e-5 };
const TRANSCENDENTAL: Tol = Tol { atol: 1e-6, rtol: 1e-5 };
const GELU: Tol = Tol { atol: 5e-6, rtol: 1e-5 };
const ROTATION: Tol = Tol { atol: 1e-5, rtol: 1e-5 };
const REDUCTION: Tol = Tol { atol: 1e-5, rtol: 1e-4 };
const LONG_SUM: Tol = Tol { atol: 1e-3, rtol: 1e-4 };
const GEMM: Tol = Tol { atol: 1e-4, rtol: 1e-3 };

const GPU: Device = Device::Cuda(0);

type UnaryOp = fn(&Tensor) -> tokenformer_core::Result<Tensor>;
type BinaryOp = fn(&Tensor, &Tensor) -> tokenformer_core::Result<Tensor>;
/// (a's batch dims, b's batch dims, m, k, n) of a product op(a)·op(b).
type MatmulCase = (&'static [usize], &'static [usize], usize, usize, usize);

macro_rules! require_cuda {
    () => {
        if !cuda_device_or_skip() {
            return;
        }
    };
}

fn uniform(dims: &[usize], low: f32, high: f32, seed: u64) -> Tensor {
    Tensor::rand_uniform(dims, low, high, &mut Rng::new(seed))
}

/// Integers in [0, bound) as f32, the way ids and targets are passed.
fn ids(dims: &[usize], bound: u64, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n = dims.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.below(bound) as f32).collect(), dims).unwrap()
}

fn gpu(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap()
}

/// Asserts that the CUDA result matches the CPU result in shape and, within `tol`, in value.
fn assert_matches(what: &str, cuda: &Tensor, cpu: &Tensor, tol: Tol) {
    assert_eq!(cuda.device(), GPU, "{what}: the result left the GPU");
    assert_eq!(cuda.dims(), cpu.dims(), "{what}: shapes differ");
    let (c, r) = (cuda.to_vec().unwrap(), cpu.to_vec().unwrap());
    let mut worst = (0.0f64, 0usize);
    for (i, (&a, &e)) in c.iter().zip(&r).enumerate() {
        let err = (a as f64 - e as f64).abs();
        let same_special = a.to_bits() == e.to_bits() || (a.is_nan() && e.is_nan());
        assert!(
            same_special || err <= tol.atol + tol.rtol * (e as f64).abs(),
            "{what}: element {i} of {}: cuda {a}, cpu {e} (error {err:e})",
            cpu.shape()
        );
        if err > worst.0 {
            worst = (err, i);
        }
    }
    eprintln!("{what}: max error {:e} at element {}", worst.0, worst.1);
}

#[test]
fn binary_ops_broadcast_like_the_cpu() {
    require_cuda!();
    let shapes: &[(&[usize], &[usize])] = &[
        (&[3, 37, 129], &[3, 37, 129]),
        (&[3, 37, 129], &[37, 1]),
        (&[3, 37, 129], &[129]),
        (&[3, 37, 129], &[]),
        (&[3, 1, 129], &[1, 37, 1]),
        (&[5, 1], &[2, 1, 7]),
    ];
    for (case, &(ad, bd)) in shapes.iter().enumerate() {
        let a = randn(ad, 10 + case as u64);
        // Divisors kept away from 0, so the quotients are well conditioned.
        let b = uniform(bd, 0.5, 2.0, 20 + case as u64);
        let (ga, gb) = (gpu(&a), gpu(&b));
        let ops: [(&str, BinaryOp); 4] = [
            ("add", binary::add),
            ("sub", binary::sub),
            ("mul", binary::mul),
            ("div", binary::div),
        ];
        for (name, f) in ops {
            let what = format!("{name} {ad:?} {bd:?}");
            assert_matches(&what, &f(&ga, &gb).unwrap(), &f(&a, &b).unwrap(), ELEMENTWISE);
        }
        let out_dims = binary::add(&a, &b).unwrap().dims().to_vec();
        let g = randn(&out_dims, 30 + case as u64);
        let gg = gpu(&g);
        let pairs = [
            ("add_backward", add_backward(ad, bd, &gg).unwrap(), add_backward(ad, bd, &g).unwrap()),
            ("sub_backward", sub_backward(ad, bd, &gg).unwrap(), sub_backward(ad, bd, &g).unwrap()),
            (
                "mul_backward",
                mul_backward(&ga, &gb, &gg).unwrap(),
                mul_backward(&a, &b, &g).unwrap(),
            ),
            (
                "div_backward",
                div_backward(&ga, &gb, &gg).unwrap(),
                div_backward(&a, &b, &g).unwrap(),
            ),
        ];
        for (name, (c0, c1), (r0, r1)) in pairs {
            assert_matches(&format!("{name} ga {ad:?} {bd:?}"), &c0, &r0, REDUCTION);
            assert_matches(&format!("{name} gb {ad:?} {bd:?}"), &c1, &r1, REDUCTION);
        }
    }
}

#[test]
fn unary_ops_and_their_gradients_match() {
    require_cuda!();
    let dims = [3, 37, 129];
    let x = randn(&dims, 1);
    let positive = uniform(&dims, 0.1, 4.0, 2);
    let g = randn(&dims, 3);
    // Every seventh value exactly 0, where relu's gradient takes its conventional 0.
    let with_zeros: Vec<f32> = x
        .to_vec()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, &v)| if i % 7 == 0 { 0.0 } else { v })
        .collect();
    let kinks = Tensor::from_vec(with_zeros, &dims).unwrap();
    let wide = unary::affine(&x, 6.0, 0.0).unwrap(); // into the saturated tails of tanh and σ
    let (gx, gpos, gg) = (gpu(&x), gpu(&positive), gpu(&g));
    let (gkinks, gwide) = (gpu(&kinks), gpu(&wide));
    let maps: [(&str, UnaryOp, &Tensor, &Tensor, Tol); 9] = [
        ("neg", unary::neg, &x, &gx, EXACT),
        ("exp", unary::exp, &x, &gx, TRANSCENDENTAL),
        ("log", unary::log, &positive, &gpos, TRANSCENDENTAL),
        ("sqrt", unary::sqrt, &positive, &gpos, TRANSCENDENTAL),
        ("square", unary::square, &x, &gx, ELEMENTWISE),
        ("gelu", unary::gelu, &x, &gx, GELU),
        ("relu", unary::relu, &kinks, &gkinks, EXACT),
        ("tanh", unary::tanh, &wide, &gwide, TRANSCENDENTAL),
        ("sigmoid", unary::sigmoid, &wide, &gwide, TRANSCENDENTAL),
    ];
    for (name, f, cpu_in, gpu_in, tol) in maps {
        assert_matches(name, &f(gpu_in).unwrap(), &f(cpu_in).unwrap(), tol);
    }
    let powf_cuda = unary::powf(&gpos, 1.7).unwrap();
    assert_matches("powf", &powf_cuda, &unary::powf(&positive, 1.7).unwrap(), TRANSCENDENTAL);
    let affine_cuda = unary::affine(&gx, 0.37, -1.25).unwrap();
    assert_matches("affine", &affine_cuda, &unary::affine(&x, 0.37, -1.25).unwrap(), ELEMENTWISE);

    let exp_y = unary::exp(&x).unwrap();
    let sqrt_y = unary::sqrt(&positive).unwrap();
    let tanh_y = unary::tanh(&wide).unwrap();
    let sigmoid_y = unary::sigmoid(&wide).unwrap();
    let backward: [(&str, Tensor, Tensor); 9] = [
        (
            "exp_backward",
            unary::exp_backward(&gpu(&exp_y), &gg).unwrap(),
            unary::exp_backward(&exp_y, &g).unwrap(),
        ),
        (
            "log_backward",
            unary::log_backward(&gpos, &gg).unwrap(),
            unary::log_backward(&positive, &g).unwrap(),
        ),
        (
            "sqrt_backward",
            unary::sqrt_backward(&gpu(&sqrt_y), &gg).unwrap(),
            unary::sqrt_backward(&sqrt_y, &g).unwrap(),
        ),
        (
            "square_backward",
            unary::square_backward(&gx, &gg).unwrap(),
            unary::square_backward(&x, &g).unwrap(),
        ),
        (
            "powf_backward",
            unary::powf_backward(&gpos, 1.7, &gg).unwrap(),
            unary::powf_backward(&positive, 1.7, &g).unwrap(),
        ),
        (
            "gelu_backward",
            unary::gelu_backward(&gx, &gg).unwrap(),
            unary::gelu_backward(&x, &g).unwrap(),
        ),
        (
            "relu_backward",
            unary::relu_backward(&gkinks, &gg).unwrap(),
            unary::relu_backward(&kinks, &g).unwrap(),
        ),
        (
            "tanh_backward",
            unary::tanh_backward(&gpu(&tanh_y), &gg).unwrap(),
            unary::tanh_backward(&tanh_y, &g).unwrap(),
        ),
        (
            "sigmoid_backward",
            unary::sigmoid_backward(&gpu(&sigmoid_y), &gg).unwrap(),
            unary::sigmoid_backward(&sigmoid_y, &g).unwrap(),
        ),
    ];
    for (name, cuda, cpu) in backward {
        let tol = if name == "gelu_backward" { GELU } else { TRANSCENDENTAL };
        assert_matches(name, &cuda, &cpu, tol);
    }
}

#[test]
fn reductions_and_broadcasts_match() {
    require_cuda!();
    let dims = [3, 37, 129];
    let x = randn(&dims, 4);
    let gx = gpu(&x);
    let axes_sets: &[&[usize]] = &[&[], &[0], &[1], &[2], &[0, 2], &[1, 2], &[0, 1, 2]];
    for &axes in axes_sets {
        for keepdim in [false, true] {
            let what = format!("sum {axes:?} keepdim {keepdim}");
            let (c, r) = (sum(&gx, axes, keepdim).unwrap(), sum(&x, axes, keepdim).unwrap());
            assert_matches(&what, &c, &r, LONG_SUM);
            let what = format!("mean {axes:?} keepdim {keepdim}");
            let (c, r) = (mean(&gx, axes, keepdim).unwrap(), mean(&x, axes, keepdim).unwrap());
            assert_matches(&what, &c, &r, REDUCTION);
            let g = randn(r.dims(), 5);
            let what = format!("sum_backward {axes:?} keepdim {keepdim}");
            let c = sum_backward(&gpu(&g), &dims, axes, keepdim).unwrap();
            assert_matches(&what, &c, &sum_backward(&g, &dims, axes, keepdim).unwrap(), EXACT);
            let what = format!("mean_backward {axes:?} keepdim {keepdim}");
            let c = mean_backward(&gpu(&g), &dims, axes, keepdim).unwrap();
            assert_matches(
                &what,
                &c,
                &mean_backward(&g, &dims, axes, keepdim).unwrap(),
                ELEMENTWISE,
            );
        }
    }
    for axis in 0..3 {
        for keepdim in [false, true] {
            let (c, r) = (max(&gx, axis, keepdim).unwrap(), max(&x, axis, keepdim).unwrap());
            assert_matches(&format!("max axis {axis}"), &c, &r, EXACT);
            let g = randn(r.dims(), 6);
            let c = max_backward(&gx, axis, keepdim, &gpu(&g)).unwrap();
            let r = max_backward(&x, axis, keepdim, &g).unwrap();
            assert_matches(&format!("max_backward axis {axis}"), &c, &r, EXACT);
        }
    }
    // Long rows take the chunked two-pass sum (more than one 8192-value chunk per row).
    for n in [1, 255, 257, 14_319, 100_003] {
        let v = randn(&[n], 7);
        let c = sum_all(&gpu(&v)).unwrap();
        assert_eq!(c.dims(), &[] as &[usize]);
        assert_matches(&format!("sum_all of {n}"), &c, &sum_all(&v).unwrap(), LONG_SUM);
    }
    // Tall column sums: two levels of 64-row chunks (79 chunks, then 2), not multiples of the
    // 32-column tiles.
    for (dims, axes) in
        [(&[5000, 45][..], &[0][..]), (&[2, 1000, 77], &[1]), (&[3, 700, 5, 33], &[1, 2])]
    {
        let t = randn(dims, 12);
        let (c, r) = (sum(&gpu(&t), axes, false).unwrap(), sum(&t, axes, false).unwrap());
        assert_matches(&format!("column sum {dims:?} over {axes:?}"), &c, &r, LONG_SUM);
    }
    let rows = randn(&[5, 20_011], 8);
    let (c, r) = (sum(&gpu(&rows), &[1], false).unwrap(), sum(&rows, &[1], false).unwrap());
    assert_matches("sum of long rows", &c, &r, LONG_SUM);

    let small = randn(&[37, 1], 9);
    let c = broadcast_to(&gpu(&small), &dims).unwrap();
    assert_matches("broadcast_to", &c, &broadcast_to(&small, &dims).unwrap(), EXACT);
    for target in [&[37, 1][..], &[129], &[3, 1, 129], &[1, 37, 129], &[]] {
        let c = sum_to_shape(&gx, target).unwrap();
        assert_matches(
            &format!("sum_to_shape {target:?}"),
            &c,
            &sum_to_shape(&x, target).unwrap(),
            LONG_SUM,
        );
    }
}

#[test]
fn layout_copies_are_exact() {
    require_cuda!();
    let x = randn(&[3, 37, 129], 11);
    let gx = gpu(&x);
    for perm in [[0, 2, 1], [2, 0, 1], [1, 0, 2], [0, 1, 2]] {
        let (c, r) = (permute(&gx, &perm).unwrap(), permute(&x, &perm).unwrap());
        assert_matches(&format!("permute {perm:?}"), &c, &r, EXACT);
        let c = permute_backward(&gpu(&r), &perm).unwrap();
        assert_matches(&format!("permute_backward {perm:?}"), &c, &x, EXACT);
    }
    let x6 = randn(&[2, 3, 5, 4, 3, 7], 12);
    let perm6 = [5, 2, 0, 4, 1, 3];
    let c = permute(&gpu(&x6), &perm6).unwrap();
    assert_matches("permute rank 6", &c, &permute(&x6, &perm6).unwrap(), EXACT);
    assert_matches(
        "transpose",
        &transpose(&gx, 0, 2).unwrap(),
        &transpose(&x, 0, 2).unwrap(),
        EXACT,
    );

    for (axis, start, len) in [(0, 1, 2), (1, 5, 30), (2, 0, 129), (2, 100, 29)] {
        let (c, r) =
            (narrow(&gx, axis, start, len).unwrap(), narrow(&x, axis, start, len).unwrap());
        assert_matches(&format!("narrow {axis} {start} {len}"), &c, &r, EXACT);
        let c = narrow_backward(&gpu(&r), x.dims(), axis, start).unwrap();
        let r = narrow_backward(&r, x.dims(), axis, start).unwrap();
        assert_matches(&format!("narrow_backward {axis} {start} {len}"), &c, &r, EXACT);
    }
    let pieces = [randn(&[3, 37, 5], 13), randn(&[3, 37, 129], 14), randn(&[3, 37, 1], 15)];
    let gpu_pieces: Vec<Tensor> = pieces.iter().map(gpu).collect();
    let (c, r) = (concat(&gpu_pieces, 2).unwrap(), concat(&pieces, 2).unwrap());
    assert_matches("concat", &c, &r, EXACT);
    let back = concat_backward(&c, &[5, 129, 1], 2).unwrap();
    for (i, (piece, expected)) in back.iter().zip(&pieces).enumerate() {
        assert_matches(&format!("concat_backward piece {i}"), piece, expected, EXACT);
    }
}

#[test]
fn matmul_matches_for_every_flag_and_batch_layout() {
    require_cuda!();
    let cases: &[MatmulCase] = &[
        (&[], &[], 37, 129, 65),
        (&[3], &[3], 37, 65, 129),
        (&[2, 3], &[2, 3], 17, 33, 9),
        (&[3, 5], &[], 37, 65, 129),
        (&[], &[4], 37, 65, 33),
        (&[], &[], 1, 300, 1),
    ];
    let stored = |batch: &[usize], rows: usize, cols: usize, t: bool| {
        let mut d = batch.to_vec();
        d.extend(if t { [cols, rows] } else { [rows, cols] });
        d
    };
    for (case, &(ab, bb, m, k, n)) in cases.iter().enumerate() {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = randn(&stored(ab, m, k, ta), 100 + case as u64);
            let b = randn(&stored(bb, k, n, tb), 200 + case as u64);
            let (ga, gb) = (gpu(&a), gpu(&b));
            let what = format!("matmul case {case} trans ({ta}, {tb})");
            let r = matmul(&a, &b, ta, tb).unwrap();
            assert_matches(&what, &matmul(&ga, &gb, ta, tb).unwrap(), &r, GEMM);
            let g = randn(r.dims(), 300 + case as u64);
            let (c_ga, c_gb) = matmul_backward(&ga, &gb, &gpu(&g), ta, tb).unwrap();
            let (r_ga, r_gb) = matmul_backward(&a, &b, &g, ta, tb).unwrap();
            assert_matches(&format!("{what} ga"), &c_ga, &r_ga, GEMM);
            assert_matches(&format!("{what} gb"), &c_gb, &r_gb, GEMM);
        }
    }
}

#[test]
fn softmax_family_matches() {
    require_cuda!();
    for dims in [&[3, 37, 129][..], &[5, 3001], &[4, 1]] {
        let x = randn(dims, 21);
        let g = randn(dims, 22);
        let (gx, gg) = (gpu(&x), gpu(&g));
        let (y, log_y) = (softmax(&x).unwrap(), log_softmax(&x).unwrap());
        assert_matches(&format!("softmax {dims:?}"), &softmax(&gx).unwrap(), &y, REDUCTION);
        assert_matches(
            &format!("log_softmax {dims:?}"),
            &log_softmax(&gx).unwrap(),
            &log_y,
            REDUCTION,
        );
        let c = softmax_backward(&gpu(&y), &gg).unwrap();
        assert_matches(
            &format!("softmax_backward {dims:?}"),
            &c,
            &softmax_backward(&y, &g).unwrap(),
            REDUCTION,
        );
        let c = log_softmax_backward(&gpu(&log_y), &gg).unwrap();
        let r = log_softmax_backward(&log_y, &g).unwrap();
        assert_matches(&format!("log_softmax_backward {dims:?}"), &c, &r, REDUCTION);
    }
    for t in [1, 37, 300] {
        let scores = randn(&[2, 3, t, t], 23);
        let g = randn(&[2, 3, t, t], 24);
        let scale = 0.19;
        let p = causal_softmax(&scores, scale).unwrap();
        let c = causal_softmax(&gpu(&scores), scale).unwrap();
        assert_matches(&format!("causal_softmax T={t}"), &c, &p, REDUCTION);
        let c = causal_softmax_backward(&gpu(&p), &gpu(&g), scale).unwrap();
        let r = causal_softmax_backward(&p, &g, scale).unwrap();
        assert_matches(&format!("causal_softmax_backward T={t}"), &c, &r, REDUCTION);
    }
}

#[test]
fn layer_norm_matches_with_and_without_parameters() {
    require_cuda!();
    // 4500 rows: 71 chunks of 64 rows in the fused weight-and-bias pass, so the chunks' sums
    // take two levels too.
    for dims in [&[3, 37, 129][..], &[7, 1000], &[4500, 70]] {
        let d = dims[dims.len() - 1];
        // An offset mean, so the centred variance matters.
        let x = unary::affine(&randn(dims, 31), 2.0, 3.0).unwrap();
        let (w, b) = (randn(&[d], 32), randn(&[d], 33));
        let g = randn(dims, 34);
        let (gx, gw, gb, gg) = (gpu(&x), gpu(&w), gpu(&b), gpu(&g));
        for (with_w, with_b) in [(false, false), (true, true), (true, false), (false, true)] {
            let what = format!("layer_norm {dims:?} weight {with_w} bias {with_b}");
            let (cw, cb) = (with_w.then_some(&gw), with_b.then_some(&gb));
            let (rw, rb) = (with_w.then_some(&w), with_b.then_some(&b));
            let (cy, cs) = layer_norm(&gx, cw, cb, 1e-5).unwrap();
            let (ry, rs) = layer_norm(&x, rw, rb, 1e-5).unwrap();
            assert_matches(&what, &cy, &ry, REDUCTION);
            assert_matches(&format!("{what} mean"), &cs.mean, &rs.mean, REDUCTION);
            assert_matches(&format!("{what} rstd"), &cs.rstd, &rs.rstd, REDUCTION);
            // Both backward passes start from the same (CPU) statistics.
            let stats = LayerNormStats { mean: gpu(&rs.mean), rstd: gpu(&rs.rstd) };
            let (c_gx, c_gw, c_gb) = layer_norm_backward(&gx, cw, with_b, &stats, &gg).unwrap();
            let (r_gx, r_gw, r_gb) = layer_norm_backward(&x, rw, with_b, &rs, &g).unwrap();
            assert_matches(&format!("{what} gx"), &c_gx, &r_gx, REDUCTION);
            assert_eq!(c_gw.is_some(), r_gw.is_some(), "{what}: gweight presence");
            if let (Some(c), Some(r)) = (&c_gw, &r_gw) {
                assert_matches(&format!("{what} gweight"), c, r, LONG_SUM);
            }
            assert_eq!(c_gb.is_some(), with_b, "{what}: gbias presence");
            assert_eq!(r_gb.is_some(), with_b, "{what}: gbias presence on the CPU");
            if let (Some(c), Some(r)) = (&c_gb, &r_gb) {
                assert_matches(&format!("{what} gbias"), c, r, LONG_SUM);
            }
        }
    }
}

#[test]
fn pattention_norms_match_and_zero_rows_stay_zero() {
    require_cuda!();
    let (rows, n) = (3 * 37, 129);
    let mut a = randn(&[rows, n], 41).to_vec().unwrap();
    a[5 * n..6 * n].fill(0.0); // a row of zero scores: S = 0 and gradient 0, never NaN
    let a = Tensor::from_vec(a, &[3, 37, n]).unwrap();
    let g = randn(&[3, 37, n], 42);
    let (ga, gg) = (gpu(&a), gpu(&g));
    let tau = (100.0f32).sqrt();
    for theta in [Theta::L2NormGelu, Theta::GeluL2Norm, Theta::Softmax] {
        let c = pattention_norm(&ga, theta, tau).unwrap();
        assert_matches(
            &format!("pattention_norm {theta:?}"),
            &c,
            &pattention_norm(&a, theta, tau).unwrap(),
            REDUCTION,
        );
        let c = pattention_norm_backward(&ga, theta, tau, &gg).unwrap();
        let r = pattention_norm_backward(&a, theta, tau, &g).unwrap();
        assert_matches(&format!("pattention_norm_backward {theta:?}"), &c, &r, REDUCTION);
        assert!(
            c.to_vec().unwrap().iter().all(|v| v.is_finite()),
            "{theta:?}: non-finite gradient"
        );
        // No rows, or rows of no scores: an empty result, and no launch (a GPU refuses a grid
        // of zero blocks).
        for dims in [[0, 7], [4, 0], [0, 0]] {
            let empty = gpu(&Tensor::zeros(&dims, Device::Cpu).unwrap());
            let s = pattention_norm(&empty, theta, tau).unwrap();
            let g = pattention_norm_backward(&empty, theta, tau, &empty).unwrap();
            assert_eq!((s.dims(), g.dims()), (&dims[..], &dims[..]), "{theta:?}");
        }
    }
}

#[test]
fn pattention_norms_of_extreme_rows_match() {
    // Rows whose squared norm leaves f32's range: the GPU sums it in double, as the CPU does,
    // so none of these rows gets a norm of 0 or ∞ (and so an output and gradient of 0).
    require_cuda!();
    let n = 301;
    let base = randn(&[n], 46).to_vec().unwrap();
    let row = |f: &dyn Fn(f32) -> f32| base.iter().map(|&v| f(v)).collect::<Vec<f32>>();
    let rows: [(&str, Vec<f32>); 4] = [
        ("scores near 1e-25", row(&|v| v * 1e-25)),
        ("scores near 1e25", row(&|v| v * 1e25)),
        ("scores wholly below -10.5", row(&|v| -11.0 - v.abs())),
        ("scores between -16 and -12", row(&|v| -12.0 - (v.abs() * 2.0).min(4.0))),
    ];
    let g = randn(&[1, n], 47);
    let tau = (n as f32).sqrt();
    for (what, values) in rows {
        let a = Tensor::from_vec(values, &[1, n]).unwrap();
        for theta in [Theta::L2NormGelu, Theta::GeluL2Norm] {
            let what = format!("{theta:?} {what}");
            let r = pattention_norm(&a, theta, tau).unwrap();
            let c = pattention_norm(&gpu(&a), theta, tau).unwrap();
            assert_matches(&what, &c, &r, REDUCTION);
            let rv = r.to_vec().unwrap();
            assert!(rv.iter().any(|&v| v != 0.0), "{what}: the CPU reference is all zeros");
            let r = pattention_norm_backward(&a, theta, tau, &g).unwrap();
            let c = pattention_norm_backward(&gpu(&a), theta, tau, &gpu(&g)).unwrap();
            assert_matches(&format!("{what} backward"), &c, &r, REDUCTION);
        }
    }
}

#[test]
fn pattention_norm_keeps_every_bit_when_zero_scores_are_appended() {
    // Exact growth (SPEC §4) on the GPU: new parameter tokens score exactly 0, and the old
    // columns of S and of the gradient must not change in any bit.
    require_cuda!();
    let (rows, n, extra) = (37, 129, 300);
    let (a, g) = (randn(&[rows, n], 43), randn(&[rows, n], 44));
    let g_extra = randn(&[rows, extra], 45);
    let a_grown = concat(&[gpu(&a), Tensor::zeros(&[rows, extra], GPU).unwrap()], 1).unwrap();
    let g_grown = concat(&[gpu(&g), gpu(&g_extra)], 1).unwrap();
    let tau = (n as f32).sqrt();
    for theta in [Theta::L2NormGelu, Theta::GeluL2Norm] {
        let old = pattention_norm(&gpu(&a), theta, tau).unwrap().to_vec().unwrap();
        let grown = pattention_norm(&a_grown, theta, tau).unwrap();
        let grown_old = narrow(&grown, 1, 0, n).unwrap().to_vec().unwrap();
        assert_eq!(old, grown_old, "{theta:?}: forward changed");
        let old =
            pattention_norm_backward(&gpu(&a), theta, tau, &gpu(&g)).unwrap().to_vec().unwrap();
        let grown = pattention_norm_backward(&a_grown, theta, tau, &g_grown).unwrap();
        let grown_old = narrow(&grown, 1, 0, n).unwrap().to_vec().unwrap();
        assert_eq!(old, grown_old, "{theta:?}: backward changed");
    }
}

#[test]
fn embedding_matches_and_its_scatter_add_is_bit_identical() {
    require_cuda!();
    // (vocab, d, ids shape, distinct ids): few distinct ids over many positions, so rows are hit
    // many times; then a table of several row blocks (256 rows each) and column strips (256
    // columns each) with more positions than one tile of staged ids (256).
    let cases: &[(usize, usize, &[usize], u64)] =
        &[(101, 67, &[3, 37], 13), (601, 300, &[3, 200], 601), (5, 1, &[1, 1], 5)];
    for (case, &(vocab, d, id_dims, distinct)) in cases.iter().enumerate() {
        let seed = 50 + 10 * case as u64;
        let weight = randn(&[vocab, d], seed);
        let token_ids = ids(id_dims, distinct, seed + 1);
        let what = format!("embedding {vocab}x{d} ids {id_dims:?}");
        let c = embedding(&gpu(&weight), &gpu(&token_ids)).unwrap();
        assert_matches(&what, &c, &embedding(&weight, &token_ids).unwrap(), EXACT);
        let mut g_dims = id_dims.to_vec();
        g_dims.push(d);
        let g = randn(&g_dims, seed + 2);
        let c = embedding_backward(&gpu(&token_ids), &gpu(&g), vocab).unwrap();
        // Same additions in the same order as the CPU loop: the same bits.
        let r = embedding_backward(&token_ids, &g, vocab).unwrap();
        assert_matches(&format!("{what} backward"), &c, &r, EXACT);
    }
}

#[test]
fn embedding_of_invalid_ids_gives_nan_rows_on_the_gpu() {
    require_cuda!();
    // On a GPU the ids are not copied back to be checked: a bad id must neither read outside
    // the table nor go unnoticed. Its row is NaN; the backward pass skips it.
    let (vocab, d) = (7, 5);
    let weight = randn(&[vocab, d], 111);
    let bad = [7.0, -1.0, 2.5, f32::NAN, f32::INFINITY, 1e10];
    for &b in &bad {
        let with_bad = Tensor::from_vec(vec![3.0, b, 6.0], &[3]).unwrap();
        let out = embedding(&gpu(&weight), &gpu(&with_bad)).unwrap().to_vec().unwrap();
        let w = weight.to_vec().unwrap();
        assert_eq!(out[..d], w[3 * d..4 * d], "id {b}: row 0");
        assert!(out[d..2 * d].iter().all(|v| v.is_nan()), "id {b}: row 1 is not NaN");
        assert_eq!(out[2 * d..], w[6 * d..7 * d], "id {b}: row 2");
        // The scatter-add of the bad position is dropped: the same as the two good positions.
        let g = randn(&[3, d], 112);
        let c = embedding_backward(&gpu(&with_bad), &gpu(&g), vocab).unwrap();
        let good_ids = Tensor::from_vec(vec![3.0, 6.0], &[2]).unwrap();
        let g_good = Tensor::from_vec(
            g.to_vec()
                .unwrap()
                .iter()
                .enumerate()
                .filter(|(i, _)| i / d != 1)
                .map(|(_, &v)| v)
                .collect(),
            &[2, d],
        )
        .unwrap();
        let r = embedding_backward(&good_ids, &g_good, vocab).unwrap();
        assert_matches(&format!("embedding_backward skipping id {b}"), &c, &r, EXACT);
    }
    // The CPU keeps its error naming the id.
    let with_bad = Tensor::from_vec(vec![3.0, 101.0], &[2]).unwrap();
    let err = embedding(&weight, &with_bad).unwrap_err().to_string();
    assert!(err.contains("embedding") && err.contains("101"), "{err}");
}

#[test]
fn cross_entropy_matches() {
    require_cuda!();
    for (n, v) in [(37, 1001), (5, 3), (129, 257)] {
        let logits = unary::affine(&randn(&[n, v], 61), 3.0, 0.0).unwrap();
        let targets = ids(&[n], v as u64, 62);
        let (gl, gt) = (gpu(&logits), gpu(&targets));
        let (c_loss, c_lse) = cross_entropy(&gl, &gt).unwrap();
        let (r_loss, r_lse) = cross_entropy(&logits, &targets).unwrap();
        assert_eq!(c_loss.dims(), &[] as &[usize]);
        assert_matches(&format!("cross_entropy loss {n}x{v}"), &c_loss, &r_loss, REDUCTION);
        assert_matches(&format!("cross_entropy lse {n}x{v}"), &c_lse, &r_lse, REDUCTION);
        let g = Tensor::scalar(1.3);
        let c = cross_entropy_backward(&gl, &gt, &gpu(&r_lse), &gpu(&g)).unwrap();
        let r = cross_entropy_backward(&logits, &targets, &r_lse, &g).unwrap();
        assert_matches(&format!("cross_entropy_backward {n}x{v}"), &c, &r, REDUCTION);
    }
}

#[test]
fn cross_entropy_of_an_invalid_target_is_nan_on_the_gpu() {
    require_cuda!();
    let (n, v) = (4, 9);
    let logits = randn(&[n, v], 121);
    let good = Tensor::from_vec(vec![1.0, 8.0, 0.0, 4.0], &[n]).unwrap();
    let (_, r_lse) = cross_entropy(&logits, &good).unwrap();
    let g = Tensor::scalar(1.0);
    let r_grad = cross_entropy_backward(&logits, &good, &r_lse, &g).unwrap().to_vec().unwrap();
    for bad in [9.0, -1.0, 0.5, f32::NAN, f32::NEG_INFINITY] {
        // Row 1's target is replaced: its loss and gradient row become NaN, the rest is unchanged.
        let targets = gpu(&Tensor::from_vec(vec![1.0, bad, 0.0, 4.0], &[n]).unwrap());
        let (loss, lse) = cross_entropy(&gpu(&logits), &targets).unwrap();
        assert!(loss.to_scalar().unwrap().is_nan(), "target {bad}: the loss is not NaN");
        assert_matches(&format!("lse with target {bad}"), &lse, &r_lse, REDUCTION);
        let grad = cross_entropy_backward(&gpu(&logits), &targets, &lse, &gpu(&g))
            .unwrap()
            .to_vec()
            .unwrap();
        for (i, (&c, &r)) in grad.iter().zip(&r_grad).enumerate() {
            if i / v == 1 {
                assert!(c.is_nan(), "target {bad}: gradient {i} is {c}, not NaN");
            } else {
                let err = (c as f64 - r as f64).abs();
                assert!(err <= 1e-5 + 1e-4 * (r as f64).abs(), "target {bad}: gradient {i}");
            }
        }
    }
    let err = cross_entropy(&logits, &Tensor::from_vec(vec![0.0, 9.0, 0.0, 0.0], &[n]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("cross_entropy") && err.contains('9'), "{err}");
}

#[test]
fn rope_matches_forward_and_backward() {
    require_cuda!();
    for (rotary_dims, head_dim) in [(16, 64), (6, 6), (0, 24), (10, 37)] {
        let (cos, sin) = rope_tables(40, rotary_dims, 10_000.0).unwrap();
        let (gcos, gsin) = (gpu(&cos), gpu(&sin));
        let x = randn(&[2, 3, 37, head_dim], 71);
        let c = rope(&gpu(&x), &gcos, &gsin).unwrap();
        let what = format!("rope r={rotary_dims} d_h={head_dim}");
        assert_matches(&what, &c, &rope(&x, &cos, &sin).unwrap(), ROTATION);
        let c = rope_backward(&gpu(&x), &gcos, &gsin).unwrap();
        assert_matches(
            &format!("{what} backward"),
            &c,
            &rope_backward(&x, &cos, &sin).unwrap(),
            ROTATION,
        );
    }
}

#[test]
fn attention_matches_forward_and_backward() {
    require_cuda!();
    let dims = [2, 3, 37, 24];
    let (q, k, v) = (randn(&dims, 81), randn(&dims, 82), randn(&dims, 83));
    let (gq, gk, gv) = (gpu(&q), gpu(&k), gpu(&v));
    let (c_out, c_probs) = causal_attention(&gq, &gk, &gv).unwrap();
    let (r_out, r_probs) = causal_attention(&q, &k, &v).unwrap();
    assert_matches("attention out", &c_out, &r_out, GEMM);
    assert_matches("attention probs", &c_probs, &r_probs, GEMM);
    let g = randn(&dims, 84);
    let c = causal_attention_backward(&gq, &gk, &gv, &gpu(&r_probs), &gpu(&g)).unwrap();
    let r = causal_attention_backward(&q, &k, &v, &r_probs, &g).unwrap();
    assert_matches("attention gq", &c.0, &r.0, GEMM);
    assert_matches("attention gk", &c.1, &r.1, GEMM);
    assert_matches("attention gv", &c.2, &r.2, GEMM);
}

/// The fused kernels against the CPU: the plain composition (the reference) and the CPU fused
/// kernel, forward, log-sum-exp and all three gradients. The shapes cross every tile size the
/// CUDA kernels pick (32, 16 or 8 rows, by head dim) with partial last tiles, one position, and
/// odd head dims.
#[test]
fn fused_attention_matches_the_cpu() {
    require_cuda!();
    for (n, dims) in [
        [2, 3, 37, 24],
        [1, 2, 70, 7],
        [1, 1, 1, 5],
        [1, 1, 33, 128],
        [2, 2, 100, 64],
        [1, 1, 50, 300],
    ]
    .iter()
    .enumerate()
    {
        let seed = 200 + 10 * n as u64;
        let (q, k, v, g) = (
            randn(dims, seed),
            randn(dims, seed + 1),
            randn(dims, seed + 2),
            randn(dims, seed + 3),
        );
        let (gq, gk, gv, gg) = (gpu(&q), gpu(&k), gpu(&v), gpu(&g));
        let what = |name: &str| format!("fused attention {dims:?} {name}");
        let (c_out, c_lse) = causal_attention_fused(&gq, &gk, &gv).unwrap();
        let (f_out, f_lse) = causal_attention_fused(&q, &k, &v).unwrap();
        let (r_out, r_probs) = causal_attention(&q, &k, &v).unwrap();
        assert_matches(&what("out vs plain"), &c_out, &r_out, GEMM);
        assert_matches(&what("out vs cpu fused"), &c_out, &f_out, GEMM);
        assert_matches(&what("lse"), &c_lse, &f_lse, REDUCTION);
        let c = causal_attention_fused_backward(&gq, &gk, &gv, &c_out, &c_lse, &gg).unwrap();
        let f = causal_attention_fused_backward(&q, &k, &v, &f_out, &f_lse, &g).unwrap();
        let r = causal_attention_backward(&q, &k, &v, &r_probs, &g).unwrap();
        for (name, c, f, r) in
            [("gq", &c.0, &f.0, &r.0), ("gk", &c.1, &f.1, &r.1), ("gv", &c.2, &f.2, &r.2)]
        {
            assert_matches(&what(&format!("{name} vs plain")), c, r, GEMM);
            assert_matches(&what(&format!("{name} vs cpu fused")), c, f, GEMM);
        }
        // The same bits on a second run: every sum of the kernels runs in a fixed order.
        let again = causal_attention_fused_backward(&gq, &gk, &gv, &c_out, &c_lse, &gg).unwrap();
        assert_matches(&what("gk rerun"), &again.1, &c.1, EXACT);
    }
}

#[test]
fn adamw_and_sum_squares_match() {
    require_cuda!();
    let dims = [3, 37, 129];
    let (p, g) = (randn(&dims, 91), randn(&dims, 92));
    let m = unary::affine(&randn(&dims, 93), 0.1, 0.0).unwrap();
    let v = uniform(&dims, 0.0, 0.01, 94);
    let hp = AdamW { lr: 6e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    for step in [1, 7, 1000] {
        let c = adamw_step(&gpu(&p), &gpu(&g), &gpu(&m), &gpu(&v), &hp, step).unwrap();
        let r = adamw_step(&p, &g, &m, &v, &hp, step).unwrap();
        assert_matches(&format!("adamw p step {step}"), &c.0, &r.0, ELEMENTWISE);
        assert_matches(&format!("adamw m step {step}"), &c.1, &r.1, ELEMENTWISE);
        assert_matches(&format!("adamw v step {step}"), &c.2, &r.2, ELEMENTWISE);
    }
    for n in [1, 14_319, 300_007] {
        let x = randn(&[n], 95);
        let c = sum_squares(&gpu(&x)).unwrap();
        assert_matches(&format!("sum_squares of {n}"), &c, &sum_squares(&x).unwrap(), LONG_SUM);
    }
}

#[test]
fn multi_tensor_clipping_and_adamw_match() {
    require_cuda!();
    // 37 tensors: two launches of at most 32; lengths around the 4096-value chunks.
    let lens: Vec<usize> = (0..37).map(|i| [1, 4095, 4097, 37, 12_289, 129][i % 6] + i).collect();
    let tensors = |seed: u64, scale: f32| -> Vec<Tensor> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| unary::affine(&randn(&[n], seed + i as u64), scale, 0.0).unwrap())
            .collect()
    };
    let (params, grads, m) = (tensors(200, 1.0), tensors(300, 1.0), tensors(400, 0.1));
    let v: Vec<Tensor> =
        lens.iter().enumerate().map(|(i, &n)| uniform(&[n], 0.0, 0.01, 500 + i as u64)).collect();
    let on_gpu = |ts: &[Tensor]| ts.iter().map(gpu).collect::<Vec<Tensor>>();
    let c = sum_squares_many(&on_gpu(&grads)).unwrap();
    let r = sum_squares_many(&grads).unwrap();
    assert_matches("sum_squares_many", &c, &r, LONG_SUM);
    for max_norm in [1.0, 1e6] {
        let (c_norm, c_factor) = clip_factor(&c, max_norm).unwrap();
        let (r_norm, r_factor) = clip_factor(&r, max_norm).unwrap();
        assert_matches(&format!("clip norm {max_norm}"), &c_norm, &r_norm, LONG_SUM);
        assert_matches(&format!("clip factor {max_norm}"), &c_factor, &r_factor, LONG_SUM);
    }
    let (_, factor) = clip_factor(&r, 1.0).unwrap();
    let hp = AdamW { lr: 6e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let decays: Vec<f32> = (0..lens.len()).map(|i| if i % 3 == 0 { 0.0 } else { 0.1 }).collect();
    for scale in [Some(&factor), None] {
        let (mut rp, mut rm, mut rv) = (params.clone(), m.clone(), v.clone());
        adamw_step_many(&mut rp, &grads, &mut rm, &mut rv, &decays, &hp, 3, scale).unwrap();
        let (mut cp, mut cm, mut cv) = (on_gpu(&params), on_gpu(&m), on_gpu(&v));
        // Tensor 0 is also held elsewhere: it must get a new buffer and leave the copy as it was.
        let held = cp[0].clone();
        let held_before = held.to_vec().unwrap();
        let c_scale = scale.map(gpu);
        adamw_step_many(
            &mut cp,
            &on_gpu(&grads),
            &mut cm,
            &mut cv,
            &decays,
            &hp,
            3,
            c_scale.as_ref(),
        )
        .unwrap();
        assert_eq!(held.to_vec().unwrap(), held_before, "a shared parameter changed in place");
        for i in 0..lens.len() {
            let what = format!("adamw_step_many scale {} tensor {i}", scale.is_some());
            assert_matches(&format!("{what} p"), &cp[i], &rp[i], ELEMENTWISE);
            assert_matches(&format!("{what} m"), &cm[i], &rm[i], ELEMENTWISE);
            assert_matches(&format!("{what} v"), &cv[i], &rv[i], ELEMENTWISE);
        }
    }
}

#[test]
fn the_same_inputs_give_the_same_bits_twice() {
    require_cuda!();
    let x = gpu(&randn(&[300, 1001], 101));
    let w = gpu(&randn(&[1001, 129], 102));
    let run = || {
        let y = matmul(&x, &w, false, false).unwrap();
        let (n, stats) = layer_norm(&y, None, None, 1e-5).unwrap();
        let (gx, _, gb) = layer_norm_backward(&y, None, true, &stats, &n).unwrap();
        let total = sum_all(&x).unwrap();
        let mut bits = Vec::new();
        for t in [y, n, gx, gb.unwrap(), total] {
            bits.extend(t.to_vec().unwrap().iter().map(|v| v.to_bits()));
        }
        bits
    };
    assert_eq!(run(), run(), "two runs gave different bits");
}
