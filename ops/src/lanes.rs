//! Row sums in 16 interleaved lanes: element j is added into lane j mod 16, in order, and the
//! lanes are combined in one fixed pairwise order. The order of the additions depends only on
//! the row's length, so the sum is the same bit for bit on every processor and thread count,
//! and appending exact zeros to a row (growth) leaves it unchanged. The lanes are independent
//! additions, which is what lets the loops vectorise: one running sum waits on every addition.

pub(crate) const LANES: usize = 16;

/// The lanes added pairwise in a fixed order: (0+8, 1+9, …), then (0+4, …), and so on.
#[inline(always)]
pub(crate) fn combine<T: Copy + std::ops::Add<Output = T>>(mut lanes: [T; LANES]) -> T {
    let mut width = LANES / 2;
    while width > 0 {
        for j in 0..width {
            lanes[j] = lanes[j] + lanes[j + width];
        }
        width /= 2;
    }
    lanes[0]
}

/// Σ_j f(x[j], y[j]) in f32 lanes (x and y of the same length).
#[inline(always)]
pub(crate) fn sum2(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let (x_tail, y_tail) = (xc.remainder(), yc.remainder());
    for (cx, cy) in xc.zip(yc) {
        for ((lane, &a), &b) in lanes.iter_mut().zip(cx).zip(cy) {
            *lane += f(a, b);
        }
    }
    for ((lane, &a), &b) in lanes.iter_mut().zip(x_tail).zip(y_tail) {
        *lane += f(a, b);
    }
    combine(lanes)
}

/// Σ_j f(x[j], y[j], z[j]) in f32 lanes (x, y and z of the same length).
#[inline(always)]
pub(crate) fn sum3(x: &[f32], y: &[f32], z: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (xc, yc, zc) = (x.chunks_exact(LANES), y.chunks_exact(LANES), z.chunks_exact(LANES));
    let (xt, yt, zt) = (xc.remainder(), yc.remainder(), zc.remainder());
    for ((cx, cy), cz) in xc.zip(yc).zip(zc) {
        for (((lane, &a), &b), &c) in lanes.iter_mut().zip(cx).zip(cy).zip(cz) {
            *lane += f(a, b, c);
        }
    }
    for (((lane, &a), &b), &c) in lanes.iter_mut().zip(xt).zip(yt).zip(zt) {
        *lane += f(a, b, c);
    }
    combine(lanes)
}

/// Σ_j f(x[j]) in f32 lanes.
#[inline(always)]
pub(crate) fn sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    sum2(x, x, |a, _| f(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_add_in_the_stated_order() {
        // 1e8 + 1 − 1e8 is 0 or 1 depending on the grouping: the lanes decide which.
        let mut x = vec![0.0f32; 35];
        x[0] = 1e8; // lane 0
        x[16] = 1.0; // lane 0, after x[0]: rounds away
        x[8] = -1e8; // lane 8, combined with lane 0 first
        x[33] = 1.0; // lane 1, added last
        let want = ((1e8f32 + 1.0) + -1e8) + 1.0;
        assert_eq!(sum(&x, |v| v), want);
        assert_eq!(sum(&[], |v| v), 0.0);
        // Appended zeros change nothing.
        let mut longer = x.clone();
        longer.extend([0.0; 29]);
        assert_eq!(sum(&longer, |v| v).to_bits(), sum(&x, |v| v).to_bits());
    }
}
