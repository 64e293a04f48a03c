//! Embedding lookup: row `id` of a `[V, d]` table for every id.
//!
//! ```text
//! Forward:   out[p, :] = weight[ids[p], :]
//! Backward:  gW[v, :] = Σ_{p : ids[p] = v} g[p, :]
//! ```
//!
//! Each table row receives the sum of the gradients of the positions that read it (a
//! scatter-add, done in position order so that the result is deterministic).
//!
//! Ids: on the CPU an id that is not an integer in `[0, V)` is an error naming it. On a GPU the
//! ids are not copied back to be checked (that would stall every training step); they are
//! checked where they are made — the trainer, `eval` and `generate` check them on the host
//! before the upload. An invalid id that reaches the GPU kernels anyway gives a NaN row in the
//! forward output and contributes nothing to the backward scatter-add; no kernel reads or writes
//! out of bounds.

mod cpu;
mod cuda;

use crate::{check_ids, same_device};
use tokenformer_core::{Device, Error, Result, Tensor};

/// weight [V, d], ids [...] (f32 holding integers in [0, V)) → [..., d]. Bad ids are an error
/// on the CPU and a NaN row on a GPU (see the module comment).
pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let device = same_device("embedding", &[weight, ids])?;
    if weight.rank() != 2 {
        return Err(Error::shape(
            "embedding",
            format!("expected a [V, d] table, got {} (ids {})", weight.shape(), ids.shape()),
        ));
    }
    check_ids("embedding", ids, weight.dims()[0])?;
    match device {
        Device::Cpu => cpu::embedding(weight, ids),
        Device::Cuda(_) => cuda::embedding(weight, ids),
    }
}

/// ∂L/∂weight [vocab, d] from g = ∂L/∂out [..., d]. Bad ids are an error on the CPU and are
/// skipped on a GPU (see the module comment).
pub fn embedding_backward(ids: &Tensor, g: &Tensor, vocab: usize) -> Result<Tensor> {
    let device = same_device("embedding_backward", &[ids, g])?;
    if g.rank() != ids.rank() + 1 || &g.dims()[..ids.rank()] != ids.dims() {
        return Err(Error::shape(
            "embedding_backward",
            format!(
                "gradient of shape {} does not match ids of shape {} plus a feature axis",
                g.shape(),
                ids.shape()
            ),
        ));
    }
    check_ids("embedding_backward", ids, vocab)?;
    match device {
        Device::Cpu => cpu::embedding_backward(ids, g, vocab),
        Device::Cuda(_) => cuda::embedding_backward(ids, g, vocab),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_grad, randn, tensor, values};

    #[test]
    fn lookup_copies_rows() {
        let (v, d) = (11, 5);
        let weight = randn(&[v, d], 1);
        let ids = tensor(vec![3.0, 0.0, 10.0, 3.0, 7.0, 1.0], &[2, 3]);
        let out = embedding(&weight, &ids).unwrap();
        assert_eq!(out.dims(), &[2, 3, d]);
        let (w, o) = (values(&weight), values(&out));
        for (p, &id) in values(&ids).iter().enumerate() {
            assert_eq!(o[p * d..][..d], w[id as usize * d..][..d]);
        }
    }

    #[test]
    fn backward_scatter_adds_and_matches_finite_differences() {
        let (v, d) = (7, 3);
        let weight = randn(&[v, d], 2);
        let ids = tensor(vec![2.0, 5.0, 2.0, 0.0, 2.0], &[5]);
        let g = randn(&[5, d], 3);
        let gw = embedding_backward(&ids, &g, v).unwrap();
        assert_eq!(gw.dims(), &[v, d]);
        let gv = values(&g);
        let row2: Vec<f32> = (0..d).map(|j| gv[j] + gv[2 * d + j] + gv[4 * d + j]).collect();
        assert_eq!(values(&gw)[2 * d..3 * d], row2);
        assert_eq!(values(&gw)[d..2 * d], [0.0; 3]);
        check_grad("embedding", &weight, &g, &gw, |w| embedding(w, &ids).unwrap());
    }

    #[test]
    fn bad_ids_are_errors_naming_the_id() {
        let weight = randn(&[4, 2], 1);
        for bad in [4.0, -1.0, 1.5, f32::NAN] {
            let ids = tensor(vec![0.0, bad], &[2]);
            let err = embedding(&weight, &ids).unwrap_err().to_string();
            assert!(err.contains("embedding") && err.contains(&format!("{bad}")), "{err}");
        }
        assert!(embedding(&randn(&[4], 1), &tensor(vec![0.0], &[1])).is_err());
        let ids = tensor(vec![0.0, 1.0], &[2]);
        assert!(embedding_backward(&ids, &randn(&[3, 2], 1), 4).is_err());
        assert!(embedding_backward(&ids, &randn(&[2, 2], 1), 1).is_err());
    }
}
