//! Element-wise math written once, for one `f32` and for groups of vector registers.
//!
//! GELU and its derivative, which Θ evaluates for every Pattention score, are long chains of
//! dependent operations (an erfc fit with a division, a polynomial, an exponential: some 40
//! steps). Written as a scalar function inside a loop, the compiler vectorises it one register
//! at a time, and each register's chain waits on the latency of the one before. [`Real`] lets
//! the same source run on `f32` (the plain path) and on a group of registers that every
//! operation advances together, so that independent chains interleave in the instruction stream.
//! On a Zen 4 core with AVX2, Θ's row loops (24 rows of 512 in cache) take 1.37 ns a score
//! forward and 2.14 forward and backward together with two registers at a time, 1.10 and 1.94
//! with four (what they use, with either instruction set).
//!
//! Every operation of [`Real`] is one IEEE operation rounded once (`mul_add` a fused
//! multiply-add; the comparisons are ordered, so a NaN compares false as in scalar Rust), so
//! each lane computes the bits of the `f32` version.

use std::ops::{Add, Div, Mul, Neg, Sub};

/// Numbers with the operations GELU's fits need, lane-wise.
pub(crate) trait Real:
    Copy
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    /// How many f32 values one `Self` holds.
    const LANES: usize;
    fn splat(v: f32) -> Self;
    /// The first `LANES` values of `src`.
    fn load(src: &[f32]) -> Self;
    /// Into the first `LANES` values of `dst`.
    fn store(self, dst: &mut [f32]);
    /// self·m + a, rounded once.
    fn mul_add(self, m: Self, a: Self) -> Self;
    /// |self| (the sign bit cleared).
    fn abs(self) -> Self;
    /// Lane-wise `if self < other { then } else { otherwise }`.
    fn if_less(self, other: Self, then: Self, otherwise: Self) -> Self;
    /// Lane-wise `if self > other { then } else { otherwise }`.
    fn if_greater(self, other: Self, then: Self, otherwise: Self) -> Self;
    /// Lane-wise `if self == other { then } else { otherwise }`.
    fn if_equal(self, other: Self, then: Self, otherwise: Self) -> Self;
    /// For an integer n held in the low mantissa bits of `self` (a float offset by `offset`,
    /// n = bits(self) − bits(offset)): (2^h, 2^(n−h)) with h = ⌊n/2⌋, built in the exponent bits.
    fn pow2_halves(self, offset: f32) -> (Self, Self);
}

impl Real for f32 {
    const LANES: usize = 1;
    #[inline(always)]
    fn splat(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn load(src: &[f32]) -> f32 {
        src[0]
    }
    #[inline(always)]
    fn store(self, dst: &mut [f32]) {
        dst[0] = self;
    }
    #[inline(always)]
    fn mul_add(self, m: f32, a: f32) -> f32 {
        f32::mul_add(self, m, a)
    }
    #[inline(always)]
    fn abs(self) -> f32 {
        f32::abs(self)
    }
    #[inline(always)]
    fn if_less(self, other: f32, then: f32, otherwise: f32) -> f32 {
        if self < other {
            then
        } else {
            otherwise
        }
    }
    #[inline(always)]
    fn if_greater(self, other: f32, then: f32, otherwise: f32) -> f32 {
        if self > other {
            then
        } else {
            otherwise
        }
    }
    #[inline(always)]
    fn if_equal(self, other: f32, then: f32, otherwise: f32) -> f32 {
        if self == other {
            then
        } else {
            otherwise
        }
    }
    #[inline(always)]
    fn pow2_halves(self, offset: f32) -> (f32, f32) {
        let n = self.to_bits().wrapping_sub(offset.to_bits()) as i32;
        let half = n >> 1;
        let scale = |k: i32| f32::from_bits((k.wrapping_add(127) as u32) << 23);
        (scale(half), scale(n - half))
    }
}

/// Groups of AVX2 and AVX-512 registers. A value of these types is only ever made inside a
/// function compiled for that instruction set (`#[target_feature]`), which its caller runs only
/// after detecting the instructions; the methods are inlined there. They loop over the
/// registers instead of calling closures (`array::map`), which the compiler may leave out of
/// line and so compile without the caller's instruction set.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::Real;
    use std::arch::x86_64::*;
    use std::ops::{Add, Div, Mul, Neg, Sub};

