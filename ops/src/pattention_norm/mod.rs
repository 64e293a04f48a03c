//! Θ, the normalisation of Pattention scores (SPEC §1), row-wise over the last axis (the n
//! parameter tokens), with τ a constant of the layer.
//!
//! ```text
//! Forward, for one row a:
//!   L2NormGelu:  r = ‖a‖,  z = τ·a/r,  S = GELU(z)
//!   GeluL2Norm:  h = GELU(a),  ρ = ‖h‖,  S = τ·h/ρ
//!   Softmax:     S = τ²·softmax(a)
//! ```
//!
//! A row whose norm is 0 gives S = 0 (and gradient 0), never NaN.
//!
//! Backward, g = ∂L/∂S. The map `u ↦ τ·u/‖u‖` has Jacobian `(τ/‖u‖)(I − ûûᵀ)` with
//! `û = u/‖u‖`, and `ûûᵀ = yyᵀ/τ²` for its output `y = τû`. Hence
//!
//! ```text
//! L2NormGelu:  g_z = g ⊙ GELU′(z),  g_a = (τ/r)·(g_z − z·(z·g_z)/τ²)
//! GeluL2Norm:  g_h = (τ/ρ)·(g − S·(S·g)/τ²),  g_a = g_h ⊙ GELU′(a)
//! Softmax:     g_a = τ²·p ⊙ (g − p·g),  p = softmax(a)
//! ```
//!
//! with `GELU′(u) = Φ(u) + u·φ(u)`. Every row sum runs in the fixed lanes of `crate::lanes`,
//! whose grouping of the old terms does not depend on the row's length, so appending tokens
//! whose scores are exact zeros (growth) changes neither S nor the gradients of the old scores.

pub(crate) mod cpu;
mod cuda;

use crate::{check_same_dims, rows_and_len, same_device};
use tokenformer_core::{Device, Error, Result, Tensor};

/// Which normalisation a Pattention layer applies to its scores. The one type for Θ in every
/// crate: kernels dispatch on it, and a model config stores it under its `name` (SPEC §6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Theta {
    /// S = GELU(τ·a/‖a‖): the default, and the released models' choice.
    #[default]
    L2NormGelu,
    /// S = τ·GELU(a)/‖GELU(a)‖.
    GeluL2Norm,
    /// S = τ²·softmax(a).
    Softmax,
}

impl Theta {
    pub const ALL: [Theta; 3] = [Theta::L2NormGelu, Theta::GeluL2Norm, Theta::Softmax];

    /// The name used in `config.json` and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Theta::L2NormGelu => "l2_norm_gelu",
            Theta::GeluL2Norm => "gelu_l2_norm",
            Theta::Softmax => "softmax",
        }
    }
}

impl std::fmt::Display for Theta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Theta {
    type Err = Error;
    fn from_str(s: &str) -> Result<Theta> {
        Theta::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| {
            Error::invalid(format!(
                "unknown norm '{s}' (expected l2_norm_gelu, gelu_l2_norm or softmax)"
            ))
        })
    }
}

fn check_tau(op: &'static str, tau: f32) -> Result<()> {
    if !(tau.is_finite() && tau > 0.0) {
        return Err(Error::argument(op, format!("tau must be finite and positive, got {tau}")));
    }
    Ok(())
}

/// S = Θ(a) row-wise over the last axis of `a`.
pub fn pattention_norm(a: &Tensor, theta: Theta, tau: f32) -> Result<Tensor> {
    rows_and_len("pattention_norm", a)?;
    check_tau("pattention_norm", tau)?;
    match a.device() {
        Device::Cpu => cpu::pattention_norm(a, theta, tau),
        Device::Cuda(_) => cuda::pattention_norm(a, theta, tau),
    }
}

