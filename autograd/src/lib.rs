//! A define-by-run autodiff engine in the spirit of micrograd, over whole tensors.
//!
//! - A [`Var`] is a tensor that remembers how it was made: the op's name, its input `Var`s and a
//!   closure that turns the gradient of the output into gradients of the inputs.
//! - [`Var::backward`] sorts the graph topologically from a scalar loss and walks it backwards,
//!   adding (`+=`) gradients where a value was used more than once.
//! - The gradients of the leaves that require them (parameters) come back in a [`Gradients`]
//!   store keyed by the leaf's id. Nothing is kept on the graph itself, so dropping the loss
//!   frees the whole graph and memory stays flat across training steps.
//!
//! The forward and backward kernels live in `tokenformer-ops`, one family per module; the
//! methods in [`ops`] only connect a forward kernel to its backward one. "SPEC §n" in these
//! comments is section n of `docs/SPEC.md` at the root of the repository.

pub mod gradcheck;
pub mod ops;
pub mod profile;
mod var;

pub use gradcheck::{gradcheck, GradcheckOptions};
pub use ops::{
    causal_attention, causal_attention_fused, causal_attention_plain, concat, embedding,
};
pub use var::{is_grad_enabled, no_grad, BackwardFn, Gradients, Var};