    /// `K` AVX2 registers (8 lanes each) advanced together.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2<const K: usize>([__m256; K]);

    /// `K` AVX-512 registers (16 lanes each) advanced together.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512<const K: usize>([__m512; K]);

    /// `out` with register i replaced by `value` (which may use i), for each i < K.
    macro_rules! per_register {
        ($out:expr, $i:ident => $value:expr) => {{
            let mut out = $out;
            for $i in 0..K {
                out[$i] = $value;
            }
            out
        }};
    }

    /// The arithmetic operators, register by register, for a group type and its intrinsics.
    macro_rules! operators {
        ($t:ident, $add:ident, $sub:ident, $mul:ident, $div:ident) => {
            impl<const K: usize> Add for $t<K> {
                type Output = Self;
                #[inline(always)]
                fn add(self, o: Self) -> Self {
                    // SAFETY: see the module's comment.
                    $t(per_register!(self.0, i => unsafe { $add(self.0[i], o.0[i]) }))
                }
            }
            impl<const K: usize> Sub for $t<K> {
                type Output = Self;
                #[inline(always)]
                fn sub(self, o: Self) -> Self {
                    // SAFETY: see the module's comment.
                    $t(per_register!(self.0, i => unsafe { $sub(self.0[i], o.0[i]) }))
                }
            }
            impl<const K: usize> Mul for $t<K> {
                type Output = Self;
                #[inline(always)]
                fn mul(self, o: Self) -> Self {
                    // SAFETY: see the module's comment.
                    $t(per_register!(self.0, i => unsafe { $mul(self.0[i], o.0[i]) }))
                }
            }
            impl<const K: usize> Div for $t<K> {
                type Output = Self;
                #[inline(always)]
                fn div(self, o: Self) -> Self {
                    // SAFETY: see the module's comment.
                    $t(per_register!(self.0, i => unsafe { $div(self.0[i], o.0[i]) }))
                }
            }
        };
    }
    operators!(Avx2, _mm256_add_ps, _mm256_sub_ps, _mm256_mul_ps, _mm256_div_ps);
    operators!(Avx512, _mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps, _mm512_div_ps);

    // SAFETY (every `unsafe` block below): see the module's comment; loads and stores are of
    // `LANES` values from slices checked to hold that many.

    impl<const K: usize> Neg for Avx2<K> {
        type Output = Self;
        #[inline(always)]
        fn neg(self) -> Self {
            let sign = unsafe { _mm256_set1_ps(-0.0) };
            Avx2(per_register!(self.0, i => unsafe { _mm256_xor_ps(self.0[i], sign) }))
        }
    }