/// ∂L/∂a of S = Θ(a), given g = ∂L/∂S; recomputes what it needs from `a`.
pub fn pattention_norm_backward(a: &Tensor, theta: Theta, tau: f32, g: &Tensor) -> Result<Tensor> {
    let device = same_device("pattention_norm_backward", &[a, g])?;
    rows_and_len("pattention_norm_backward", a)?;
    check_same_dims("pattention_norm_backward", a, g)?;
    check_tau("pattention_norm_backward", tau)?;
    match device {
        Device::Cpu => cpu::pattention_norm_backward(a, theta, tau, g),
        Device::Cuda(_) => cuda::pattention_norm_backward(a, theta, tau, g),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grad, randn, tensor, values};

    const THETAS: [Theta; 3] = [Theta::L2NormGelu, Theta::GeluL2Norm, Theta::Softmax];

    #[test]
    fn names_print_and_parse_back() {
        for (theta, name) in THETAS.into_iter().zip(["l2_norm_gelu", "gelu_l2_norm", "softmax"]) {
            assert_eq!((theta.name(), theta.to_string()), (name, name.to_string()));
            assert_eq!(name.parse::<Theta>().unwrap(), theta);
        }
        let err = "l2norm".parse::<Theta>().unwrap_err().to_string();
        assert!(err.contains("unknown norm 'l2norm'"), "{err}");
    }

    fn gelu(x: f64) -> f64 {
        0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
    }

    fn reference_row(a: &[f32], theta: Theta, tau: f64) -> Vec<f64> {
        let a: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        match theta {
            Theta::L2NormGelu => {
                let r = norm(&a);
                a.iter().map(|&x| if r == 0.0 { 0.0 } else { gelu(tau * x / r) }).collect()
            }
            Theta::GeluL2Norm => {
                let h: Vec<f64> = a.iter().map(|&x| gelu(x)).collect();
                let rho = norm(&h);
                h.iter().map(|&x| if rho == 0.0 { 0.0 } else { tau * x / rho }).collect()
            }
            Theta::Softmax => {
                let max = a.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = a.iter().map(|x| (x - max).exp()).sum();
                a.iter().map(|x| tau * tau * (x - max).exp() / total).collect()
            }
        }
    }

    #[test]
    fn forward_matches_f64_formulas() {
        let n = 37;
        let tau = (n as f32).sqrt();
        for shape in [&[3, 4, n][..], &[400, n]] {
            let a = randn(shape, 1);
            for theta in THETAS {
                let expected: Vec<f64> = values(&a)
                    .chunks(n)
                    .flat_map(|row| reference_row(row, theta, tau as f64))
                    .collect();
                let s = pattention_norm(&a, theta, tau).unwrap();
                assert_close(&values(&s), &expected, 1e-5, 1e-5, &format!("{theta:?} {shape:?}"));
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let a = randn(&[4, 9], 2);
        let g = randn(&[4, 9], 3);
        for theta in THETAS {
            let ga = pattention_norm_backward(&a, theta, 3.0, &g).unwrap();
            check_grad(&format!("{theta:?}"), &a, &g, &ga, |t| {
                pattention_norm(t, theta, 3.0).unwrap()
            });
        }
    }

    #[test]
    fn zero_rows_give_zero_output_and_gradient() {
        let mut data = vec![0.0; 5];
        data.extend(values(&randn(&[5], 4)));
        let a = tensor(data, &[2, 5]);
        let g = randn(&[2, 5], 5);
        for theta in [Theta::L2NormGelu, Theta::GeluL2Norm] {
            let s = values(&pattention_norm(&a, theta, 2.0).unwrap());
            let ga = values(&pattention_norm_backward(&a, theta, 2.0, &g).unwrap());
            assert_eq!(s[..5], [0.0; 5], "{theta:?}");
            assert_eq!(ga[..5], [0.0; 5], "{theta:?}");
            assert!(s.iter().chain(&ga).all(|v| v.is_finite()), "{theta:?}");
        }
    }

    #[test]
    fn appended_zero_scores_change_no_bit() {
        let (rows, n, extra) = (3, 21, 10);
        let a = randn(&[rows, n], 6);
        let g = randn(&[rows, n + extra], 7);
        let pad = |x: &[f32], fill: &[f32]| -> Vec<f32> {
            x.chunks(n)
                .zip(fill.chunks(n + extra))
                .flat_map(|(row, f)| row.iter().chain(&f[n..]).copied().collect::<Vec<_>>())
                .collect()
        };
        let zeros = vec![0.0; rows * (n + extra)];
        let grown = tensor(pad(&values(&a), &zeros), &[rows, n + extra]);
        let g_old: Vec<f32> =
            values(&g).chunks(n + extra).flat_map(|row| row[..n].to_vec()).collect();
        let g_old = tensor(g_old, &[rows, n]);
        for theta in [Theta::L2NormGelu, Theta::GeluL2Norm] {
            let s = values(&pattention_norm(&a, theta, 4.0).unwrap());
            let s_grown = values(&pattention_norm(&grown, theta, 4.0).unwrap());
            assert_eq!(pad(&s, &zeros), s_grown, "{theta:?} forward");
            // The new scores' gradient entries are whatever they are; the old ones must not move
            // when the new outputs' gradient is zero (as it is right after exact growth).
            let g_grown = tensor(pad(&values(&g_old), &zeros), &[rows, n + extra]);
            let ga = values(&pattention_norm_backward(&a, theta, 4.0, &g_old).unwrap());
            let ga_grown = values(&pattention_norm_backward(&grown, theta, 4.0, &g_grown).unwrap());
            let ga_grown_old: Vec<f32> =
                ga_grown.chunks(n + extra).flat_map(|row| row[..n].to_vec()).collect();
            assert_eq!(ga, ga_grown_old, "{theta:?} backward");
        }
    }

    #[test]
    fn a_row_deep_in_the_gelu_tail_matches_float64() {
        // GeluL2Norm of scores in [−16, −12]: GELU(a) and GELU′(a) are between 1e-32 and 0
        // (subnormal in f32 below about −13), and τ/ρ ≈ 1e32 scales them back to order 1, so
        // any shortcut in the tail (an exp clamped at e⁻⁸⁷, a cancelling erf form) shows. The
        // float64 reference uses the erfc forms, which keep their relative accuracy there.
        let n = 301;
        let a: Vec<f32> =
            values(&randn(&[n], 46)).iter().map(|v| -12.0 - (v.abs() * 2.0).min(4.0)).collect();
        let g = values(&randn(&[n], 47));
        let tau = (n as f64).sqrt();
        let phi_cdf = |x: f64| 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
        let gelu = |x: f64| x * phi_cdf(x);
        let gelu_grad =
            |x: f64| phi_cdf(x) + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let h: Vec<f64> = a.iter().map(|&x| gelu(x as f64)).collect();
        let rho = h.iter().map(|x| x * x).sum::<f64>().sqrt();
        let s: Vec<f64> = h.iter().map(|x| tau * x / rho).collect();
        let s_dot_g: f64 = s.iter().zip(&g).map(|(s, &g)| s * g as f64).sum();
        let exact: Vec<f64> = (0..n)
            .map(|i| {
                let g_h = tau / rho * (g[i] as f64 - s[i] * s_dot_g / (tau * tau));
                g_h * gelu_grad(a[i] as f64)
            })
            .collect();
        let a_t = tensor(a.clone(), &[1, n]);
        let forward = values(&pattention_norm(&a_t, Theta::GeluL2Norm, tau as f32).unwrap());
        let backward = values(
            &pattention_norm_backward(&a_t, Theta::GeluL2Norm, tau as f32, &tensor(g, &[1, n]))
                .unwrap(),
        );
        // Subnormal GELU′ values carry fewer mantissa bits: 1e-3 relative, plus a floor.
        let scale = exact.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for i in 0..n {
            let (got, want) = (backward[i] as f64, exact[i]);
            assert!(
                (got - want).abs() <= 1e-3 * want.abs() + 1e-6 * scale,
                "element {i} (score {}): gradient {got:e}, float64 {want:e}",
                a[i]
            );
            let (got, want) = (forward[i] as f64, s[i]);
            assert!(
                (got - want).abs() <= 1e-4 * want.abs() + 1e-6,
                "S[{i}]: {got:e}, float64 {want:e}"
            );
        }
    }

    /// The GPU's `theta_row_norm` replayed on the CPU: thread t of a block of `block` threads
    /// sums the squares of elements t, t + block, ... in order, and `block_sum`'s tree combines
    /// the partial sums (a butterfly over each warp of 32 lanes, then one over the warps' sums).
    /// `round` is applied after every operation: `f64::from(x as f32)` replays an f32
    /// accumulation, the identity the double one.
    fn replayed_gpu_norm(u: &[f32], block: usize, round: fn(f64) -> f64) -> f32 {
        let mut partial = vec![0.0f64; block];
        for (j, &x) in u.iter().enumerate() {
            let t = j % block;
            partial[t] = round(partial[t] + round(x as f64 * x as f64));
        }
        let butterfly = |lanes: &mut [f64; 32]| {
            for offset in [16, 8, 4, 2, 1] {
                let before = *lanes;
                for (lane, v) in lanes.iter_mut().enumerate() {
                    *v = round(before[lane] + before[lane ^ offset]);
                }
            }
        };
        let mut warp_sums = [0.0f64; 32];
        for (w, chunk) in partial.chunks(32).enumerate() {
            let mut lanes = [0.0f64; 32];
            lanes[..chunk.len()].copy_from_slice(chunk);
            butterfly(&mut lanes);
            warp_sums[w] = lanes[0];
        }
        butterfly(&mut warp_sums);
        warp_sums[0].sqrt() as f32
    }

    fn as_f32(x: f64) -> f64 {
        x as f32 as f64
    }

    #[test]
    fn the_gpu_norm_summed_in_double_matches_the_cpu_on_extreme_rows() {
        use crate::unary::cpu::gelu;
        let block = tokenformer_core::cuda::BLOCK as usize;
        let base = values(&randn(&[1001], 8));
        let scaled = |k: f32| base.iter().map(|v| v * k).collect::<Vec<f32>>();
        // GeluL2Norm's u = GELU(a) for a row wholly below −10.5: squares under f32's range.
        let tail: Vec<f32> = base.iter().map(|v| gelu(-11.0 - v.abs())).collect();
        let rows = [
            ("ordinary", scaled(1.0), false),
            ("tiny scores", scaled(1e-25), true),
            ("huge scores", scaled(1e25), true),
            ("GELU tail", tail, true),
        ];
        for (what, u, f32_fails) in rows {
            let cpu = cpu::l2_norm(&u);
            let gpu = replayed_gpu_norm(&u, block, |x| x);
            assert!(cpu.is_finite() && cpu > 0.0, "{what}: cpu norm {cpu}");
            // Both round a double sum to f32: at most one f32 rounding step apart.
            let ulps = (cpu.to_bits() as i64 - gpu.to_bits() as i64).abs();
            assert!(ulps <= 1, "{what}: gpu {gpu} vs cpu {cpu} ({ulps} ulps)");
            let in_f32 = replayed_gpu_norm(&u, block, as_f32);
            let broken = in_f32 == 0.0 || in_f32.is_infinite();
            assert_eq!(broken, f32_fails, "{what}: an f32 sum gives {in_f32}");
            // Appended zero scores (exact growth) keep every bit of the double sum.
            let mut grown = u.clone();
            grown.extend(std::iter::repeat_n(0.0, 300));
            assert_eq!(replayed_gpu_norm(&grown, block, |x| x).to_bits(), gpu.to_bits(), "{what}");
        }
    }

    #[test]
    fn invalid_arguments_are_errors() {
        let a = randn(&[2, 3], 1);
        assert!(pattention_norm(&a, Theta::Softmax, f32::NAN).is_err());
        let err =
            pattention_norm_backward(&a, Theta::L2NormGelu, 1.0, &randn(&[3, 2], 2)).unwrap_err();
        assert!(err.to_string().contains("pattention_norm_backward"), "{err}");
    }
}
