//! Properties of the ops and of their wiring into autograd, over random small shapes and values:
//!
//! 1. every differentiable op passes `gradcheck` (analytic backward = central differences);
//! 2. broadcasting equals explicit expansion and a naive nested loop;
//! 3. matmul equals a naive triple loop (every transpose flag, batched and shared operands);
//! 4. softmax rows are distributions; causal_softmax is zero above the diagonal; fused attention
//!    matches the plain composition;
//! 5. narrow and concat are inverse to each other, bit for bit;
//! 6. bad shapes, ranks, axes and ids give errors that name the op and the shapes, not panics.
//!
//! Values come from our own seeded `Rng` (the seed is part of each proptest case), so a failing
//! case is reproduced exactly by its shrunk inputs.

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tokenformer::autograd::ops::Theta;
use tokenformer::autograd::{self, gradcheck, GradcheckOptions, Var};
use tokenformer::core::{Device, Result, Rng, Tensor};
use tokenformer::ops::{
    attention, binary, cross_entropy, embedding, layer_norm, layout, matmul, pattention_norm,
    reduce, rope, softmax,
};

type TestResult = std::result::Result<(), TestCaseError>;

// ---------------------------------------------------------------------------------------------
// Value generators
// ---------------------------------------------------------------------------------------------

fn numel(dims: &[usize]) -> usize {
    dims.iter().product()
}

fn tensor(data: Vec<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(data, dims).unwrap()
}

fn randn(dims: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(dims, 1.0, rng)
}

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// Magnitudes in [lo, hi] with random signs: far enough from 0 that a finite-difference step
/// never crosses a pole (div), a sign flip (normalisations) or a kink.
fn away_from_zero(dims: &[usize], lo: f32, hi: f32, rng: &mut Rng) -> Tensor {
    let data = (0..numel(dims))
        .map(|_| {
            let m = lo + (hi - lo) * rng.next_f32();
            if rng.next_f32() < 0.5 {
                -m
            } else {
                m
            }
        })
        .collect();
    tensor(data, dims)
}

/// Distinct values on a shuffled grid of spacing `step`: no ties, and no finite-difference step
/// smaller than step/2 can change which element is the largest.
fn distinct(dims: &[usize], step: f32, rng: &mut Rng) -> Tensor {
    let n = numel(dims);
    let mut data: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * step).collect();
    shuffle(&mut data, rng);
    tensor(data, dims)
}

/// Rows (over the last axis) whose values are spread at least `step` apart around a random
/// offset: every row of length >= 2 has a standard deviation bounded away from 0, which keeps
/// layer norm's 1/σ well conditioned for finite differences.
fn spread_rows(dims: &[usize], step: f32, rng: &mut Rng) -> Tensor {
    let row = *dims.last().unwrap();
    let rows = numel(dims) / row.max(1);
    let mut data = Vec::with_capacity(numel(dims));
    for _ in 0..rows {
        let offset = rng.normal() as f32;
        let mut grid: Vec<f32> = (0..row).map(|i| (i as f32 - row as f32 / 2.0) * step).collect();
        shuffle(&mut grid, rng);
        data.extend(grid.iter().map(|g| offset + g + 0.05 * rng.normal() as f32));
    }
    tensor(data, dims)
}

/// Exact integers in [0, n) stored as f32 (how ids and targets travel).
fn ints(dims: &[usize], n: usize, rng: &mut Rng) -> Tensor {
    tensor((0..numel(dims)).map(|_| rng.below(n as u64) as f32).collect(), dims)
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_vec().unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    values(t).iter().map(|x| x.to_bits()).collect()
}

// ---------------------------------------------------------------------------------------------
// gradcheck wrappers
// ---------------------------------------------------------------------------------------------

fn opts(seed: u64) -> GradcheckOptions {
    GradcheckOptions { seed, ..GradcheckOptions::default() }
}

fn check<F>(f: F, inputs: &[Tensor], seed: u64) -> TestResult
where
    F: Fn(&[Var]) -> Result<Var>,
{
    check_with(f, inputs, &opts(seed))
}

fn check_with<F>(f: F, inputs: &[Tensor], opts: &GradcheckOptions) -> TestResult
where
    F: Fn(&[Var]) -> Result<Var>,
{
    let shapes: Vec<String> = inputs.iter().map(|t| t.shape().to_string()).collect();
    gradcheck(f, inputs, opts)
        .map_err(|e| TestCaseError::fail(format!("{e} (inputs shaped {})", shapes.join(", "))))
}

// ---------------------------------------------------------------------------------------------
// Shape strategies
// ---------------------------------------------------------------------------------------------

/// Rank 1..=4, each dim 1..=5.
fn shape() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..6, 1..=4)
}

/// Two shapes that broadcast together: dims of a common shape, each operand with some dims set
/// to 1 and some leading dims dropped (down to a scalar).
fn broadcast_pair() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (
        prop::collection::vec(1usize..5, 1..=4),
        prop::collection::vec(any::<bool>(), 4),
        prop::collection::vec(any::<bool>(), 4),
        0usize..5,
        0usize..5,
    )
        .prop_map(|(full, ones_a, ones_b, drop_a, drop_b)| {
            let make = |ones: &[bool], drop: usize| -> Vec<usize> {
                full.iter()
                    .zip(ones)
                    .skip(drop.min(full.len()))
                    .map(|(&d, &one)| if one { 1 } else { d })
                    .collect()
            };
            (make(&ones_a, drop_a), make(&ones_b, drop_b))
        })
}

/// A matmul case: shapes of a and b and the flags.
#[derive(Clone, Debug)]
struct MatmulCase {
    a: Vec<usize>,
    b: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    /// Batch dims of the output (empty for a plain GEMM).
    batch: Vec<usize>,
    a_batched: bool,
    b_batched: bool,
}

/// Mode 0: a and b share their batch dims (possibly none); mode 1: b is rank 2 and shared by
/// every batch of a; mode 2: a is rank 2 and shared by every batch of b.
fn matmul_case() -> impl Strategy<Value = MatmulCase> {
    (
        (1usize..6, 1usize..6, 1usize..6),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(1usize..4, 0..=2),
        0u8..3,
    )
        .prop_map(|((m, k, n), trans_a, trans_b, batch, mode)| {
            let a2 = if trans_a { vec![k, m] } else { vec![m, k] };
            let b2 = if trans_b { vec![n, k] } else { vec![k, n] };
            let with_batch = |mat: &[usize]| [batch.as_slice(), mat].concat();
            let (a_batched, b_batched) = match mode {
                0 => (true, true),
                1 => (true, false),
                _ => (false, true),
            };
            let a = if a_batched { with_batch(&a2) } else { a2 };
            let b = if b_batched { with_batch(&b2) } else { b2 };
            MatmulCase { a, b, m, k, n, trans_a, trans_b, batch, a_batched, b_batched }
        })
}

fn theta(i: u8) -> Theta {
    match i % 3 {
        0 => Theta::L2NormGelu,
        1 => Theta::GeluL2Norm,
        _ => Theta::Softmax,
    }
}

fn theta_name(i: u8) -> &'static str {
    ["l2_norm_gelu", "gelu_l2_norm", "softmax"][(i % 3) as usize]
}

// ---------------------------------------------------------------------------------------------
// Naive references
// ---------------------------------------------------------------------------------------------

fn broadcast_dims(a: &[usize], b: &[usize]) -> Vec<usize> {
    let rank = a.len().max(b.len());
    let dim = |d: &[usize], i: usize| if i < rank - d.len() { 1 } else { d[i - (rank - d.len())] };
    (0..rank).map(|i| dim(a, i).max(dim(b, i))).collect()
}

/// The flat index into an operand shaped `dims` of the element read at multi-index `idx` of
/// the broadcast shape (stretched dims always read index 0).
fn broadcast_index(idx: &[usize], dims: &[usize]) -> usize {
    let offset = idx.len() - dims.len();
    dims.iter().enumerate().fold(0, |flat, (i, &d)| {
        let j = if d == 1 { 0 } else { idx[offset + i] };
        flat * d + j
    })
}

