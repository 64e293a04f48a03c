//! Elementwise binary ops with NumPy broadcasting.
//!
//! Forward: out = a ∘ b for ∘ ∈ {+, −, ×, ÷}, each operand read as if stretched to the
//! broadcast shape of the two.
//!
//! Backward, with g = ∂L/∂out, the local derivatives give
//!
//! ```text
//! add: (g, g)    sub: (g, −g)    mul: (g·b, g·a)    div: (g/b, −g·a/b²),
//! ```
//!
//! and an operand that was stretched along an axis receives the sum of its gradient along that
//! axis (`reduce::sum_to_shape`): each of its elements fed every position it was copied to.
//! The backward rules are written with these ops themselves, so one version serves every device.

mod cpu;
mod cuda;

use crate::reduce::sum_to_shape;
use crate::same_device;
use crate::unary::neg;
use tokenformer_core::{Device, Error, Result, Shape, Tensor};

/// Checks that `a` and `b` share a device and broadcast together.
fn check_operands(op: &'static str, a: &Tensor, b: &Tensor) -> Result<Device> {
    let device = same_device(op, &[a, b])?;
    Shape::broadcast(op, a.shape(), b.shape())?;
    Ok(device)
}

/// Checks that `g` has the broadcast shape of operands shaped `a_dims` and `b_dims`.
fn check_grad(op: &'static str, a_dims: &[usize], b_dims: &[usize], g: &Tensor) -> Result<()> {
    let out = Shape::broadcast(op, &Shape::new(a_dims), &Shape::new(b_dims))?;
    if out.dims() != g.dims() {
        return Err(Error::shape(
            op,
            format!(
                "gradient of shape {} does not match the broadcast shape {out} of {} and {}",
                g.shape(),
                Shape::new(a_dims),
                Shape::new(b_dims)
            ),
        ));
    }
    Ok(())
}

/// The elementwise binary ops: one table for the family. cpu.rs matches on it; on the GPU the
/// op travels as the code kernels.cu gives it, `#define OP_<NAME>` (read by cuda.rs when the
/// crate is compiled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Binary {
    Add,
    Sub,
    Mul,
    Div,
}

impl Binary {
    /// Every op, in the order of declaration.
    pub(crate) const ALL: [Binary; 4] = [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div];

    /// The op's name: errors use it, and kernels.cu spells it in capitals after `OP_`.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
        }
    }
}

/// a ∘ b over the broadcast shape of the two.
fn forward(op: Binary, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match check_operands(op.name(), a, b)? {
        Device::Cpu => cpu::forward(op, a, b),
        Device::Cuda(_) => cuda::forward(op, a, b),
    }
}

pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    forward(Binary::Add, a, b)
}

/// a + b, written over a's own buffer when nothing else holds it (on the CPU, for operands of
/// one shape): the bits of `add`, without a fresh output. For sums that build up, such as the
/// gradient of a value used several times.
pub fn add_into(mut a: Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() == b.dims() && b.device() == Device::Cpu {
        if let (Some(y), Some(x)) = (b.cpu_data(), a.cpu_data_mut()) {
            cpu::add_in_place(x, y);
            return Ok(a);
        }
    }
    add(&a, b)
}

pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    forward(Binary::Sub, a, b)
}

pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    forward(Binary::Mul, a, b)
}

pub fn div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    forward(Binary::Div, a, b)
}

/// (∂L/∂a, ∂L/∂b) of a + b, for operands shaped `a_dims` and `b_dims`.
pub fn add_backward(a_dims: &[usize], b_dims: &[usize], g: &Tensor) -> Result<(Tensor, Tensor)> {
    check_grad("add_backward", a_dims, b_dims, g)?;
    Ok((sum_to_shape(g, a_dims)?, sum_to_shape(g, b_dims)?))
}

/// (∂L/∂a, ∂L/∂b) of a − b, for operands shaped `a_dims` and `b_dims`.
pub fn sub_backward(a_dims: &[usize], b_dims: &[usize], g: &Tensor) -> Result<(Tensor, Tensor)> {
    check_grad("sub_backward", a_dims, b_dims, g)?;
    // Negating after the reduction touches b's elements, not the (larger) broadcast shape.
    Ok((sum_to_shape(g, a_dims)?, neg(&sum_to_shape(g, b_dims)?)?))
}

/// (∂L/∂a, ∂L/∂b) of a ⊙ b.
pub fn mul_backward(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    same_device("mul_backward", &[a, b, g])?;
    check_grad("mul_backward", a.dims(), b.dims(), g)?;
    let ga = sum_to_shape(&mul(g, b)?, a.dims())?;
    let gb = sum_to_shape(&mul(g, a)?, b.dims())?;
    Ok((ga, gb))
}

