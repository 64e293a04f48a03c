//! Layout ops: reshape, permute, transpose, narrow and concat.

use crate::support::*;
use proptest::prelude::*;
use tokenformer::autograd::{self, Var};
use tokenformer::core::{Device, Rng, Tensor};
use tokenformer::ops::layout;

proptest! {
    #![proptest_config(config(24))]

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
}

proptest! {
    #![proptest_config(config(48))]

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
