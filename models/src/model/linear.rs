//! The ordinary linear layer and MLP of the Transformer baseline: what a Pattention replaces.
//!
//! ```text
//! Linear:  Y = X·Wᵀ + b        W: d_out×d_in, b: d_out   (the layout PyTorch uses)
//! Mlp:     Y = down(GELU(up(X)))   up: d→d_ff, down: d_ff→d
//! ```
//!
//! Set side by side with Pattention's O = Θ(X·Kᵀ)·V: a linear layer is one matmul with a fixed
//! number of weights, a Pattention two matmuls around a normalisation, with as many rows as it
//! has parameter tokens. Backward, with G = ∂L/∂Y: g_W = Gᵀ·X and g_b = Σ_rows G (summed over
//! every leading axis), g_X = G·W. Both are recorded by the matmul and broadcasting-add ops, so
//! this file holds no derivative of its own.

use tokenformer_autograd::Var;
use tokenformer_core::Result;

pub struct Linear {
    /// `[d_out, d_in]`
    pub weight: Var,
    /// `[d_out]`
    pub bias: Var,
}

impl Linear {
    /// x [..., d_in] → [..., d_out].
    pub fn forward(&self, x: &Var) -> Result<Var> {
        x.matmul_t(&self.weight, false, true)?.add(&self.bias)
    }
}

/// The Transformer's feed-forward block.
pub struct Mlp {
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    /// x [..., d] → [..., d] through a hidden layer of width d_ff.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        self.down.forward(&self.up.forward(x)?.gelu()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenformer_autograd::{gradcheck, GradcheckOptions};
    use tokenformer_core::{Rng, Tensor};

    fn linear(w: &Var, b: &Var) -> Linear {
        Linear { weight: w.clone(), bias: b.clone() }
    }

    #[test]
    fn linear_matches_the_formula_and_passes_gradcheck() {
        let mut rng = Rng::new(3);
        // A batch [2, 3] of rows of width 5, mapped to width 4.
        let x = Tensor::randn(&[2, 3, 5], 1.0, &mut rng);
        let w = Tensor::randn(&[4, 5], 1.0, &mut rng);
        let b = Tensor::randn(&[4], 1.0, &mut rng);
        let y = linear(&Var::param(w.clone()), &Var::param(b.clone()))
            .forward(&Var::param(x.clone()))
            .unwrap();
        assert_eq!(y.dims(), &[2, 3, 4]);
        let (xs, ws, bs, ys) = (
            x.to_vec().unwrap(),
            w.to_vec().unwrap(),
            b.to_vec().unwrap(),
            y.value().to_vec().unwrap(),
        );
        for row in 0..6 {
            for o in 0..4 {
                let dot: f64 = (0..5).map(|i| xs[row * 5 + i] as f64 * ws[o * 5 + i] as f64).sum();
                let want = dot + bs[o] as f64;
                assert!((ys[row * 4 + o] as f64 - want).abs() < 1e-5, "row {row}, out {o}");
            }
        }
        let f = |v: &[Var]| linear(&v[1], &v[2]).forward(&v[0]);
        gradcheck(f, &[x, w, b], &GradcheckOptions::default()).unwrap();
    }

    #[test]
    fn mlp_passes_gradcheck() {
        let mut rng = Rng::new(4);
        let inputs = [
            Tensor::randn(&[3, 4], 1.0, &mut rng),
            Tensor::randn(&[6, 4], 0.5, &mut rng),
            Tensor::randn(&[6], 0.5, &mut rng),
            Tensor::randn(&[4, 6], 0.5, &mut rng),
            Tensor::randn(&[4], 0.5, &mut rng),
        ];
        let f = |v: &[Var]| {
            let mlp = Mlp { up: linear(&v[1], &v[2]), down: linear(&v[3], &v[4]) };
            mlp.forward(&v[0])
        };
        gradcheck(f, &inputs, &GradcheckOptions::default()).unwrap();
    }
}