fn unravel(mut flat: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for i in (0..dims.len()).rev() {
        idx[i] = flat % dims[i];
        flat /= dims[i];
    }
    idx
}

fn naive_broadcast(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32) -> (Vec<usize>, Vec<f32>) {
    let out = broadcast_dims(a.dims(), b.dims());
    let (av, bv) = (values(a), values(b));
    let data = (0..numel(&out))
        .map(|flat| {
            let idx = unravel(flat, &out);
            f(av[broadcast_index(&idx, a.dims())], bv[broadcast_index(&idx, b.dims())])
        })
        .collect();
    (out, data)
}

/// Naive product in f64, with Σ|a||b| per output element for a rounding-aware tolerance.
fn naive_matmul(case: &MatmulCase, a: &[f32], b: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (m, k, n) = (case.m, case.k, case.n);
    let batches = numel(&case.batch);
    let mut out = vec![0.0; batches * m * n];
    let mut mag = vec![0.0; batches * m * n];
    for t in 0..batches {
        let a_off = if case.a_batched { t * m * k } else { 0 };
        let b_off = if case.b_batched { t * k * n } else { 0 };
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut s_abs) = (0.0f64, 0.0f64);
                for p in 0..k {
                    let x = if case.trans_a { a[a_off + p * m + i] } else { a[a_off + i * k + p] };
                    let y = if case.trans_b { b[b_off + j * k + p] } else { b[b_off + p * n + j] };
                    s += x as f64 * y as f64;
                    s_abs += (x as f64 * y as f64).abs();
                }
                out[t * m * n + i * n + j] = s;
                mag[t * m * n + i * n + j] = s_abs;
            }
        }
    }
    (out, mag)
}