/// (∂L/∂a, ∂L/∂b) of a / b.
pub fn div_backward(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    same_device("div_backward", &[a, b, g])?;
    check_grad("div_backward", a.dims(), b.dims(), g)?;
    // −g·a/b² as −(g/b)·(a/b): reuses g/b and never squares a small b.
    let g_over_b = div(g, b)?;
    let a_over_b = div(a, b)?;
    let gb = sum_to_shape(&neg(&mul(&g_over_b, &a_over_b)?)?, b.dims())?;
    let ga = sum_to_shape(&g_over_b, a.dims())?;
    Ok((ga, gb))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{bits, check_grad as check, naive_broadcast, randn};

    const SHAPE_PAIRS: &[(&[usize], &[usize])] = &[
        (&[3, 5], &[3, 5]),
        (&[3, 5], &[5]),
        (&[3, 1], &[1, 5]),
        (&[2, 3, 5], &[3, 1]),
        (&[7], &[]),
        (&[], &[2, 3]),
        (&[1, 1, 3], &[3]),
        (&[5, 7, 3], &[5, 1, 3]),
    ];

    #[test]
    fn add_into_gives_the_bits_of_add_and_leaves_other_holders_alone() {
        // Large enough for the parallel chunks, with a partial last one.
        for n in [32_768 + 8192 + 3, 5] {
            let (a, b) = (randn(&[n], 1), randn(&[n], 2));
            let want = bits(&add(&a, &b).unwrap());
            let held = a.clone();
            let shared = add_into(a, &b).unwrap();
            assert_eq!(bits(&shared), want, "n {n}, shared");
            assert!(!shared.same_storage(&held) && bits(&held) == bits(&randn(&[n], 1)));
            drop(held);
            let sole = randn(&[n], 1);
            let storage = sole.cpu_data().unwrap().as_ptr();
            let summed = add_into(sole, &b).unwrap();
            assert_eq!(bits(&summed), want, "n {n}, in place");
            assert_eq!(summed.cpu_data().unwrap().as_ptr(), storage, "n {n}: not in place");
        }
        // Broadcasting takes `add`.
        let row = randn(&[5], 3);
        let m = randn(&[4, 5], 4);
        assert_eq!(bits(&add_into(m.clone(), &row).unwrap()), bits(&add(&m, &row).unwrap()));
    }

    #[test]
    fn the_op_table_matches_the_kernel_file() {
        let names: Vec<&str> = Binary::ALL.iter().map(|op| op.name()).collect();
        crate::kernels::check_op_table("binary", &names);
    }

    /// The bits of f(a, b) element by element over the broadcast shape.
    fn naive_bits(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32) -> Vec<u32> {
        naive_broadcast(a, b, f).1.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn forward_matches_naive_broadcast() {
        for (i, &(ad, bd)) in SHAPE_PAIRS.iter().enumerate() {
            let a = randn(ad, 10 + i as u64);
            let b = crate::unary::affine(&randn(bd, 20 + i as u64), 0.3, 2.0).unwrap();
            let what = format!("{ad:?} with {bd:?}");
            assert_eq!(bits(&add(&a, &b).unwrap()), naive_bits(&a, &b, |x, y| x + y), "add {what}");
            assert_eq!(bits(&sub(&a, &b).unwrap()), naive_bits(&a, &b, |x, y| x - y), "sub {what}");
            assert_eq!(bits(&mul(&a, &b).unwrap()), naive_bits(&a, &b, |x, y| x * y), "mul {what}");
            assert_eq!(bits(&div(&a, &b).unwrap()), naive_bits(&a, &b, |x, y| x / y), "div {what}");
        }
    }

    #[test]
    fn large_same_shape_and_row_broadcast_take_the_parallel_path() {
        let a = randn(&[301, 257], 1);
        let b = randn(&[257], 2);
        assert_eq!(bits(&mul(&a, &b).unwrap()), naive_bits(&a, &b, |x, y| x * y), "row");
        let c = randn(&[301, 257], 3);
        assert_eq!(bits(&add(&a, &c).unwrap()), naive_bits(&a, &c, |x, y| x + y), "same");
    }

    #[test]
    fn backward_matches_finite_differences() {
        for (i, &(ad, bd)) in SHAPE_PAIRS.iter().enumerate() {
            let a = randn(ad, 30 + i as u64);
            let b = crate::unary::affine(&randn(bd, 40 + i as u64), 0.2, 1.5).unwrap();
            let out_dims = Shape::broadcast("t", a.shape(), b.shape()).unwrap();
            let g = randn(out_dims.dims(), 50 + i as u64);
            let what = format!("{ad:?} with {bd:?}");
            type Forward = fn(&Tensor, &Tensor) -> Result<Tensor>;
            let cases: [(&str, Forward, (Tensor, Tensor)); 4] = [
                ("add", add, add_backward(ad, bd, &g).unwrap()),
                ("sub", sub, sub_backward(ad, bd, &g).unwrap()),
                ("mul", mul, mul_backward(&a, &b, &g).unwrap()),
                ("div", div, div_backward(&a, &b, &g).unwrap()),
            ];
            for (name, forward, (ga, gb)) in cases {
                check(&format!("{name} ga {what}"), &a, &g, &ga, |x| forward(x, &b).unwrap());
                check(&format!("{name} gb {what}"), &b, &g, &gb, |y| forward(&a, y).unwrap());
            }
        }
    }

    #[test]
    fn errors_name_op_and_shapes() {
        let err = add(&randn(&[3, 4], 1), &randn(&[5], 2)).unwrap_err().to_string();
        assert!(err.contains("add") && err.contains("[3, 4]") && err.contains("[5]"), "{err}");
        let err = mul_backward(&randn(&[3], 1), &randn(&[3], 2), &randn(&[4], 3)).unwrap_err();
        assert!(err.to_string().contains("mul_backward"), "{err}");
    }
}
