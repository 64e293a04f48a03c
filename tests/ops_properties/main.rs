//! Properties of the ops and of their wiring into autograd, over random small shapes and
//! values, one file per op family:
//!
//! - every differentiable op passes `gradcheck` (analytic backward = central differences),
//!   each in its family's file; `softmax.rs` also shows that gradcheck catches a wrong backward
//!   that a plain sum hides;
//! - `elementwise.rs`: broadcasting equals explicit expansion and a naive loop, bit for bit;
//! - `matmul.rs`: matmul equals a naive triple loop (every transpose flag, batched and shared
//!   operands);
//! - `softmax.rs`: softmax rows are distributions; causal_softmax is a masked softmax;
//! - `attention.rs`: fused attention matches the plain composition; rope;
//! - `pattention.rs`: Θ of a zero row, the scale invariance of `l2_norm_gelu`, and appended zero
//!   scores that change no bit (the kernel half of exact growth);
//! - `layout.rs`: narrow and concat undo each other, bit for bit;
//! - `reduce.rs`, `layer_norm.rs`, `embedding.rs` (with cross-entropy): their gradients and edge
//!   cases;
//! - `parallel.rs`: inputs large enough to be split across threads give the bits of smaller
//!   calls, and match the naive loops;
//! - in every file, bad shapes, ranks, axes and ids give errors that name the op and the shapes,
//!   not panics.
//!
//! The oracles (naive loops) are `tokenformer::ops::testing`'s, shared with the unit tests;
//! the generators and strategies are in `support.rs`. Values come from our own seeded `Rng`
//! (the seed is part of each proptest case), so a failing case is reproduced exactly by its
//! shrunk inputs. `PROPTEST_CASES` sets the number of cases of every property.

mod support;

mod attention;
mod elementwise;
mod embedding;
mod layer_norm;
mod layout;
mod matmul;
mod parallel;
mod pattention;
mod reduce;
mod softmax;