fn assert_err<T: std::fmt::Debug>(r: Result<T>, op: &str, needles: &[&str]) {
    let msg = match r {
        Ok(v) => panic!("{op}: expected an error, got Ok({v:?})"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains(op), "error message {msg:?} does not name the op {op:?}");
    for needle in needles {
        assert!(msg.contains(needle), "error message {msg:?} does not mention {needle:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 1. gradcheck of every differentiable op
// ---------------------------------------------------------------------------------------------

proptest! {
    // grad_composite_pattention_layer sets aside ill-conditioned draws (about one in five);
    // the raised limit keeps long runs (PROPTEST_CASES) from stopping on them.
    #![proptest_config(ProptestConfig {
        max_global_rejects: 1 << 20,
        ..ProptestConfig::with_cases(24)
    })]

    #[test]
    fn grad_add_sub_broadcast((da, db) in broadcast_pair(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let (a, b) = (randn(&da, &mut rng), randn(&db, &mut rng));
        check(|v| v[0].add(&v[1]), &[a.clone(), b.clone()], seed)?;
        check(|v| v[0].sub(&v[1]), &[a, b], seed)?;
    }

    #[test]
    fn grad_mul_div_broadcast((da, db) in broadcast_pair(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let a = randn(&da, &mut rng);
        let b = away_from_zero(&db, 0.5, 2.0, &mut rng);
        check(|v| v[0].mul(&v[1]), &[a.clone(), b.clone()], seed)?;
        check(|v| v[0].div(&v[1]), &[a, b], seed)?;
    }

    #[test]
    fn grad_same_operand_twice(dims in shape(), seed in any::<u64>()) {
        // x·x and x/x: both operands are the same Var, so the two gradients must add up.
        let mut rng = Rng::new(seed);
        let x = away_from_zero(&dims, 0.5, 2.0, &mut rng);
        check(|v| v[0].mul(&v[0]), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].div(&v[0])?.add(&v[0]), &[x], seed)?;
    }

    #[test]
    fn grad_neg_affine_scale_add_scalar(
        dims in shape(),
        seed in any::<u64>(),
        mul in -3.0f32..3.0,
        add in -3.0f32..3.0,
    ) {
        let x = randn(&dims, &mut Rng::new(seed));
        check(|v| v[0].neg(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].affine(mul, add), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].scale(mul), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].add_scalar(add), &[x], seed)?;
    }

    #[test]
    fn grad_exp_square_gelu(dims in shape(), seed in any::<u64>()) {
        let x = randn(&dims, &mut Rng::new(seed));
        check(|v| v[0].exp(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].square(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].gelu(), &[x], seed)?;
    }

    #[test]
    fn grad_relu_tanh_sigmoid(dims in shape(), seed in any::<u64>()) {
        // relu away from its kink: a finite difference across 0 measures neither side's slope.
        let mut rng = Rng::new(seed);
        let away = away_from_zero(&dims, 0.1, 3.0, &mut rng);
        check(|v| v[0].relu(), std::slice::from_ref(&away), seed)?;
        // The three chained, as in a small MLP (tanh keeps the sign, so relu's input stays
        // away from 0 too).
        check(|v| v[0].tanh()?.relu()?.sigmoid(), &[away], seed)?;
        let x = Tensor::randn(&dims, 2.0, &mut rng);
        check(|v| v[0].tanh(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].sigmoid(), &[x], seed)?;
    }

    #[test]
    fn grad_log_sqrt_powf(
        dims in shape(),
        seed in any::<u64>(),
        p in prop_oneof![
            prop::sample::select(vec![-1.5f32, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0]),
            -2.0f32..3.0,
        ],
    ) {
        // Positive inputs well away from 0, where log, sqrt and x^p are smooth.
        let x = Tensor::rand_uniform(&dims, 0.5, 2.0, &mut Rng::new(seed));
        check(|v| v[0].log(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].sqrt(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].powf(p), &[x], seed)?;
    }

    #[test]
    fn grad_sum_mean_over_axes(
        dims in shape(),
        pick in prop::collection::vec(any::<bool>(), 4),
        keepdim in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let mut axes: Vec<usize> = (0..dims.len()).filter(|&i| pick[i]).collect();
        if axes.is_empty() {
            axes.push(rng.below(dims.len() as u64) as usize);
        }
        // Axes in any order name the same reduction.
        shuffle(&mut axes, &mut rng);
        let x = randn(&dims, &mut rng);
        check(|v| v[0].sum(&axes, keepdim), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].mean(&axes, keepdim), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].sum_all(), &[x], seed)?;
    }

    #[test]
    fn grad_max_over_axis(
        dims in shape(),
        axis in 0usize..4,
        keepdim in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let axis = axis % dims.len();
        // Grid spacing 0.1 against a finite-difference step of 0.01: the winner never changes.
        let x = distinct(&dims, 0.1, &mut Rng::new(seed));
        check(|v| v[0].max(axis, keepdim), &[x], seed)?;
    }

    #[test]
    fn grad_matmul(case in matmul_case(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let (a, b) = (randn(&case.a, &mut rng), randn(&case.b, &mut rng));
        let (ta, tb) = (case.trans_a, case.trans_b);
        check(|v| v[0].matmul_t(&v[1], ta, tb), &[a, b], seed)?;
    }

    #[test]
    fn grad_softmax_log_softmax(dims in shape(), seed in any::<u64>()) {
        let x = Tensor::randn(&dims, 2.0, &mut Rng::new(seed));
        check(|v| v[0].softmax(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].log_softmax(), &[x], seed)?;
    }

    #[test]
    fn grad_causal_softmax_kernel(
        lead in prop::collection::vec(1usize..3, 0..=2),
        t in 1usize..6,
        scale in 0.2f32..2.0,
        seed in any::<u64>(),
    ) {
        // causal_softmax has no Var method of its own (attention uses it); its backward kernel
        // is checked here through a user-defined op.
        let dims = [lead.as_slice(), &[t, t]].concat();
        let x = randn(&dims, &mut Rng::new(seed));
        let op = |v: &[Var]| -> Result<Var> {
            let p = softmax::causal_softmax(v[0].value(), scale)?;
            let saved = p.clone();
            Ok(Var::from_op("causal_softmax", p, &[&v[0]], Box::new(move |g| {
                Ok(vec![Some(softmax::causal_softmax_backward(&saved, g, scale)?)])
            })))
        };
        check(op, &[x], seed)?;
    }

    #[test]
    fn grad_broadcast_to_kernel((small, big) in broadcast_pair(), seed in any::<u64>()) {
        // broadcast_to and sum_to_shape are each other's adjoint; checked as a user-defined op.
        let target = broadcast_dims(&small, &big);
        let x = randn(&small, &mut Rng::new(seed));
        let op = |v: &[Var]| -> Result<Var> {
            let y = reduce::broadcast_to(v[0].value(), &target)?;
            let dims = v[0].dims().to_vec();
            Ok(Var::from_op("broadcast_to", y, &[&v[0]], Box::new(move |g| {
                Ok(vec![Some(reduce::sum_to_shape(g, &dims)?)])
            })))
        };
        check(op, &[x], seed)?;
    }

    #[test]
    fn grad_layer_norm(
        lead in prop::collection::vec(1usize..4, 0..=2),
        n in 1usize..6,
        has_w in any::<bool>(),
        has_b in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let dims = [lead.as_slice(), &[n]].concat();
        let x = spread_rows(&dims, 0.5, &mut rng);
        let w = randn(&[n], &mut rng);
        let b = randn(&[n], &mut rng);
        let mut inputs = vec![x];
        if has_w {
            inputs.push(w);
        }
        if has_b {
            inputs.push(b);
        }
        let op = |v: &[Var]| {
            let w = if has_w { Some(&v[1]) } else { None };
            let b = if has_b { Some(&v[if has_w { 2 } else { 1 }]) } else { None };
            v[0].layer_norm(w, b, 1e-5)
        };
        check(op, &inputs, seed)?;
    }

    #[test]
    fn grad_pattention_norm(
        lead in prop::collection::vec(1usize..4, 1..=2),
        n in 1usize..6,
        which in 0u8..3,
        tau in 0.5f32..3.0,
        seed in any::<u64>(),
    ) {
        let dims = [lead.as_slice(), &[n]].concat();
        let mut a = values(&away_from_zero(&dims, 0.5, 2.0, &mut Rng::new(seed)));
        if which % 3 == 1 {
            // GELU of a negative score is tiny (>= -0.17), so an all-negative row has a small
            // ‖h‖ and a steep τ·h/‖h‖; one positive score per row keeps ‖h‖ >= GELU(0.5).
            for row in a.chunks_mut(n) {
                row[0] = row[0].abs();
            }
        }
        let a = tensor(a, &dims);
        let th = theta(which);
        check(|v| v[0].pattention_norm(th, tau), &[a], seed)
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", theta_name(which))))?;
    }

    #[test]
    fn grad_embedding_weight(
        vocab in 1usize..6,
        d in 1usize..5,
        id_dims in prop::collection::vec(1usize..5, 1..=2),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let weight = randn(&[vocab, d], &mut rng);
        let mut ids = values(&ints(&id_dims, vocab, &mut rng));
        // At least one repeated id whenever there are two, so the scatter-add must accumulate.
        if ids.len() >= 2 {
            let last = ids.len() - 1;
            ids[last] = ids[0];
        }
        let ids = tensor(ids, &id_dims);
        check(|v| autograd::embedding(&v[0], &ids), &[weight], seed)?;
    }

    #[test]
    fn grad_cross_entropy_logits(n in 1usize..6, vocab in 1usize..6, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let logits = Tensor::randn(&[n, vocab], 2.0, &mut rng);
        let targets = ints(&[n], vocab, &mut rng);
        check(|v| v[0].cross_entropy(&targets), &[logits], seed)?;
    }

    #[test]
    fn grad_rope(
        lead in prop::collection::vec(1usize..3, 0..=2),
        t in 1usize..6,
        extra_rows in 0usize..3,
        head_dim in 1usize..8,
        mode in 0u8..3,
        base in prop::sample::select(vec![10.0f64, 100.0, 10000.0]),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        // Mode 0: no rotation; mode 1: the full (even) head dim; mode 2: any even prefix.
        let (head_dim, rotary) = match mode {
            0 => (head_dim, 0),
            1 => (head_dim + head_dim % 2, head_dim + head_dim % 2),
            _ => (head_dim, 2 * rng.below(head_dim as u64 / 2 + 1) as usize),
        };
        let (cos, sin) = rope::rope_tables(t + extra_rows, rotary, base).unwrap();
        let dims = [lead.as_slice(), &[t, head_dim]].concat();
        let x = randn(&dims, &mut rng);
        check(|v| v[0].rope(&cos, &sin), &[x], seed)?;
    }

    #[test]
    fn grad_causal_attention(
        (b, h, t, dh) in (1usize..3, 1usize..3, 1usize..6, 1usize..5),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let dims = [b, h, t, dh];
        let (q, k, v) = (randn(&dims, &mut rng), randn(&dims, &mut rng), randn(&dims, &mut rng));
        let inputs = [q, k, v];
        check(|x| autograd::causal_attention_fused(&x[0], &x[1], &x[2]), &inputs, seed)?;
        check(|x| autograd::causal_attention_plain(&x[0], &x[1], &x[2]), &inputs, seed)?;
    }

    /// The fused kernel's tiles (64 query rows and 128 keys on the CPU) matter past one tile.
    #[test]
    fn grad_causal_attention_fused_across_tiles(t in 60usize..140, dh in 1usize..4, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let dims = [1, 1, t, dh];
        let inputs = [randn(&dims, &mut rng), randn(&dims, &mut rng), randn(&dims, &mut rng)];
        check(|x| autograd::causal_attention_fused(&x[0], &x[1], &x[2]), &inputs, seed)?;
    }

    #[test]
    fn grad_reshape_permute_transpose(
        dims in shape(),
        axes in (0usize..4, 0usize..4),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let x = randn(&dims, &mut rng);
        let mut perm: Vec<usize> = (0..dims.len()).collect();
        shuffle(&mut perm, &mut rng);
        let (a, b) = (axes.0 % dims.len(), axes.1 % dims.len());
        let reversed: Vec<usize> = dims.iter().rev().copied().collect();
        let flat = [numel(&dims)];
        // Each layout op is followed by an elementwise map so the weights of gradcheck land on
        // moved positions rather than all on a pass-through.
        check(|v| v[0].reshape(&reversed)?.square(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].reshape(&flat), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].permute(&perm)?.square(), std::slice::from_ref(&x), seed)?;
        check(|v| v[0].transpose(a, b)?.square(), &[x], seed)?;
    }

    #[test]
    fn grad_narrow(dims in shape(), pick in (0usize..4, 0usize..8, 0usize..8), seed in any::<u64>()) {
        let axis = pick.0 % dims.len();
        let start = pick.1 % dims[axis];
        let len = 1 + pick.2 % (dims[axis] - start);
        let x = randn(&dims, &mut Rng::new(seed));
        check(|v| v[0].narrow(axis, start, len)?.square(), &[x], seed)?;
    }

    #[test]
    fn grad_concat(
        dims in shape(),
        axis in 0usize..4,
        sizes in prop::collection::vec(1usize..4, 1..=3),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let axis = axis % dims.len();
        let pieces: Vec<Tensor> = sizes
            .iter()
            .map(|&s| {
                let mut d = dims.clone();
                d[axis] = s;
                randn(&d, &mut rng)
            })
            .collect();
        check(
            |v| {
                let refs: Vec<&Var> = v.iter().collect();
                autograd::concat(&refs, axis)?.square()
            },
            &pieces,
            seed,
        )?;
    }

    #[test]
    fn grad_composite_pattention_layer(
        (t, d_in, n, d_out) in (1usize..4, 1usize..5, 1usize..5, 1usize..4),
        which in 0u8..3,
        seed in any::<u64>(),
    ) {
        // X·Kᵀ → Θ → ·V, the way the model uses these pieces, w.r.t. X, K and V at once.
        let mut rng = Rng::new(seed);
        let x = away_from_zero(&[t, d_in], 0.5, 1.5, &mut rng);
        let k = away_from_zero(&[n, d_in], 0.5, 1.5, &mut rng);
        let v = randn(&[n, d_out], &mut rng);
        let th = theta(which);
        let tau = (n as f32).sqrt();
        // Θ is steep where a row of scores is near 0 (its norm for l2_norm_gelu, its GELU for
        // gelu_l2_norm): there a finite difference measures the curvature, not the slope. Such
        // draws are set aside; grad_pattention_norm covers Θ itself with controlled scores.
        let scores = values(&matmul::matmul(&x, &k, false, true).unwrap());
        let well_conditioned = scores.chunks(n).all(|row| {
            let norm = row.iter().map(|s| s * s).sum::<f32>().sqrt();
            let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            match th {
                Theta::L2NormGelu => norm > 0.5,
                Theta::GeluL2Norm => top > 0.5,
                Theta::Softmax => true,
            }
        });
        prop_assume!(well_conditioned);
        let op = |p: &[Var]| p[0].matmul_t(&p[1], false, true)?.pattention_norm(th, tau)?.matmul(&p[2]);
        // Scores move by up to ~1.5·eps per step of an X or K entry, and a row norm can be as
        // small as 0.5: with the default eps = 1e-2 the truncation error of the central
        // difference reaches the tolerance on rare draws (the gradient then still agrees to
        // 1e-3 at eps = 1e-3). A smaller step keeps it well below; f32 rounding stays negligible
        // at these sizes.
        let opts = GradcheckOptions { eps: 3e-3, ..opts(seed) };
        check_with(op, &[x, k, v], &opts)
            .map_err(|e| TestCaseError::fail(format!("{}: {e}", theta_name(which))))?;
    }
}