    impl<const K: usize> Real for Avx2<K> {
        const LANES: usize = 8 * K;
        #[inline(always)]
        fn splat(v: f32) -> Self {
            Avx2([unsafe { _mm256_set1_ps(v) }; K])
        }
        #[inline(always)]
        fn load(src: &[f32]) -> Self {
            let src = &src[..Self::LANES];
            let zero = unsafe { _mm256_setzero_ps() };
            Avx2(per_register!([zero; K], i => unsafe { _mm256_loadu_ps(src.as_ptr().add(8 * i)) }))
        }
        #[inline(always)]
        fn store(self, dst: &mut [f32]) {
            let dst = &mut dst[..Self::LANES];
            for i in 0..K {
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(8 * i), self.0[i]) };
            }
        }
        #[inline(always)]
        fn mul_add(self, m: Self, a: Self) -> Self {
            Avx2(per_register!(self.0, i => unsafe { _mm256_fmadd_ps(self.0[i], m.0[i], a.0[i]) }))
        }
        #[inline(always)]
        fn abs(self) -> Self {
            let sign = unsafe { _mm256_set1_ps(-0.0) };
            Avx2(per_register!(self.0, i => unsafe { _mm256_andnot_ps(sign, self.0[i]) }))
        }
        #[inline(always)]
        fn if_less(self, other: Self, then: Self, otherwise: Self) -> Self {
            select_avx2::<_CMP_LT_OQ, K>(self, other, then, otherwise)
        }
        #[inline(always)]
        fn if_greater(self, other: Self, then: Self, otherwise: Self) -> Self {
            select_avx2::<_CMP_GT_OQ, K>(self, other, then, otherwise)
        }
        #[inline(always)]
        fn if_equal(self, other: Self, then: Self, otherwise: Self) -> Self {
            select_avx2::<_CMP_EQ_OQ, K>(self, other, then, otherwise)
        }
        #[inline(always)]
        fn pow2_halves(self, offset: f32) -> (Self, Self) {
            unsafe {
                let (offset, bias) =
                    (_mm256_set1_epi32(offset.to_bits() as i32), _mm256_set1_epi32(127));
                let (mut low, mut high) = (self.0, self.0);
                for i in 0..K {
                    let n = _mm256_sub_epi32(_mm256_castps_si256(self.0[i]), offset);
                    let half = _mm256_srai_epi32::<1>(n);
                    let rest = _mm256_sub_epi32(n, half);
                    low[i] =
                        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(half, bias)));
                    high[i] =
                        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(rest, bias)));
                }
                (Avx2(low), Avx2(high))
            }
        }
    }

    /// Lane-wise `if a OP b { then } else { otherwise }` with the comparison predicate OP.
    #[inline(always)]
    fn select_avx2<const OP: i32, const K: usize>(
        a: Avx2<K>,
        b: Avx2<K>,
        then: Avx2<K>,
        otherwise: Avx2<K>,
    ) -> Avx2<K> {
        let mask = per_register!(a.0, i => unsafe { _mm256_cmp_ps::<OP>(a.0[i], b.0[i]) });
        Avx2(per_register!(a.0, i => unsafe {
            _mm256_blendv_ps(otherwise.0[i], then.0[i], mask[i])
        }))
    }

    impl<const K: usize> Neg for Avx512<K> {
        type Output = Self;
        #[inline(always)]
        fn neg(self) -> Self {
            let sign = unsafe { _mm512_set1_epi32(i32::MIN) };
            Avx512(per_register!(self.0, i => unsafe {
                _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(self.0[i]), sign))
            }))
        }
    }

    impl<const K: usize> Real for Avx512<K> {
        const LANES: usize = 16 * K;
        #[inline(always)]
        fn splat(v: f32) -> Self {
            Avx512([unsafe { _mm512_set1_ps(v) }; K])
        }
        #[inline(always)]
        fn load(src: &[f32]) -> Self {
            let src = &src[..Self::LANES];
            let zero = unsafe { _mm512_setzero_ps() };
            Avx512(per_register!([zero; K], i => unsafe {
                _mm512_loadu_ps(src.as_ptr().add(16 * i))
            }))
        }
        #[inline(always)]
        fn store(self, dst: &mut [f32]) {
            let dst = &mut dst[..Self::LANES];
            for i in 0..K {
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(16 * i), self.0[i]) };
            }
        }
        #[inline(always)]
        fn mul_add(self, m: Self, a: Self) -> Self {
            Avx512(per_register!(self.0, i => unsafe {
                _mm512_fmadd_ps(self.0[i], m.0[i], a.0[i])
            }))
        }
        #[inline(always)]
        fn abs(self) -> Self {
            Avx512(per_register!(self.0, i => unsafe { _mm512_abs_ps(self.0[i]) }))
        }
        #[inline(always)]
        fn if_less(self, other: Self, then: Self, otherwise: Self) -> Self {
            select_avx512::<_CMP_LT_OQ, K>(self, other, then, otherwise)
        }
        #[inline(always)]
        fn if_greater(self, other: Self, then: Self, otherwise: Self) -> Self {
            select_avx512::<_CMP_GT_OQ, K>(self, other, then, otherwise)
        }
        #[inline(always)]
        fn if_equal(self, other: Self, then: Self, otherwise: Self) -> Self {
            select_avx512::<_CMP_EQ_OQ, K>(self, other, then, otherwise)
        }
        #[inline(always)]
        fn pow2_halves(self, offset: f32) -> (Self, Self) {
            unsafe {
                let (offset, bias) =
                    (_mm512_set1_epi32(offset.to_bits() as i32), _mm512_set1_epi32(127));
                let (mut low, mut high) = (self.0, self.0);
                for i in 0..K {
                    let n = _mm512_sub_epi32(_mm512_castps_si512(self.0[i]), offset);
                    let half = _mm512_srai_epi32::<1>(n);
                    let rest = _mm512_sub_epi32(n, half);
                    low[i] =
                        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(half, bias)));
                    high[i] =
                        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(rest, bias)));
                }
                (Avx512(low), Avx512(high))
            }
        }
    }

    /// Lane-wise `if a OP b { then } else { otherwise }` with the comparison predicate OP.
    #[inline(always)]
    fn select_avx512<const OP: i32, const K: usize>(
        a: Avx512<K>,
        b: Avx512<K>,
        then: Avx512<K>,
        otherwise: Avx512<K>,
    ) -> Avx512<K> {
        let mask = per_register!([0 as __mmask16; K], i => unsafe {
            _mm512_cmp_ps_mask::<OP>(a.0[i], b.0[i])
        });
        Avx512(per_register!(a.0, i => unsafe {
            _mm512_mask_blend_ps(mask[i], otherwise.0[i], then.0[i])
        }))
    }
}

