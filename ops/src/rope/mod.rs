//! Rotary position embedding, GPT-NeoX style (SPEC §2), on the first r dims of each head.
//!
//! ```text
//! Tables:    inv_freq_i = base^(−2i/r) for i < r/2,   θ_{t,i} = t·inv_freq_i
//!            (computed in f64, rounded to f32 as cos θ and sin θ, each [seq, r/2])
//! Forward, for the row of position t with x₁ = x[..r/2] and x₂ = x[r/2..r]:
//!   out₁ = x₁·cos θ − x₂·sin θ,   out₂ = x₂·cos θ + x₁·sin θ,   out[r..] = x[r..]
//! Backward (each pair (x₁_i, x₂_i) is rotated by θ_i, an orthogonal map whose transpose is
//! the rotation by −θ_i):
//!   g₁ = g_out₁·cos θ + g_out₂·sin θ,   g₂ = g_out₂·cos θ − g_out₁·sin θ
//! ```

mod cpu;
mod cuda;

use crate::{cpu_tensor, same_device};
use tokenformer_core::{Device, Error, Result, Tensor};

/// (cos, sin), each [seq, rotary_dims/2], on the CPU.
pub fn rope_tables(seq: usize, rotary_dims: usize, base: f64) -> Result<(Tensor, Tensor)> {
    if !rotary_dims.is_multiple_of(2) {
        return Err(Error::argument("rope_tables", format!("rotary_dims {rotary_dims} is odd")));
    }
    if !(base.is_finite() && base > 0.0) {
        return Err(Error::argument(
            "rope_tables",
            format!("base {base} is not a positive number"),
        ));
    }
    let half = rotary_dims / 2;
    let inv_freq: Vec<f64> =
        (0..half).map(|i| base.powf(-2.0 * i as f64 / rotary_dims as f64)).collect();
    let (mut cos, mut sin) = (Vec::with_capacity(seq * half), Vec::with_capacity(seq * half));
    for t in 0..seq {
        for &f in &inv_freq {
            let angle = t as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((cpu_tensor(cos, &[seq, half]), cpu_tensor(sin, &[seq, half])))
}

/// Checks x (or g) [..., T, d_h] against tables [seq, r/2] with T ≤ seq and r ≤ d_h.
fn check(op: &'static str, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Device> {
    let device = same_device(op, &[x, cos, sin])?;
    let valid = x.rank() >= 2
        && cos.rank() == 2
        && cos.dims() == sin.dims()
        && x.dims()[x.rank() - 2] <= cos.dims()[0]
        && 2 * cos.dims()[1] <= x.dims()[x.rank() - 1];
    if !valid {
        return Err(Error::shape(
            op,
            format!(
                "expected x [..., T, d_h] and cos, sin [seq, r/2] with T <= seq and r <= d_h, \
                 got {}, {} and {}",
                x.shape(),
                cos.shape(),
                sin.shape()
            ),
        ));
    }
    Ok(device)
}

/// Rotates the first `2·cos.dims[1]` dims of every row of x by its position's angles.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    match check("rope", x, cos, sin)? {
        Device::Cpu => cpu::rope(x, cos, sin),
        Device::Cuda(_) => cuda::rope(x, cos, sin),
    }
}

/// ∂L/∂x of rope(x, cos, sin): g rotated by −θ.
pub fn rope_backward(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    match check("rope_backward", g, cos, sin)? {
        Device::Cpu => cpu::rope_backward(g, cos, sin),
        Device::Cuda(_) => cuda::rope_backward(g, cos, sin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_grad, randn, values};

    #[test]
    fn tables_match_f64_formula() {
        let (cos, sin) = rope_tables(9, 6, 10000.0).unwrap();
        assert_eq!(cos.dims(), &[9, 3]);
        let expected_angle = |t: usize, i: usize| t as f64 * 10000f64.powf(-2.0 * i as f64 / 6.0);
        let cos_ref: Vec<f64> = (0..27).map(|k| expected_angle(k / 3, k % 3).cos()).collect();
        let sin_ref: Vec<f64> = (0..27).map(|k| expected_angle(k / 3, k % 3).sin()).collect();
        assert_close(&values(&cos), &cos_ref, 1e-7, 1e-7, "cos");
        assert_close(&values(&sin), &sin_ref, 1e-7, 1e-7, "sin");
        assert!(rope_tables(4, 5, 10000.0).is_err());
        assert!(rope_tables(4, 4, -1.0).is_err());
    }

    #[test]
    fn forward_rotates_the_first_r_dims_per_position() {
        let (b, h, t, d, r) = (2, 3, 5, 7, 4);
        let (cos, sin) = rope_tables(8, r, 100.0).unwrap();
        let x = randn(&[b, h, t, d], 1);
        let out = values(&rope(&x, &cos, &sin).unwrap());
        let mut expected = Vec::new();
        for (row_index, row) in values(&x).chunks(d).enumerate() {
            let pos = row_index % t;
            let mut rotated: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            for i in 0..r / 2 {
                let angle = pos as f64 * 100f64.powf(-2.0 * i as f64 / r as f64);
                let (x1, x2) = (row[i] as f64, row[i + r / 2] as f64);
                rotated[i] = x1 * angle.cos() - x2 * angle.sin();
                rotated[i + r / 2] = x2 * angle.cos() + x1 * angle.sin();
            }
            expected.extend(rotated);
        }
        assert_close(&out, &expected, 1e-6, 1e-5, "rope");
        let (cos0, sin0) = rope_tables(8, 0, 100.0).unwrap();
        assert_eq!(values(&rope(&x, &cos0, &sin0).unwrap()), values(&x));
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (cos, sin) = rope_tables(6, 4, 10000.0).unwrap();
        let x = randn(&[2, 5, 6], 2);
        let g = randn(&[2, 5, 6], 3);
        let gx = rope_backward(&g, &cos, &sin).unwrap();
        check_grad("rope", &x, &g, &gx, |t| rope(t, &cos, &sin).unwrap());
    }

    #[test]
    fn invalid_shapes_are_errors() {
        let (cos, sin) = rope_tables(4, 4, 10000.0).unwrap();
        let err = rope(&randn(&[5, 8], 1), &cos, &sin).unwrap_err().to_string();
        assert!(err.contains("rope") && err.contains("[5, 8]") && err.contains("[4, 2]"), "{err}");
        assert!(rope(&randn(&[4, 3], 1), &cos, &sin).is_err());
        assert!(rope(&randn(&[8], 1), &cos, &sin).is_err());
    }
}
