//! Shapes of row-major tensors and the broadcasting rule (NumPy's: align trailing dims; a dim
//! of 1 stretches to match).
//!
//! Two kinds of function live here. The checks (`check_axis`, `broadcast`) take the name of the
//! op that calls them and return an error naming it and the shapes: they are what stands
//! between user input and a kernel. The index helpers (`split_at_axis`, `broadcast_strides`)
//! run after those checks, inside a kernel's set-up, and state what the check must have
//! established; called without it, they panic with a message naming the shapes, because that
//! is a bug in the calling op, not bad input.

use crate::{Error, Result};
use std::fmt;

#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn new(dims: &[usize]) -> Self {
        Shape(dims.to_vec())
    }
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }
    /// Row-major strides in elements.
    pub fn strides(&self) -> Vec<usize> {
        let mut strides = vec![1; self.0.len()];
        for i in (0..self.0.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * self.0[i + 1];
        }
        strides
    }
    /// Checks that `axis` is a valid axis of this shape for `op`.
    pub fn check_axis(&self, op: &'static str, axis: usize) -> Result<()> {
        if axis >= self.rank() {
            return Err(Error::shape(op, format!("axis {axis} is out of range for shape {self}")));
        }
        Ok(())
    }
    /// (outer, dim, inner): the sizes before, at and after `axis`, the view every axis
    /// reduction and concatenation works in.
    ///
    /// Precondition: `axis < self.rank()`, which the op checks first with
    /// [`check_axis`](Shape::check_axis). Panics otherwise.
    pub fn split_at_axis(&self, axis: usize) -> (usize, usize, usize) {
        assert!(axis < self.rank(), "split_at_axis: axis {axis} is out of range for shape {self}");
        let outer = self.0[..axis].iter().product();
        let inner = self.0[axis + 1..].iter().product();
        (outer, self.0[axis], inner)
    }
    /// The shape both operands broadcast to, or an error naming `op` and both shapes.
    pub fn broadcast(op: &'static str, a: &Shape, b: &Shape) -> Result<Shape> {
        let rank = a.rank().max(b.rank());
        let mut out = vec![0; rank];
        for (i, slot) in out.iter_mut().enumerate() {
            let da = if i < rank - a.rank() { 1 } else { a.0[i - (rank - a.rank())] };
            let db = if i < rank - b.rank() { 1 } else { b.0[i - (rank - b.rank())] };
            *slot = match (da, db) {
                (x, y) if x == y => x,
                (1, y) => y,
                (x, 1) => x,
                _ => {
                    return Err(Error::shape(op, format!("shapes {a} and {b} do not broadcast")));
                }
            };
        }
        Ok(Shape(out))
    }
    /// Strides for reading this shape as if broadcast to `target` (0 on stretched dims).
    ///
    /// Precondition: this shape broadcasts to `target`, which the op checks first with
    /// [`broadcast`](Shape::broadcast). Panics otherwise (without the check, a shape of higher
    /// rank than `target`, or a dim that neither matches nor is 1, would give strides that read
    /// outside the tensor or the wrong elements).
    pub fn broadcast_strides(&self, target: &Shape) -> Vec<usize> {
        assert!(
            self.broadcasts_to(target),
            "broadcast_strides: shape {self} does not broadcast to {target}"
        );
        let own = self.strides();
        let offset = target.rank() - self.rank();
        (0..target.rank())
            .map(|i| if i < offset || self.0[i - offset] == 1 { 0 } else { own[i - offset] })
            .collect()
    }

    /// True when this shape stretches to `target`: no more axes, and each of its dims, aligned
    /// from the right, is 1 or equal to `target`'s.
    fn broadcasts_to(&self, target: &Shape) -> bool {
        self.rank() <= target.rank()
            && self.0.iter().rev().zip(target.0.iter().rev()).all(|(&d, &t)| d == 1 || d == t)
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}
impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(d)
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(d.to_vec())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}
impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn broadcasting_follows_numpy() {
        let s = Shape::broadcast("t", &Shape::new(&[3, 1, 5]), &Shape::new(&[4, 1])).unwrap();
        assert_eq!(s.dims(), &[3, 4, 5]);
        assert!(Shape::broadcast("t", &Shape::new(&[3]), &Shape::new(&[4])).is_err());
        assert_eq!(Shape::new(&[4, 1]).broadcast_strides(&s), vec![0, 1, 0]);
        assert_eq!(Shape::new(&[]).broadcast_strides(&s), vec![0, 0, 0]);
        assert_eq!(s.broadcast_strides(&s), s.strides());
    }

    #[test]
    fn split_at_axis_gives_outer_dim_inner() {
        let s = Shape::new(&[2, 3, 4]);
        assert_eq!(s.split_at_axis(0), (1, 2, 12));
        assert_eq!(s.split_at_axis(1), (2, 3, 4));
        assert_eq!(s.split_at_axis(2), (6, 4, 1));
        assert!(s.check_axis("t", 3).unwrap_err().to_string().contains("[2, 3, 4]"));
    }

    #[test]
    #[should_panic(expected = "split_at_axis: axis 3 is out of range for shape [2, 3, 4]")]
    fn split_at_axis_without_the_axis_check_panics_naming_the_shape() {
        Shape::new(&[2, 3, 4]).split_at_axis(3);
    }

    #[test]
    #[should_panic(expected = "broadcast_strides: shape [3, 5] does not broadcast to [3, 4]")]
    fn broadcast_strides_without_the_broadcast_check_panics_naming_both_shapes() {
        Shape::new(&[3, 5]).broadcast_strides(&Shape::new(&[3, 4]));
    }

    #[test]
    #[should_panic(expected = "broadcast_strides: shape [2, 3, 4] does not broadcast to [3, 4]")]
    fn broadcast_strides_to_a_lower_rank_panics() {
        Shape::new(&[2, 3, 4]).broadcast_strides(&Shape::new(&[3, 4]));
    }
}
