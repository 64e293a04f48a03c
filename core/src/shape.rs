//! Shapes of row-major tensors and the broadcasting rule (NumPy's: align trailing dims; a dim
//! of 1 stretches to match).

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
    pub fn split_at_axis(&self, axis: usize) -> (usize, usize, usize) {
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
    pub fn broadcast_strides(&self, target: &Shape) -> Vec<usize> {
        let own = self.strides();
        let offset = target.rank() - self.rank();
        (0..target.rank())
            .map(|i| if i < offset || self.0[i - offset] == 1 { 0 } else { own[i - offset] })
            .collect()
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
    }
}