// ---------------------------------------------------------------------------------------------
// A wrong backward that a plain sum cannot see
// ---------------------------------------------------------------------------------------------

/// softmax forward with a backward that subtracts the row mean of g instead of Σ g⊙y:
/// y⊙(g − mean g). For g = 1 (the gradient of a plain sum) both give exactly 0, so comparing
/// against the derivative of Σ y passes; any other g exposes the error.
fn softmax_with_wrong_backward(v: &[Var]) -> Result<Var> {
    let y = softmax::softmax(v[0].value())?;
    let saved = y.clone();
    Ok(Var::from_op(
        "softmax_wrong_backward",
        y,
        &[&v[0]],
        Box::new(move |g| {
            let last = g.dims().len() - 1;
            let mean = reduce::mean(g, &[last], true)?;
            let centred = binary::sub(g, &mean)?;
            Ok(vec![Some(binary::mul(&saved, &centred)?)])
        }),
    ))
}

#[test]
fn random_weights_catch_a_backward_that_a_plain_sum_hides() {
    let x = Tensor::randn(&[3, 5], 1.5, &mut Rng::new(11));

    // With a plain sum as the loss, the wrong backward agrees with the truth: d(Σ softmax)/dx
    // is 0 everywhere, and y⊙(1 − mean 1) is 0 too.
    let p = Var::param(x.clone());
    let out = softmax_with_wrong_backward(std::slice::from_ref(&p)).unwrap();
    let grads = out.backward_with(Tensor::ones(out.dims(), Device::Cpu).unwrap()).unwrap();
    let g = values(grads.get(&p).unwrap());
    assert!(g.iter().all(|v| v.abs() < 1e-6), "plain-sum gradient should vanish: {g:?}");

    // The right backward passes gradcheck, the wrong one does not.
    gradcheck(|v| v[0].softmax(), std::slice::from_ref(&x), &GradcheckOptions::default()).unwrap();
    let err = gradcheck(softmax_with_wrong_backward, &[x], &GradcheckOptions::default())
        .expect_err("gradcheck must reject y⊙(g − mean g)");
    assert!(err.to_string().contains("gradcheck: input 0"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// 2-5. Forward properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn broadcasting_equals_expansion_and_naive_loop(
        (da, db) in broadcast_pair(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let (a, b) = (randn(&da, &mut rng), randn(&db, &mut rng));
        let out = broadcast_dims(&da, &db);
        let a_full = reduce::broadcast_to(&a, &out).unwrap();
        let b_full = reduce::broadcast_to(&b, &out).unwrap();
        prop_assert_eq!(a_full.dims(), out.as_slice());
        type Kernel = fn(&Tensor, &Tensor) -> Result<Tensor>;
        type Naive = fn(f32, f32) -> f32;
        let cases: [(&str, Kernel, Naive); 4] = [
            ("add", binary::add, |x, y| x + y),
            ("mul", binary::mul, |x, y| x * y),
            ("sub", binary::sub, |x, y| x - y),
            ("div", binary::div, |x, y| x / y),
        ];
        for (name, kernel, f) in cases {
            let got = kernel(&a, &b).unwrap();
            let expanded = kernel(&a_full, &b_full).unwrap();
            let (naive_dims, naive) = naive_broadcast(&a, &b, f);
            prop_assert_eq!(got.dims(), naive_dims.as_slice(), "{} dims", name);
            prop_assert_eq!(bits(&got), bits(&expanded), "{} vs expanded operands", name);
            let naive_bits: Vec<u32> = naive.iter().map(|x| x.to_bits()).collect();
            prop_assert_eq!(bits(&got), naive_bits, "{} vs naive loop", name);
        }
        // sum_to_shape undoes broadcast_to up to the multiplicity of each element.
        let count = (numel(&out) / numel(&da).max(1)) as f32;
        let back = values(&reduce::sum_to_shape(&a_full, &da).unwrap());
        for (x, y) in values(&a).iter().zip(&back) {
            prop_assert!((x * count - y).abs() <= 1e-5 * (1.0 + y.abs()), "{} vs {}", x * count, y);
        }
    }

    #[test]
    fn matmul_equals_naive_triple_loop(case in matmul_case(), seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let (a, b) = (randn(&case.a, &mut rng), randn(&case.b, &mut rng));
        let got = matmul::matmul(&a, &b, case.trans_a, case.trans_b).unwrap();
        let expect_dims = [case.batch.as_slice(), &[case.m, case.n]].concat();
        prop_assert_eq!(got.dims(), expect_dims.as_slice());
        let (naive, mag) = naive_matmul(&case, &values(&a), &values(&b));
        for (i, (g, (e, m))) in values(&got).iter().zip(naive.iter().zip(&mag)).enumerate() {
            let tol = 1e-5 * (1.0 + m);
            prop_assert!(((*g as f64) - e).abs() <= tol, "element {}: {} vs naive {} ({:?})", i, g, e, case);
        }
    }

    #[test]
    fn softmax_rows_are_distributions(
        dims in shape(),
        std in prop::sample::select(vec![0.1f32, 1.0, 10.0, 100.0]),
        seed in any::<u64>(),
    ) {
        // Large spreads check the max subtraction: exp of unshifted scores would overflow.
        let x = Tensor::randn(&dims, std, &mut Rng::new(seed));
        let row = *dims.last().unwrap();
        let xv = values(&x);
        let y = values(&softmax::softmax(&x).unwrap());
        let ly = values(&softmax::log_softmax(&x).unwrap());
        for (r, (p, lp)) in y.chunks(row).zip(ly.chunks(row)).enumerate() {
            prop_assert!(p.iter().all(|v| v.is_finite() && *v >= 0.0), "row {} {:?}", r, p);
            let s: f64 = p.iter().map(|&v| v as f64).sum();
            prop_assert!((s - 1.0).abs() <= 1e-5, "row {} sums to {}", r, s);
            let ls: f64 = lp.iter().map(|&v| (v as f64).exp()).sum();
            prop_assert!(lp.iter().all(|v| v.is_finite() && *v <= 0.0), "log row {} {:?}", r, lp);
            // log_softmax subtracts max + ln Σ as one f32, which carries the rounding of the
            // max (reported; log_softmax_is_accurate_for_large_logits below): the tolerance
            // grows with the largest logit.
            let top = xv[r * row..][..row].iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            let tol = 1e-5 + 2.0 * f32::EPSILON as f64 * top;
            prop_assert!((ls - 1.0).abs() <= tol, "exp(log_softmax) row {} sums to {}", r, ls);
        }
    }

    #[test]
    fn causal_softmax_is_masked_softmax(
        lead in prop::collection::vec(1usize..3, 0..=2),
        t in 1usize..7,
        scale in 0.05f32..3.0,
        seed in any::<u64>(),
    ) {
        let dims = [lead.as_slice(), &[t, t]].concat();
        let x = Tensor::randn(&dims, 3.0, &mut Rng::new(seed));
        let xs = values(&x);
        let p = values(&softmax::causal_softmax(&x, scale).unwrap());
        prop_assert_eq!(p.len(), xs.len());
        for (r, (row, xrow)) in p.chunks(t).zip(xs.chunks(t)).enumerate() {
            let i = r % t;
            prop_assert!(row[i + 1..].iter().all(|&v| v == 0.0), "row {} above diagonal: {:?}", r, row);
            // Reference: softmax of scale·x over columns 0..=i, in f64.
            let m = xrow[..=i].iter().map(|&v| (scale * v) as f64).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = xrow[..=i].iter().map(|&v| ((scale * v) as f64 - m).exp()).sum();
            for j in 0..=i {
                let e = ((scale * xrow[j]) as f64 - m).exp() / z;
                prop_assert!(row[j] >= 0.0 && (row[j] as f64 - e).abs() <= 1e-6, "row {} col {}: {} vs {}", r, j, row[j], e);
            }
        }
    }

    #[test]
    fn narrow_and_concat_are_inverse(
        dims in shape(),
        axis in 0usize..4,
        cuts in prop::collection::vec(0usize..6, 0..=3),
        seed in any::<u64>(),
    ) {
        let axis = axis % dims.len();
        let x = randn(&dims, &mut Rng::new(seed));
        // Cut points along the axis (possibly equal: empty pieces are pieces too).
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (dims[axis] + 1)).collect();
        bounds.push(0);
        bounds.push(dims[axis]);
        bounds.sort_unstable();
        let pieces: Vec<Tensor> = bounds
            .windows(2)
            .map(|w| layout::narrow(&x, axis, w[0], w[1] - w[0]).unwrap())
            .collect();
        let joined = layout::concat(&pieces, axis).unwrap();
        prop_assert_eq!(joined.dims(), x.dims());
        prop_assert_eq!(bits(&joined), bits(&x));

        // And the other way round: narrowing a concatenation gives back each piece.
        let mut start = 0;
        for piece in &pieces {
            let len = piece.dims()[axis];
            let again = layout::narrow(&joined, axis, start, len).unwrap();
            prop_assert_eq!(again.dims(), piece.dims());
            prop_assert_eq!(bits(&again), bits(piece));
            start += len;
        }
        // concat_backward splits a gradient the same way.
        let sizes: Vec<usize> = pieces.iter().map(|p| p.dims()[axis]).collect();
        let split = layout::concat_backward(&x, &sizes, axis).unwrap();
        for (s, p) in split.iter().zip(&pieces) {
            prop_assert_eq!(bits(s), bits(p));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Specific edge cases
// ---------------------------------------------------------------------------------------------

#[test]
fn pattention_norm_of_a_zero_row_is_zero_with_zero_gradient() {
    // SPEC §1: ‖a‖ = 0 gives S = 0 and gradient 0, never NaN (the l2 variants; softmax of a zero
    // row is uniform).
    let a = tensor(vec![0.0, 0.0, 0.0, 1.0, -2.0, 0.5], &[2, 3]);
    let g = tensor(vec![1.0, -1.0, 0.5, 0.3, 0.2, 0.1], &[2, 3]);
    for th in [Theta::L2NormGelu, Theta::GeluL2Norm] {
        let s = values(&pattention_norm::pattention_norm(&a, th, 2.0).unwrap());
        assert_eq!(&s[..3], &[0.0, 0.0, 0.0]);
        assert!(s.iter().all(|v| v.is_finite()), "{s:?}");
        let ga = values(&pattention_norm::pattention_norm_backward(&a, th, 2.0, &g).unwrap());
        assert_eq!(&ga[..3], &[0.0, 0.0, 0.0]);
        assert!(ga.iter().all(|v| v.is_finite()), "{ga:?}");
    }
    let s = values(&pattention_norm::pattention_norm(&a, Theta::Softmax, 2.0).unwrap());
    for v in &s[..3] {
        assert!((v - 4.0 / 3.0).abs() < 1e-6, "{s:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn l2_norm_gelu_is_scale_invariant(
        dims in prop::collection::vec(1usize..6, 2..=3),
        log10_scale in -3.0f64..3.0,
        tau in 0.5f32..4.0,
        seed in any::<u64>(),
    ) {
        // GELU(τ·a/‖a‖) depends only on the direction of a row.
        let a = randn(&dims, &mut Rng::new(seed));
        let c = 10f64.powf(log10_scale) as f32;
        let scaled = tokenformer::ops::unary::affine(&a, c, 0.0).unwrap();
        let s = values(&pattention_norm::pattention_norm(&a, Theta::L2NormGelu, tau).unwrap());
        let s_scaled = values(&pattention_norm::pattention_norm(&scaled, Theta::L2NormGelu, tau).unwrap());
        for (x, y) in s.iter().zip(&s_scaled) {
            prop_assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{} vs {} at scale {}", x, y, c);
        }
    }
}

#[test]
fn l2_norm_gelu_is_scale_invariant_at_extreme_scales() {
    let a = tensor(vec![1.0, -0.5, 2.0], &[1, 3]);
    let s = values(&pattention_norm::pattention_norm(&a, Theta::L2NormGelu, 2.0).unwrap());
    for c in [1e20f32, 1e-23] {
        let scaled = tokenformer::ops::unary::affine(&a, c, 0.0).unwrap();
        let got =
            values(&pattention_norm::pattention_norm(&scaled, Theta::L2NormGelu, 2.0).unwrap());
        for (x, y) in s.iter().zip(&got) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "scale {c}: {got:?} vs {s:?}");
        }
    }
}

#[test]
fn log_softmax_is_accurate_for_large_logits() {
    let x = tensor(vec![1000.0, 999.3, 998.1, 1000.2, 990.0, 999.9], &[2, 3]);
    let got = values(&softmax::log_softmax(&x).unwrap());
    for (row, out) in values(&x).chunks(3).zip(got.chunks(3)) {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let lse = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        for (&v, &y) in row.iter().zip(out) {
            let want = (v as f64 - m) - lse;
            assert!((y as f64 - want).abs() <= 1e-6, "{y} vs {want} (row {row:?})");
        }
    }
}

#[test]
fn max_gradient_goes_to_the_first_of_tied_maxima() {
    let x = tensor(vec![1.0, 3.0, 3.0, 2.0, 5.0, 5.0], &[2, 3]);
    let g = tensor(vec![10.0, 20.0], &[2]);
    let gx = values(&reduce::max_backward(&x, 1, false, &g).unwrap());
    assert_eq!(gx, vec![0.0, 10.0, 0.0, 0.0, 20.0, 0.0]);
    assert_eq!(values(&reduce::max(&x, 1, false).unwrap()), vec![3.0, 5.0]);
}

#[test]
fn rope_with_zero_rotary_dims_is_the_identity() {
    let x = randn(&[2, 3, 4], &mut Rng::new(5));
    let (cos, sin) = rope::rope_tables(3, 0, 10000.0).unwrap();
    assert_eq!(bits(&rope::rope(&x, &cos, &sin).unwrap()), bits(&x));
}

#[test]
fn cross_entropy_matches_naive_log_softmax() {
    let logits = Tensor::randn(&[4, 6], 2.0, &mut Rng::new(9));
    let targets = tensor(vec![0.0, 5.0, 2.0, 2.0], &[4]);
    let (loss, lse) = cross_entropy::cross_entropy(&logits, &targets).unwrap();
    assert_eq!(loss.dims(), &[] as &[usize]);
    assert_eq!(lse.dims(), &[4]);
    let lv = values(&logits);
    let mut total = 0.0f64;
    for (r, row) in lv.chunks(6).enumerate() {
        let lse_r = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        assert!((values(&lse)[r] as f64 - lse_r).abs() < 1e-5);
        total += lse_r - row[values(&targets)[r] as usize] as f64;
    }
    assert!((loss.to_scalar().unwrap() as f64 - total / 4.0).abs() < 1e-5);
}

// ---------------------------------------------------------------------------------------------
// 6. Errors, not panics
// ---------------------------------------------------------------------------------------------

#[test]
fn binary_rejects_shapes_that_do_not_broadcast() {
    let a = Tensor::zeros(&[2, 3], Device::Cpu).unwrap();
    let b = Tensor::zeros(&[4], Device::Cpu).unwrap();
    assert_err(binary::add(&a, &b), "add", &["[2, 3]", "[4]"]);
    assert_err(binary::sub(&a, &b), "sub", &["[2, 3]", "[4]"]);
    assert_err(binary::mul(&b, &a), "mul", &["[2, 3]", "[4]"]);
    assert_err(binary::div(&a, &b), "div", &["[2, 3]", "[4]"]);
    let c = Tensor::zeros(&[3, 2, 3], Device::Cpu).unwrap();
    assert_err(
        binary::add(&c, &Tensor::zeros(&[2, 2, 3], Device::Cpu).unwrap()),
        "add",
        &["[3, 2, 3]", "[2, 2, 3]"],
    );
    assert_err(reduce::broadcast_to(&a, &[3, 3]), "broadcast_to", &["[2, 3]", "[3, 3]"]);
    // A Var op passes the kernel's error through.
    let err = Var::param(a).add(&Var::param(b)).unwrap_err().to_string();
    assert!(err.contains("add") && err.contains("[2, 3]") && err.contains("[4]"), "{err}");
}

#[test]
fn matmul_rejects_bad_shapes() {
    let z = |d: &[usize]| Tensor::zeros(d, Device::Cpu).unwrap();
    // Inner dimensions differ.
    assert_err(
        matmul::matmul(&z(&[2, 3]), &z(&[4, 5]), false, false),
        "matmul",
        &["[2, 3]", "[4, 5]"],
    );
    // ... also after the transpose flags are applied.
    assert_err(matmul::matmul(&z(&[2, 3]), &z(&[2, 3]), false, false), "matmul", &["[2, 3]"]);
    assert_err(
        matmul::matmul(&z(&[3, 2]), &z(&[4, 3]), false, true),
        "matmul",
        &["[3, 2]", "[4, 3]"],
    );
    // Rank 1 operand.
    assert_err(matmul::matmul(&z(&[3]), &z(&[3, 2]), false, false), "matmul", &["[3]", "[3, 2]"]);
    // Batch dims that neither match nor are shared.
    assert_err(
        matmul::matmul(&z(&[2, 3, 4]), &z(&[3, 4, 5]), false, false),
        "matmul",
        &["[2, 3, 4]", "[3, 4, 5]"],
    );
    assert_err(
        matmul::matmul(&z(&[2, 2, 3, 4]), &z(&[2, 4, 5]), false, false),
        "matmul",
        &["[2, 2, 3, 4]", "[2, 4, 5]"],
    );
}

#[test]
fn narrow_rejects_bad_axes_and_ranges() {
    let x = Tensor::zeros(&[2, 3], Device::Cpu).unwrap();
    assert_err(layout::narrow(&x, 2, 0, 1), "narrow", &["[2, 3]"]);
    assert_err(layout::narrow(&x, 1, 2, 2), "narrow", &["[2, 3]"]);
    assert_err(layout::narrow(&x, 0, 3, 0), "narrow", &["[2, 3]"]);
    assert_err(layout::narrow(&x, 1, usize::MAX, 2), "narrow", &["[2, 3]"]);
    assert!(Var::param(x).narrow(0, 1, 5).is_err());
}

#[test]
fn concat_rejects_mismatched_pieces() {
    let z = |d: &[usize]| Tensor::zeros(d, Device::Cpu).unwrap();
    assert_err(layout::concat(&[z(&[2, 3]), z(&[2, 4])], 0), "concat", &["[2, 3]", "[2, 4]"]);
    assert_err(layout::concat(&[z(&[2, 3]), z(&[2, 3, 1])], 0), "concat", &["[2, 3]", "[2, 3, 1]"]);
    assert_err(layout::concat(&[z(&[2, 3]), z(&[2, 3])], 2), "concat", &["[2, 3]"]);
    assert_err(layout::concat(&[], 0), "concat", &[]);
    assert_err(layout::permute(&z(&[2, 3]), &[0, 0]), "permute", &["[2, 3]"]);
    assert_err(layout::permute(&z(&[2, 3]), &[1]), "permute", &["[2, 3]"]);
    assert!(Var::param(z(&[2])).transpose(0, 1).is_err());
}

#[test]
fn reductions_reject_bad_axes() {
    let x = Tensor::zeros(&[2, 3], Device::Cpu).unwrap();
    assert_err(reduce::sum(&x, &[2], false), "sum", &["[2, 3]"]);
    assert_err(reduce::mean(&x, &[0, 0], false), "mean", &[]);
    assert_err(reduce::max(&x, 5, true), "max", &["[2, 3]"]);
    assert_err(reduce::max(&Tensor::scalar(1.0), 0, false), "max", &["[]"]);
}

#[test]
fn layer_norm_rejects_bad_weight_bias_and_scalars() {
    let z = |d: &[usize]| Tensor::zeros(d, Device::Cpu).unwrap();
    let x = z(&[2, 3]);
    assert_err(
        layer_norm::layer_norm(&x, Some(&z(&[4])), None, 1e-5),
        "layer_norm",
        &["[2, 3]", "[4]"],
    );
    assert_err(
        layer_norm::layer_norm(&x, None, Some(&z(&[2, 3])), 1e-5),
        "layer_norm",
        &["[2, 3]"],
    );
    assert_err(layer_norm::layer_norm(&Tensor::scalar(1.0), None, None, 1e-5), "layer_norm", &[]);
}

#[test]
fn cross_entropy_rejects_bad_targets_and_shapes() {
    let logits = Tensor::zeros(&[2, 4], Device::Cpu).unwrap();
    let t = |v: Vec<f32>| tensor(v.clone(), &[v.len()]);
    // Out of range: V itself, negative, not an integer, not a number.
    assert_err(cross_entropy::cross_entropy(&logits, &t(vec![1.0, 4.0])), "cross_entropy", &["4"]);
    assert_err(
        cross_entropy::cross_entropy(&logits, &t(vec![-1.0, 0.0])),
        "cross_entropy",
        &["-1"],
    );
    assert_err(
        cross_entropy::cross_entropy(&logits, &t(vec![0.5, 0.0])),
        "cross_entropy",
        &["0.5"],
    );
    assert_err(
        cross_entropy::cross_entropy(&logits, &t(vec![f32::NAN, 0.0])),
        "cross_entropy",
        &[],
    );
    // Targets that do not match the rows, logits of the wrong rank.
    assert_err(
        cross_entropy::cross_entropy(&logits, &t(vec![0.0, 1.0, 2.0])),
        "cross_entropy",
        &["[2, 4]", "[3]"],
    );
    assert_err(
        cross_entropy::cross_entropy(&t(vec![0.0; 4]), &t(vec![0.0])),
        "cross_entropy",
        &["[4]"],
    );
    assert!(Var::param(logits).cross_entropy(&t(vec![7.0, 0.0])).is_err());
}

#[test]
fn embedding_rejects_bad_ids() {
    let weight = Tensor::zeros(&[5, 3], Device::Cpu).unwrap();
    let ids = |v: Vec<f32>| tensor(v.clone(), &[v.len()]);
    assert_err(embedding::embedding(&weight, &ids(vec![0.0, 9.0])), "embedding", &["9"]);
    assert_err(embedding::embedding(&weight, &ids(vec![5.0])), "embedding", &["5"]);
    assert_err(embedding::embedding(&weight, &ids(vec![-1.0])), "embedding", &["-1"]);
    assert_err(embedding::embedding(&weight, &ids(vec![2.5])), "embedding", &["2.5"]);
    assert_err(embedding::embedding(&weight, &ids(vec![f32::INFINITY])), "embedding", &[]);
    // Weight not a matrix.
    assert_err(
        embedding::embedding(&Tensor::zeros(&[5], Device::Cpu).unwrap(), &ids(vec![0.0])),
        "embedding",
        &["[5]"],
    );
    assert!(autograd::embedding(&Var::param(weight), &ids(vec![11.0])).is_err());
}

#[test]
fn attention_rope_softmax_and_pattention_reject_bad_shapes() {
    let z = |d: &[usize]| Tensor::zeros(d, Device::Cpu).unwrap();
    let q = z(&[1, 2, 3, 4]);
    assert_err(
        attention::causal_attention(&q, &z(&[1, 2, 3, 5]), &q),
        "attention",
        &["[1, 2, 3, 4]", "[1, 2, 3, 5]"],
    );
    assert_err(
        attention::causal_attention(&z(&[2, 3, 4]), &z(&[2, 3, 4]), &z(&[2, 3, 4])),
        "attention",
        &["[2, 3, 4]"],
    );
    assert_err(
        attention::causal_attention_fused(&q, &q, &z(&[1, 2, 4, 4])),
        "causal_attention_fused",
        &["[1, 2, 3, 4]", "[1, 2, 4, 4]"],
    );
    assert_err(
        attention::causal_attention_fused_backward(&q, &q, &q, &q, &z(&[1, 2]), &q),
        "causal_attention_fused_backward",
        &["[1, 2]"],
    );
    assert_err(softmax::causal_softmax(&z(&[2, 3]), 1.0), "causal_softmax", &["[2, 3]"]);
    assert_err(softmax::softmax(&Tensor::scalar(0.0)), "softmax", &[]);

    let (cos, sin) = rope::rope_tables(4, 4, 10000.0).unwrap();
    // Fewer head dims than rotary dims; more positions than the tables hold.
    assert_err(rope::rope(&z(&[4, 2]), &cos, &sin), "rope", &["[4, 2]"]);
    assert_err(rope::rope(&z(&[5, 4]), &cos, &sin), "rope", &["[5, 4]"]);
    assert!(rope::rope_tables(4, 3, 10000.0).is_err(), "odd rotary dims must be rejected");

    assert_err(
        pattention_norm::pattention_norm(&Tensor::scalar(1.0), Theta::L2NormGelu, 1.0),
        "pattention_norm",
        &[],
    );
}

// ---------------------------------------------------------------------------------------------
// Exact zeros appended to a row (what makes growth exact, SPEC §4)
// ---------------------------------------------------------------------------------------------

/// `x` [rows, n] with `m` zero columns appended.
fn append_zero_columns(x: &Tensor, m: usize) -> Tensor {
    let (rows, n) = (x.dims()[0], x.dims()[1]);
    let zeros = Tensor::zeros(&[rows, m], Device::Cpu).unwrap();
    let joined = layout::concat(&[x.clone(), zeros], 1).unwrap();
    assert_eq!(joined.dims(), &[rows, n + m]);
    joined
}

fn columns(x: &Tensor, start: usize, len: usize) -> Vec<u32> {
    bits(&layout::narrow(x, 1, start, len).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn appended_zero_scores_change_nothing(
        (rows, n, m, d) in (1usize..5, 1usize..40, 1usize..40, 1usize..6),
        which in 0u8..2,
        tau in 0.5f32..6.0,
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let th = theta(which);
        let a = randn(&[rows, n], &mut rng);
        let grown = append_zero_columns(&a, m);

        // Θ: the old columns are bit-identical and the new ones exactly 0 (GELU(0) = 0).
        let s = pattention_norm::pattention_norm(&a, th, tau).unwrap();
        let s_grown = pattention_norm::pattention_norm(&grown, th, tau).unwrap();
        prop_assert_eq!(columns(&s_grown, 0, n), bits(&s), "{}", theta_name(which));
        prop_assert!(values(&layout::narrow(&s_grown, 1, n, m).unwrap()).iter().all(|&v| v == 0.0));

        // Θ's backward: the gradient of the old scores is unchanged whatever flows into the new.
        let g = randn(&[rows, n], &mut rng);
        let g_grown = layout::concat(&[g.clone(), randn(&[rows, m], &mut rng)], 1).unwrap();
        let ga = pattention_norm::pattention_norm_backward(&a, th, tau, &g).unwrap();
        let ga_grown = pattention_norm::pattention_norm_backward(&grown, th, tau, &g_grown).unwrap();
        prop_assert_eq!(columns(&ga_grown, 0, n), bits(&ga), "{} backward", theta_name(which));

        // S·V with new value rows behind zero scores: the product is bit-identical.
        let v = randn(&[n, d], &mut rng);
        let v_grown = layout::concat(&[v.clone(), randn(&[m, d], &mut rng)], 0).unwrap();
        let o = matmul::matmul(&s, &v, false, false).unwrap();
        let o_grown = matmul::matmul(&s_grown, &v_grown, false, false).unwrap();
        prop_assert_eq!(bits(&o_grown), bits(&o), "S·V");

        // Row sums ignore appended zeros too.
        let sum = reduce::sum(&a, &[1], false).unwrap();
        prop_assert_eq!(bits(&reduce::sum(&grown, &[1], false).unwrap()), bits(&sum));
    }
}

// ---------------------------------------------------------------------------------------------
// Large tensors: the parallel CPU path gives what the sequential one does
// ---------------------------------------------------------------------------------------------

/// Applies `f` to each row [1, n] of `x` [rows, n] separately (each call small enough to run
/// sequentially) and joins the results.
fn row_by_row(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Vec<u32> {
    let n = x.dims()[1];
    (0..x.dims()[0])
        .flat_map(|r| bits(&f(&layout::narrow(x, 0, r, 1).unwrap().reshape(&[1, n]).unwrap())))
        .collect()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol * (1.0 + w.abs()), "{what}: element {i}: {g} vs {w}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Fused attention against the plain composition on random shapes (T up to past two CPU
    /// tiles, odd head dims), forward and all three gradients, within 1e-4·(1 + |plain|): they
    /// differ only in the order of their sums and in the exp.
    #[test]
    fn fused_attention_matches_plain(
        (b, h, t, dh) in (1usize..3, 1usize..3, 1usize..150, 1usize..40),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let dims = [b, h, t, dh];
        let (q, k, v, g) =
            (randn(&dims, &mut rng), randn(&dims, &mut rng), randn(&dims, &mut rng), randn(&dims, &mut rng));
        let (out, lse) = attention::causal_attention_fused(&q, &k, &v).unwrap();
        let (plain, probs) = attention::causal_attention(&q, &k, &v).unwrap();
        let close = |got: &Tensor, want: &Tensor, what: &str| {
            let want: Vec<f64> = values(want).iter().map(|&x| x as f64).collect();
            assert_close(&values(got), &want, 1e-4, &format!("{what} {dims:?}"));
        };
        close(&out, &plain, "out");
        let fused = attention::causal_attention_fused_backward(&q, &k, &v, &out, &lse, &g).unwrap();
        let reference = attention::causal_attention_backward(&q, &k, &v, &probs, &g).unwrap();
        close(&fused.0, &reference.0, "gq");
        close(&fused.1, &reference.1, "gk");
        close(&fused.2, &reference.2, "gv");
    }
}

#[test]
fn large_row_ops_match_row_by_row_bit_for_bit() {
    // 48 × 1024 = 49152 elements: above the size where the CPU kernels split work over threads.
    let mut rng = Rng::new(21);
    let (rows, n) = (48, 1024);
    let x = Tensor::randn(&[rows, n], 2.0, &mut rng);
    let g = randn(&[rows, n], &mut rng);
    let w = randn(&[n], &mut rng);
    let b = randn(&[n], &mut rng);
    let whole = |t: Tensor| bits(&t);
    let g_row = |r: &Tensor| {
        if r.dims()[0] == rows {
            return g.clone();
        }
        // The matching row of g, found by the row's first value (rows of randn are distinct).
        let first = values(r)[0];
        let xv = values(&x);
        let i = (0..rows).find(|&i| xv[i * n] == first).unwrap();
        layout::narrow(&g, 0, i, 1).unwrap()
    };

    type Op<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;
    let cases: Vec<(&str, Op<'_>)> = vec![
        ("softmax", Box::new(|t| softmax::softmax(t).unwrap())),
        ("log_softmax", Box::new(|t| softmax::log_softmax(t).unwrap())),
        ("gelu", Box::new(|t| tokenformer::ops::unary::gelu(t).unwrap())),
        ("exp", Box::new(|t| tokenformer::ops::unary::exp(t).unwrap())),
        ("add broadcast row", Box::new(|t| binary::add(t, &w).unwrap())),
        ("sum last axis", Box::new(|t| reduce::sum(t, &[1], true).unwrap())),
        ("max last axis", Box::new(|t| reduce::max(t, 1, true).unwrap())),
        (
            "layer_norm",
            Box::new(|t| layer_norm::layer_norm(t, Some(&w), Some(&b), 1e-5).unwrap().0),
        ),
        (
            "layer_norm backward",
            Box::new(|t| {
                let (_, stats) = layer_norm::layer_norm(t, Some(&w), Some(&b), 1e-5).unwrap();
                layer_norm::layer_norm_backward(t, Some(&w), true, &stats, &g_row(t)).unwrap().0
            }),
        ),
        (
            "softmax backward",
            Box::new(|t| {
                softmax::softmax_backward(&softmax::softmax(t).unwrap(), &g_row(t)).unwrap()
            }),
        ),
        (
            "log_softmax backward",
            Box::new(|t| {
                softmax::log_softmax_backward(&softmax::log_softmax(t).unwrap(), &g_row(t)).unwrap()
            }),
        ),
        (
            "cross_entropy lse",
            Box::new(|t| {
                let r = t.dims()[0];
                cross_entropy::cross_entropy(t, &Tensor::zeros(&[r], Device::Cpu).unwrap())
                    .unwrap()
                    .1
            }),
        ),
    ];
    for (name, f) in &cases {
        assert_eq!(whole(f(&x)), row_by_row(&x, f), "{name}");
    }
    for th in [Theta::L2NormGelu, Theta::GeluL2Norm, Theta::Softmax] {
        let fwd = |t: &Tensor| pattention_norm::pattention_norm(t, th, 3.0).unwrap();
        assert_eq!(whole(fwd(&x)), row_by_row(&x, fwd), "pattention_norm {th:?}");
        let bwd =
            |t: &Tensor| pattention_norm::pattention_norm_backward(t, th, 3.0, &g_row(t)).unwrap();
        assert_eq!(whole(bwd(&x)), row_by_row(&x, bwd), "pattention_norm backward {th:?}");
    }
}

#[test]
fn large_slices_match_slice_by_slice() {
    let mut rng = Rng::new(22);
    // causal_softmax and rope over [2, 3, T, ·], each [T, ·] slice alone below the parallel size.
    let scores = randn(&[2, 3, 128, 128], &mut rng);
    let p = softmax::causal_softmax(&scores, 0.125).unwrap();
    let x = randn(&[2, 4, 130, 32], &mut rng);
    let (cos, sin) = rope::rope_tables(130, 16, 10000.0).unwrap();
    let r = rope::rope(&x, &cos, &sin).unwrap();
    let rb = rope::rope_backward(&x, &cos, &sin).unwrap();
    for (whole, input, f) in [
        (
            &p,
            &scores,
            &(|t: &Tensor| softmax::causal_softmax(t, 0.125).unwrap())
                as &dyn Fn(&Tensor) -> Tensor,
        ),
        (&r, &x, &|t: &Tensor| rope::rope(t, &cos, &sin).unwrap()),
        (&rb, &x, &|t: &Tensor| rope::rope_backward(t, &cos, &sin).unwrap()),
    ] {
        let d = input.dims();
        let slices = d[0] * d[1];
        let flat = input.reshape(&[slices, d[2], d[3]]).unwrap();
        let parts: Vec<u32> = (0..slices)
            .flat_map(|s| {
                let slice = layout::narrow(&flat, 0, s, 1).unwrap().reshape(&[d[2], d[3]]).unwrap();
                bits(&f(&slice))
            })
            .collect();
        assert_eq!(bits(whole), parts);
    }
    // Attention per head, to a tolerance (the batched products may group sums differently).
    let dims = [1, 2, 96, 64];
    let (q, k, v) = (randn(&dims, &mut rng), randn(&dims, &mut rng), randn(&dims, &mut rng));
    let (out, _) = attention::causal_attention(&q, &k, &v).unwrap();
    let (fused, _) = attention::causal_attention_fused(&q, &k, &v).unwrap();
    for h in 0..2 {
        let head = |t: &Tensor| layout::narrow(t, 1, h, 1).unwrap();
        let (oh, _) = attention::causal_attention(&head(&q), &head(&k), &head(&v)).unwrap();
        let want: Vec<f64> = values(&oh).iter().map(|&x| x as f64).collect();
        assert_close(&values(&head(&out)), &want, 1e-5, "attention head");
        // The fused kernel computes each head alone: the same bits per head.
        let (fh, _) = attention::causal_attention_fused(&head(&q), &head(&k), &head(&v)).unwrap();
        assert_eq!(bits(&head(&fused)), bits(&fh), "fused attention head {h}");
    }
}

#[test]
fn large_matmuls_sums_and_scatters_match_naive_loops() {
    let mut rng = Rng::new(23);
    let cases = [
        // (a dims, b dims, m, k, n, trans_a, trans_b, batch, a_batched, b_batched)
        (vec![300, 64], vec![64, 200], 300, 64, 200, false, false, vec![], true, true),
        (vec![64, 300], vec![200, 64], 300, 64, 200, true, true, vec![], true, true),
        (vec![4, 64, 70], vec![4, 70, 64], 64, 70, 64, false, false, vec![4], true, true),
        (vec![4, 100, 64], vec![50, 64], 100, 64, 50, false, true, vec![4], true, false),
        (vec![64, 100], vec![3, 64, 90], 100, 64, 90, true, false, vec![3], false, true),
    ];
    for (a_dims, b_dims, m, k, n, trans_a, trans_b, batch, a_batched, b_batched) in cases {
        let case = MatmulCase {
            a: a_dims,
            b: b_dims,
            m,
            k,
            n,
            trans_a,
            trans_b,
            batch,
            a_batched,
            b_batched,
        };
        let (a, b) = (randn(&case.a, &mut rng), randn(&case.b, &mut rng));
        let got = matmul::matmul(&a, &b, trans_a, trans_b).unwrap();
        let (want, _) = naive_matmul(&case, &values(&a), &values(&b));
        assert_close(&values(&got), &want, 1e-4, &format!("matmul {case:?}"));
    }

    // Sums over a leading axis, where each task owns a block of columns.
    let x = randn(&[3, 40, 700], &mut rng);
    let xv = values(&x);
    let s = values(&reduce::sum(&x, &[1], false).unwrap());
    let want: Vec<f64> = (0..3)
        .flat_map(|o| {
            let xv = &xv;
            (0..700).map(move |i| (0..40).map(|d| xv[(o * 40 + d) * 700 + i] as f64).sum())
        })
        .collect();
    assert_close(&s, &want, 1e-5, "sum over axis 1");

    // Scatter-add of many repeated ids.
    let (vocab, d, count) = (50, 64, 1000);
    let ids = ints(&[count], vocab, &mut rng);
    let g = randn(&[count, d], &mut rng);
    let gw = values(&embedding::embedding_backward(&ids, &g, vocab).unwrap());
    let (idv, gv) = (values(&ids), values(&g));
    let mut want = vec![0.0f64; vocab * d];
    for (p, &id) in idv.iter().enumerate() {
        for j in 0..d {
            want[id as usize * d + j] += gv[p * d + j] as f64;
        }
    }
    assert_close(&gw, &want, 1e-5, "embedding_backward");
}