/// The most lanes a [`Real`] holds (four AVX-512 registers).
const MAX_LANES: usize = 64;

/// The `lanes` values of `x` from `start` as one `R`: loaded in place when they fill it, else
/// from a copy padded with zeros. (A function rather than a closure, as in `x86`.)
#[inline(always)]
fn load_group<R: Real>(x: &[f32], start: usize, lanes: usize) -> R {
    if lanes == R::LANES {
        R::load(&x[start..])
    } else {
        let mut padded = [0.0f32; MAX_LANES];
        padded[..lanes].copy_from_slice(&x[start..]);
        R::load(&padded)
    }
}

/// `value` into the `lanes` values of `x` from `start`: stored in place when they fill it, else
/// through a padded copy of which only the real lanes are written back.
#[inline(always)]
fn store_group<R: Real>(value: R, x: &mut [f32], start: usize, lanes: usize) {
    if lanes == R::LANES {
        value.store(&mut x[start..]);
    } else {
        let mut padded = [0.0f32; MAX_LANES];
        value.store(&mut padded);
        x[start..].copy_from_slice(&padded[..lanes]);
    }
}

/// Work on one group of `R::LANES` values: from the values of I inputs and of O outputs there,
/// the new values of the outputs.
///
/// A trait whose implementations mark `apply` `#[inline(always)]`, rather than a closure: a
/// closure is inlined only where the compiler judges it small enough, and one left out is
/// compiled outside the caller's instruction set, where every intrinsic of `R` becomes a call.
/// (GELU's closure over four AVX2 registers was left out and ran 50 times slower.)
pub(crate) trait LaneMap<R: Real, const I: usize, const O: usize> {
    fn apply(&self, inputs: [R; I], outputs: [R; O]) -> [R; O];
}

/// Runs `f` along rows of equal length, `R::LANES` values at a time. The last, partial group
/// is padded with zeros and only its real lanes are written back.
#[inline(always)]
pub(crate) fn lanewise<R: Real, const I: usize, const O: usize>(
    inputs: [&[f32]; I],
    mut outputs: [&mut [f32]; O],
    f: impl LaneMap<R, I, O>,
) {
    const { assert!(O > 0 && R::LANES <= MAX_LANES) };
    let len = outputs[0].len();
    debug_assert!(inputs.iter().all(|x| x.len() == len));
    debug_assert!(outputs.iter().all(|x| x.len() == len));
    for start in (0..len).step_by(R::LANES) {
        let lanes = R::LANES.min(len - start);
        let mut ins = [R::splat(0.0); I];
        for (value, x) in ins.iter_mut().zip(inputs) {
            *value = load_group(x, start, lanes);
        }
        let mut outs = [R::splat(0.0); O];
        for (value, x) in outs.iter_mut().zip(outputs.iter()) {
            *value = load_group(x, start, lanes);
        }
        for (out, value) in outputs.iter_mut().zip(f.apply(ins, outs)) {
            store_group(value, out, start, lanes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unary::cpu::{exp_nonpositive, gelu, gelu_and_grad, gelu_grad};

    /// Values where a select, a sign or a rounding could go astray: zeros of both signs, NaN,
    /// infinities, the ends of exp's range, subnormals, GELU's far tails, and a spread between.
    fn awkward_values() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            1e-40,
            -1e-40,
            -87.4,
            -103.9,
            -110.0,
            -111.0,
            -13.0,
            13.0,
            f32::MAX,
            f32::MIN,
        ];
        v.extend((0..200).map(|i| (i as f32 - 100.0) * 0.137));
        v
    }

    /// f(x), for the tests (where speed does not matter, so a function pointer will do).
    struct Of<R>(fn(R) -> R);

    impl<R: Real> LaneMap<R, 1, 1> for Of<R> {
        fn apply(&self, [x]: [R; 1], _: [R; 1]) -> [R; 1] {
            [(self.0)(x)]
        }
    }

    /// GELU(x) and GELU′(x) from `gelu_and_grad`.
    struct Both;

    impl<R: Real> LaneMap<R, 1, 2> for Both {
        fn apply(&self, [x]: [R; 1], _: [R; 2]) -> [R; 2] {
            let (gelu, grad) = gelu_and_grad(x);
            [gelu, grad]
        }
    }

    /// Each lane of `R` gives the f32 version's bits for exp, GELU, GELU′ and both together,
    /// over the awkward values in groups of `R::LANES` (the last one padded).
    fn lanes_match_the_scalar_version<R: Real>() {
        let x = awkward_values();
        // Bits, with every NaN as one: which NaN an operation on NaNs returns depends on the
        // order of its operands in the instruction, which the compiler may swap.
        let bits = |v: &[f32]| {
            v.iter().map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() }).collect::<Vec<_>>()
        };
        let scalar = |f: fn(f32) -> f32| x.iter().map(|&v| f(v)).collect::<Vec<_>>();
        let mut out = vec![0.0f32; x.len()];
        lanewise([&x[..]], [&mut out[..]], Of(exp_nonpositive::<R>));
        assert_eq!(bits(&out), bits(&scalar(exp_nonpositive)), "exp");
        lanewise([&x[..]], [&mut out[..]], Of(gelu::<R>));
        assert_eq!(bits(&out), bits(&scalar(gelu)), "gelu");
        lanewise([&x[..]], [&mut out[..]], Of(gelu_grad::<R>));
        assert_eq!(bits(&out), bits(&scalar(gelu_grad)), "gelu_grad");
        let mut grad = vec![0.0f32; x.len()];
        lanewise::<R, 1, 2>([&x[..]], [&mut out[..], &mut grad[..]], Both);
        assert_eq!(bits(&out), bits(&scalar(gelu)), "gelu_and_grad's gelu");
        assert_eq!(bits(&grad), bits(&scalar(gelu_grad)), "gelu_and_grad's grad");
    }

    #[test]
    fn every_register_group_gives_the_bits_of_f32() {
        lanes_match_the_scalar_version::<f32>();
        #[cfg(target_arch = "x86_64")]
        {
            use x86::{Avx2, Avx512};
            #[target_feature(enable = "avx2,fma")]
            fn avx2() {
                lanes_match_the_scalar_version::<Avx2<1>>();
                lanes_match_the_scalar_version::<Avx2<2>>();
                lanes_match_the_scalar_version::<Avx2<4>>();
            }
            #[target_feature(enable = "avx512f,fma")]
            fn avx512() {
                lanes_match_the_scalar_version::<Avx512<1>>();
                lanes_match_the_scalar_version::<Avx512<2>>();
                lanes_match_the_scalar_version::<Avx512<4>>();
            }
            let fma = std::arch::is_x86_feature_detected!("fma");
            // SAFETY: each runs only where the processor has its instructions.
            if fma && std::arch::is_x86_feature_detected!("avx2") {
                unsafe { avx2() };
            }
            if fma && std::arch::is_x86_feature_detected!("avx512f") {
                unsafe { avx512() };
            }
        }
    }

    #[test]
    fn scalar_pow2_halves_multiply_to_two_to_the_n() {
        const ROUND: f32 = 12_582_912.0;
        for n in [-150i32, -127, -1, 0, 1, 5, 127] {
            let held = f32::from_bits(ROUND.to_bits().wrapping_add(n as u32));
            let (a, b) = held.pow2_halves(ROUND);
            assert_eq!(a as f64 * b as f64, 2f64.powi(n), "n = {n}");
        }
    }
}
